"""Observers: what range of an activation a scale should cover.

Every observer sees the absolute values of one tensor over the calibration set and returns
``amax`` (the symmetric range: ``scale = amax / qmax``).

| observer     | amax                                                                              |
|--------------|-----------------------------------------------------------------------------------|
| ``minmax``     | the largest |x| seen                                                              |
| ``percentile`` | the ``percentile``-th percentile of |x| (histogram)                                |
| ``entropy``    | the clip point minimising KL(P ‖ Q) between the histogram and its 8-bit version (TensorRT's calibrator) |
| ``mse``        | the clip point minimising the mean squared quantization error over the histogram |

Histograms are built in two passes over the calibration data (first the max, then 2048 fixed bins
over ``[0, max]``), so the result does not depend on the order the batches arrive in and the same
data always gives bit-identical scales.
"""

from __future__ import annotations

import math

import torch

OBSERVERS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048


class Observer:
    """Collects |x| statistics of one tensor. ``update_max`` (pass 1) then ``update_hist`` (pass 2,
    only for histogram observers), then ``amax(method)``."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.max = 0.0
        self.hist: torch.Tensor | None = None

    @property
    def needs_histogram(self) -> bool:
        return True

    def update_max(self, x: torch.Tensor) -> None:
        if x.numel():
            self.max = max(self.max, float(x.detach().abs().max()))

    def update_hist(self, x: torch.Tensor) -> None:
        if self.max <= 0 or not x.numel():
            return
        h = torch.histc(x.detach().abs().float().reshape(-1), bins=self.bins, min=0.0, max=self.max).double()
        self.hist = h if self.hist is None else self.hist + h

    def amax(self, method: str, *, percentile: float = 99.99, num_bits: int = 8) -> float:
        """The clip value for ``method``; never 0 (a tensor that was always 0 gets a tiny range)."""
        if self.max <= 0:
            return 1e-8
        if method in ("minmax", "auto") or self.hist is None:
            return self.max
        if method == "percentile":
            return _percentile(self.hist, self.max, percentile)
        if method == "entropy":
            return _entropy(self.hist, self.max, num_bits)
        if method == "mse":
            return _mse(self.hist, self.max, num_bits)
        raise ValueError(f"unknown observer {method!r}; use one of {', '.join(OBSERVERS)}")


def _edges(hist: torch.Tensor, amax: float) -> torch.Tensor:
    width = amax / hist.numel()
    return (torch.arange(hist.numel(), dtype=torch.float64) + 0.5) * width  # bin centres


def _percentile(hist: torch.Tensor, amax: float, pct: float) -> float:
    cdf = hist.cumsum(0) / hist.sum()
    idx = int(torch.searchsorted(cdf, torch.tensor(pct / 100.0, dtype=torch.float64)).clamp(max=hist.numel() - 1))
    return amax * (idx + 1) / hist.numel()


def _mse(hist: torch.Tensor, amax: float, num_bits: int) -> float:
    """Expected squared error of symmetric quantization with clip ``c`` over the histogram,
    minimised over candidate ``c`` (every 16th bin edge from 128 bins up)."""
    centres = _edges(hist, amax)
    qmax = 2 ** (num_bits - 1) - 1
    best, best_c = math.inf, amax
    n = hist.numel()
    for stop in range(128, n + 1, 16):
        c = amax * stop / n
        step = c / qmax
        q = torch.clamp(torch.round(centres / step), max=qmax) * step
        err = float((hist * (centres - q) ** 2).sum())
        if err < best:
            best, best_c = err, c
    return best_c


def _entropy(hist: torch.Tensor, amax: float, num_bits: int) -> float:
    """TensorRT's entropy calibration: for each candidate clip bin ``i`` (from 128 bins up),
    P = hist[:i] with the clipped tail added to its last bin, Q = P merged into 128 levels and
    expanded back over P's non-zero bins; pick the ``i`` minimising KL(P ‖ Q)."""
    n = hist.numel()
    levels = 2 ** (num_bits - 1)
    hist = hist.clone()
    hist[0] = 0.0  # zeros (ReLU/GELU outputs, padding) say nothing about the range
    best, best_i = math.inf, n
    for i in range(levels, n + 1, 16):
        p = hist[:i].clone()
        p[i - 1] += hist[i:].sum()
        nz = p > 0
        if not bool(nz.any()):
            continue
        # merge into `levels` chunks and spread each chunk's mass over its non-zero bins
        idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, hist[:i])
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, (hist[:i] > 0).double())
        q = torch.where(hist[:i] > 0, mass[idx] / count[idx].clamp_min(1), torch.zeros_like(p))
        ps, qs = p / p.sum(), q / max(float(q.sum()), 1e-300)
        qs = torch.where(nz & (qs <= 0), torch.full_like(qs, 1e-12), qs)
        kl = float((ps[nz] * torch.log(ps[nz] / qs[nz])).sum())
        if kl < best:
            best, best_i = kl, i
    return amax * best_i / n
