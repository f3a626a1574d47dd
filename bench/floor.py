"""The physical floor: how fast a case could possibly run on this machine.

Two rates are measured in the same run as the systems (same threads, same load):

- peak GEMM FLOP/s: the best of several large fp32 ``torch.mm`` (n = 2048 on CPU, 8192 on CUDA
  with TF32 off);
- memory read bandwidth: the best of several ``x.sum()`` over a tensor far larger than the caches
  (512 MB on CPU, 2 GB on CUDA).

A case then counts its work analytically — FLOPs: 2 x (linear-layer weights) x (tokens) plus the
attention matmuls; bytes: the weights that must be read at least once (plus the KV cache for
decoding, plus output activations) — and its floor is ``max(FLOPs / FLOP/s, bytes / bandwidth)``,
summed over the forwards it needs. ``time / floor`` says how far a system is from the machine.
The floor is a lower bound, not a target: it ignores the non-GEMM ops and assumes perfect overlap.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def _best_time(fn, reps: int, sync) -> tuple[float, float]:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def _gemm_time(n: int, device: str, reps: int, sync) -> tuple[float, float]:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    return _best_time(lambda: torch.mm(a, b), reps, sync)


def _sum_time(nbytes: int, device: str, reps: int, sync) -> tuple[float, float]:
    x = torch.ones(nbytes // 4, device=device)
    return _best_time(lambda: x.sum(), reps, sync)


def measure_rates(device: str = "cpu", quick: bool = False) -> dict[str, Any]:
    """Peak fp32 GEMM FLOP/s and memory read bandwidth at the current ``torch`` thread count."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = (4096 if quick else 8192) if cuda else (1024 if quick else 2048)
    mem_bytes = (512 if quick else 2048) * 2**20 if cuda else (128 if quick else 512) * 2**20
    reps = 3 if quick else 6
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak, what the fp32 models use
    try:
        best, med = _gemm_time(n, device, reps, sync)
        best_bw, med_bw = _sum_time(mem_bytes, device, reps, sync)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    flops = 2.0 * n**3
    return {"device": device, "threads": torch.get_num_threads(),
            "gemm_flops": flops / best, "gemm_flops_median": flops / med, "gemm_n": n, "gemm_dtype": "float32",
            "mem_bw": mem_bytes / best_bw, "mem_bw_median": mem_bytes / med_bw, "mem_bytes": mem_bytes,
            "reps": reps,
            "method": f"best of {reps}: fp32 torch.mm {n}x{n}x{n}; sum of a {mem_bytes >> 20} MiB fp32 tensor"}


# -- counting work -----------------------------------------------------------------------------

def _is_linear(m: torch.nn.Module) -> bool:
    # transformers' GPT-2 uses Conv1D (a Linear with a transposed weight)
    return isinstance(m, torch.nn.Linear) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None)


def linear_weights(module: torch.nn.Module) -> int:
    """Number of weights in the linear layers of ``module`` (each tied weight counted once)."""
    seen: dict[int, int] = {}
    for m in module.modules():
        if _is_linear(m):
            seen[id(m.weight)] = m.weight.numel()
    return sum(seen.values())


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters a forward must read in full: everything but embedding tables, of
    which a forward reads only the rows of its tokens (a table tied to a linear layer is read)."""
    linear = {id(m.weight) for m in module.modules() if _is_linear(m)}
    tables = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    seen: dict[int, int] = {}
    for p in module.parameters():
        if id(p) in tables and id(p) not in linear:
            continue
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def floor_of(steps: list[tuple[float, float]], rates: dict[str, Any]) -> dict[str, Any]:
    """Floor of a sequence of forwards, each ``(flops, bytes)``: sum of per-forward maxima."""
    compute = [f / rates["gemm_flops"] for f, _ in steps]
    memory = [b / rates["mem_bw"] for _, b in steps]
    total = sum(max(c, m) for c, m in zip(compute, memory))
    bound = "compute" if sum(compute) >= sum(memory) else "memory"
    return {"time_s": total, "flops": sum(f for f, _ in steps), "bytes": sum(b for _, b in steps),
            "compute_s": sum(compute), "memory_s": sum(memory), "bound": bound, "forwards": len(steps)}
