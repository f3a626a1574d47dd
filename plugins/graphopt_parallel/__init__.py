"""graphopt-parallel: Megatron-style tensor parallelism as a verified graph rewrite.

``tensor-parallel(world_size=N)`` shards attention by KV-head groups and FFNs by channels, with one
all-reduce after each row-parallel GEMM, into a graph that holds every rank's shard and is verified
against the original; the torch target writes one program per rank, run on torch.distributed
(gloo on CPU, NCCL on GPU) under torchrun (graphopt.parallel).
"""

from __future__ import annotations

from graphopt.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def graphopt_register_passes(register):
    from graphopt_parallel.tensor_parallel import TensorParallel

    register(TensorParallel)
