"""graphopt-kvcache: KV-cache insertion as a graph rewrite, verified by greedy decoding."""

from __future__ import annotations

from graphopt.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def graphopt_register_passes(register):
    from graphopt_kvcache.kv_cache import KVCache

    register(KVCache)
