"""Faster CPU matrix products for verification forwards with few rows.

Every per-pass check, the kv-cache decoding check and the lowering check's references are
eager forwards of the whole model on a few tokens (2-24 rows). On some CPUs the BLAS that torch
calls runs such a product ``x @ W.T`` (a ``linear``: activations by a transposed weight) far below
the machine's rate, while the same product stated the other way round, ``(W @ x.T).T``, takes
another kernel: measured on a 2-core AMD EPYC with torch 2.13's MKL, a [24, 2048] x [2048, 8192]
product takes 45 ms one way and 22 ms the other, a 1B model's check 3.3 s instead of ~1.8 s.

:func:`verification_kernels` returns a context in which float32 CPU ``mm``/``addmm`` of at most
``MAX_ROWS`` rows by a transposed contiguous weight are computed the faster way (same products,
same result up to fp32 summation order; the result is made contiguous, as the original op's is).
Whether the other way is faster is measured once per process on a small product; where it is not,
the context changes nothing. Both graphs of a check run under the same context, so a check that
compares bit for bit still does."""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: products with more rows than this run as they are (BLAS is efficient there)
MAX_ROWS = 64
#: weights smaller than this run as they are (nothing to gain, the dispatch costs more)
MIN_WEIGHT_ELEMENTS = 1 << 18

_aten = torch.ops.aten


def _eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu"
            and type(a) is torch.Tensor and type(b) is torch.Tensor
            and a.dim() == 2 and b.dim() == 2 and a.shape[0] <= MAX_ROWS
            and b.numel() >= MIN_WEIGHT_ELEMENTS and b.stride() == (1, b.shape[0]))


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as ``(b.T @ a.T).T``, contiguous."""
    return torch.mm(b.t(), a.t()).t().contiguous()


class SmallRowsGemm(TorchDispatchMode):
    """Computes eligible ``mm``/``addmm`` (see the module docstring) as ``(W @ x.T).T``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.mm.default and not kwargs:
            a, b = args
            if _eligible(a, b):
                return _product(a, b)
        elif func is _aten.addmm.default and not kwargs:
            c, a, b = args
            if _eligible(a, b) and c.dtype == torch.float32:
                return _product(a, b).add_(c)
        return func(*args, **kwargs)


@functools.cache
def transposed_is_faster(rows: int = 16, out_features: int = 4096, in_features: int = 1024) -> bool:
    """Whether ``(W @ x.T).T`` beats ``x @ W.T`` by 20 % or more on this machine (best of 3 each,
    ~50 ms once per process). ``GRAPHOPT_VERIFY_GEMM=plain|transposed`` decides instead."""
    forced = os.environ.get("GRAPHOPT_VERIFY_GEMM", "").strip().lower()
    if forced in ("plain", "transposed"):
        return forced == "transposed"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        plain = best(lambda: torch.mm(x, w.t()))
        transposed = best(lambda: _product(x, w.t()))
    return transposed < 0.8 * plain


def verification_kernels() -> contextlib.AbstractContextManager:
    """The context verification forwards run in: :class:`SmallRowsGemm` where it is faster here,
    else a context that changes nothing."""
    return SmallRowsGemm() if transposed_is_faster() else contextlib.nullcontext()
