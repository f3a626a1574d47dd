"""Verification policies: what "still computes the same thing" means for a pass.

Each policy compares the outputs of the graph after a pass with the outputs of the ORIGINAL
captured graph on the same inputs (the example inputs plus fresh random ones):

- ``exact()``                bit-identical outputs: pure rewrites (dead code, CSE, no-op removal);
- ``allclose(rtol, atol)``   ``|new - orig| <= atol + rtol * |orig|``: fusions, reassociations;
- ``reference(tol, multiplier)``  the torch dynamo rule: against an fp64 run of the original,
                             ``err(new) <= multiplier * err(original fp32) + tol``: precision changes;
- ``metric(...)``            bounds on quality metrics (cosine similarity, top-1 agreement) for
                             lossy passes such as quantization and pruning;
- ``equivalence(fn)``        a function decides, for passes that change the calling convention
                             (KV-cache insertion: greedy decoding must give the same tokens).

``policy.ignoring_padding("attention_mask")`` makes any of the first four compare real tokens only:
positions where that input is 0 are zeroed in both outputs first (the ``remove-padding`` pass
computes nothing there). Once such a pass ran, every later check does the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from graphopt.verify import metrics as _metrics

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR


@dataclass
class Outcome:
    """The verdict of a policy, plus the figures the report shows."""

    passed: bool
    message: str = ""
    worst_output: str | None = None
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class Evidence:
    """Everything a policy may look at. Lists are per input set, each a flat list of outputs."""

    output_names: list[str]
    original: list[list[torch.Tensor]]
    candidate: list[list[torch.Tensor]]
    reference64: Callable[[], list[list[torch.Tensor]]] | None = None
    original_ir: GraphIR | None = None
    candidate_ir: GraphIR | None = None
    inputs: list[list[torch.Tensor]] = field(default_factory=list)


def zero_padding(outputs: list[list[torch.Tensor]], inputs: list[list[torch.Tensor]], input_names: list[str],
                 mask: str) -> list[list[torch.Tensor]]:
    """``outputs`` with the padded positions (``mask`` input == 0) of every ``[B, T, ...]`` output set
    to 0, so that only real tokens are compared. Outputs of another layout are left as they are."""
    if mask not in input_names:
        return outputs
    i = input_names.index(mask)
    out = []
    for outs, inp in zip(outputs, inputs):
        if outs is None:  # an fp64 reference that could not run
            out.append(None)
            continue
        m = inp[i].detach().cpu().bool()
        row = []
        for x in outs:
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(m.shape):
                keep = m.to(x.device).reshape(*m.shape, *([1] * (x.dim() - 2)))
                x = x.masked_fill(~keep, 0)
            row.append(x)
        out.append(row)
    return out


def max_abs_error(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]], names: list[str]
                  ) -> tuple[float, str | None]:
    """Largest |a - b| over every input set and float output, and the output it occurs in."""
    worst, where = 0.0, None
    for outs_a, outs_b in zip(a, b):
        for name, x, y in zip(names, outs_a, outs_b):
            if x.shape != y.shape:
                return math.inf, name
            if x.numel() == 0:
                continue
            diff = _abs_diff(x, y)
            if diff > worst or (math.isnan(diff) and not math.isnan(worst)):
                worst, where = diff, name
    return worst, where


def _abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    xd, yd = x.detach().double(), y.detach().double()
    both_nan = torch.isnan(xd) & torch.isnan(yd)
    same_inf = torch.isinf(xd) & (xd == yd)
    d = (xd - yd).abs().masked_fill(both_nan | same_inf, 0.0)
    return float(d.max()) if d.numel() else 0.0


def _equal_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``torch.equal`` where NaN equals NaN (and only NaN; infinities stay infinities)."""
    if not x.is_floating_point():
        return torch.equal(x, y)
    nx, ny = torch.isnan(x), torch.isnan(y)
    return torch.equal(nx, ny) and torch.equal(x.masked_fill(nx, 0.0), y.masked_fill(ny, 0.0))


class Policy:
    """Base class. ``check`` returns an :class:`Outcome`; ``tolerance`` is the allclose tolerance
    used to locate the first diverging node when the check fails."""

    name = "policy"
    needs_reference64 = False
    padding_mask: str | None = None

    def ignoring_padding(self, mask: str) -> Policy:
        """Compare real tokens only: positions where input ``mask`` is 0 are zeroed in both outputs."""
        self.padding_mask = mask
        return self

    def check(self, ev: Evidence) -> Outcome:
        raise NotImplementedError

    def tolerance(self) -> tuple[float, float]:
        return (1e-4, 1e-4)

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return self.describe()

    def label(self) -> str:
        """``describe()``, plus the padding rule when one is set (for reports)."""
        return self.describe() + (f" on real tokens ({self.padding_mask} != 0)" if self.padding_mask else "")


class Exact(Policy):
    name = "exact"

    def check(self, ev: Evidence) -> Outcome:
        for outs_a, outs_b in zip(ev.original, ev.candidate):
            for name, x, y in zip(ev.output_names, outs_a, outs_b):
                if x.shape != y.shape or x.dtype != y.dtype:
                    return Outcome(False, f"output {name!r} changed shape/dtype: "
                                          f"{tuple(x.shape)} {x.dtype} -> {tuple(y.shape)} {y.dtype}", name)
                if not _equal_nan(x, y):
                    err, _ = max_abs_error(ev.original, ev.candidate, ev.output_names)
                    return Outcome(False, f"output {name!r} is not bit-identical (max abs error {err:.3g})",
                                   name, {"max_abs_error": err})
        return Outcome(True, "bit-identical", figures={"max_abs_error": 0.0})

    def tolerance(self) -> tuple[float, float]:
        return (0.0, 0.0)


class AllClose(Policy):
    name = "allclose"

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5):
        self.rtol, self.atol = rtol, atol

    def check(self, ev: Evidence) -> Outcome:
        worst_excess, worst_name, worst_err = -math.inf, None, 0.0
        for outs_a, outs_b in zip(ev.original, ev.candidate):
            for name, x, y in zip(ev.output_names, outs_a, outs_b):
                if x.shape != y.shape:
                    return Outcome(False, f"output {name!r} changed shape {tuple(x.shape)} -> {tuple(y.shape)}", name)
                if not x.is_floating_point():
                    if not torch.equal(x, y):
                        return Outcome(False, f"integer output {name!r} differs", name)
                    continue
                xd, yd = x.double(), y.double()
                err = _abs_diff(x, y)
                bound = self.atol + self.rtol * xd.abs()
                finite = torch.isfinite(xd) & torch.isfinite(yd)
                excess = float(((xd - yd).abs() - bound)[finite].max()) if finite.any() else 0.0
                if (~finite & ~((xd == yd) | (torch.isnan(xd) & torch.isnan(yd)))).any():
                    excess = math.inf
                if excess > worst_excess:
                    worst_excess, worst_name = excess, name
                worst_err = max(worst_err, err)
        ok = worst_excess <= 0
        msg = (f"max abs error {worst_err:.3g} within rtol={self.rtol:g}, atol={self.atol:g}" if ok else
               f"output {worst_name!r} exceeds rtol={self.rtol:g}, atol={self.atol:g} (max abs error {worst_err:.3g})")
        return Outcome(ok, msg, worst_name, {"max_abs_error": worst_err})

    def tolerance(self) -> tuple[float, float]:
        return (self.rtol, self.atol)

    def describe(self) -> str:
        return f"allclose(rtol={self.rtol:g}, atol={self.atol:g})"


class Reference(Policy):
    name = "reference"
    needs_reference64 = True

    def __init__(self, tol: float = 1e-4, multiplier: float = 3.0):
        self.tol, self.multiplier = tol, multiplier

    def check(self, ev: Evidence) -> Outcome:
        ref = ev.reference64() if ev.reference64 else None
        if ref is None:
            return AllClose(rtol=self.tol, atol=self.tol).check(ev)
        worst_ratio, worst_name, figures = -math.inf, None, {}
        for r_outs, a_outs, b_outs in zip(ref, ev.original, ev.candidate):
            for name, r, x, y in zip(ev.output_names, r_outs, a_outs, b_outs):
                if not r.is_floating_point():
                    continue
                rmse_orig = float(_rmse(x, r))
                rmse_new = float(_rmse(y, r))
                margin = rmse_new - (self.multiplier * rmse_orig + self.tol)
                if margin > worst_ratio:
                    worst_ratio, worst_name = margin, name
                    figures = {"rmse_vs_fp64_original": rmse_orig, "rmse_vs_fp64_candidate": rmse_new}
        ok = worst_ratio <= 0
        msg = (f"error vs fp64 {figures.get('rmse_vs_fp64_candidate', 0):.3g} <= {self.multiplier:g} x "
               f"{figures.get('rmse_vs_fp64_original', 0):.3g} + {self.tol:g}")
        if not ok:
            msg = f"output {worst_name!r}: " + msg.replace("<=", ">")
        figures["max_abs_error"] = max_abs_error(ev.original, ev.candidate, ev.output_names)[0]
        return Outcome(ok, msg, worst_name, figures)

    def tolerance(self) -> tuple[float, float]:
        return (self.tol * 10, self.tol * 10)

    def describe(self) -> str:
        return f"reference(tol={self.tol:g}, multiplier={self.multiplier:g})"


def _rmse(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return ((x.double() - r.double()) ** 2).mean().sqrt()


class Metric(Policy):
    """Bounds on quality metrics over the outputs named in ``output`` (default: the first one).

    ``min_cosine``: worst cosine similarity along the last dim (per token for [B,T,H] outputs);
    ``min_mean_cosine``: mean of those; ``min_top1``: argmax agreement along the last dim;
    ``fn``: a custom ``fn(original, candidate) -> dict[str, float]`` checked against ``bounds``
    (``{"name": (low, high)}``)."""

    name = "metric"

    def __init__(self, *, min_cosine: float | None = None, min_mean_cosine: float | None = None,
                 min_top1: float | None = None, output: str | None = None,
                 fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
                 bounds: dict[str, tuple[float | None, float | None]] | None = None):
        self.min_cosine, self.min_mean_cosine, self.min_top1 = min_cosine, min_mean_cosine, min_top1
        self.output, self.fn, self.bounds = output, fn, dict(bounds or {})

    def check(self, ev: Evidence) -> Outcome:
        idx = ev.output_names.index(self.output) if self.output in ev.output_names else 0
        name = ev.output_names[idx]
        a = torch.cat([o[idx].reshape(-1, o[idx].shape[-1]) for o in ev.original]) if ev.original else None
        b = torch.cat([o[idx].reshape(-1, o[idx].shape[-1]) for o in ev.candidate]) if ev.candidate else None
        figures = {}
        cos = _metrics.token_cosine(a, b)
        figures["worst_cosine"], figures["mean_cosine"] = cos["worst"], cos["mean"]
        figures["top1_agreement"] = _metrics.top1_agreement(a, b)
        if self.fn is not None:
            figures.update({k: float(v) for k, v in self.fn(a, b).items()})
        figures["max_abs_error"] = max_abs_error(ev.original, ev.candidate, ev.output_names)[0]
        bounds = dict(self.bounds)
        if self.min_cosine is not None:
            bounds["worst_cosine"] = (self.min_cosine, None)
        if self.min_mean_cosine is not None:
            bounds["mean_cosine"] = (self.min_mean_cosine, None)
        if self.min_top1 is not None:
            bounds["top1_agreement"] = (self.min_top1, None)
        for key, (lo, hi) in bounds.items():
            v = figures.get(key)
            if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
                return Outcome(False, f"{key} = {v} on output {name!r} is outside [{lo}, {hi}]", name, figures)
        return Outcome(True, ", ".join(f"{k}={figures[k]:.4g}" for k in bounds) or "metrics recorded", name, figures)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("min_cosine", self.min_cosine), ("min_mean_cosine", self.min_mean_cosine),
                                          ("min_top1", self.min_top1)) if v is not None]
        return f"metric({', '.join(parts)})"

    def tolerance(self) -> tuple[float, float]:
        return (1e-2, 1e-2)


class Equivalence(Policy):
    """``fn(original_ir, candidate_ir, inputs) -> bool | (bool, message) | dict`` decides."""

    name = "equivalence"

    def __init__(self, fn: Callable[..., Any], description: str = ""):
        self.fn, self.description = fn, description

    def check(self, ev: Evidence) -> Outcome:
        res = self.fn(ev.original_ir, ev.candidate_ir, ev.inputs)
        if isinstance(res, Outcome):
            return res
        if isinstance(res, tuple):
            return Outcome(bool(res[0]), str(res[1]))
        if isinstance(res, dict):
            return Outcome(bool(res.get("passed")), str(res.get("message", "")),
                           figures={k: v for k, v in res.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return Outcome(bool(res), self.description or getattr(self.fn, "__name__", "equivalence"))

    def describe(self) -> str:
        return f"equivalence({self.description or getattr(self.fn, '__name__', 'fn')})"


def exact() -> Policy:
    """Bit-identical outputs."""
    return Exact()


def allclose(rtol: float = 1e-5, atol: float = 1e-5) -> Policy:
    """``|new - orig| <= atol + rtol * |orig|`` elementwise, for every output."""
    return AllClose(rtol, atol)


def reference(tol: float = 1e-4, multiplier: float = 3.0) -> Policy:
    """Dynamo's rule against an fp64 run of the original graph."""
    return Reference(tol, multiplier)


def metric(**kwargs: Any) -> Policy:
    """Quality-metric bounds (see :class:`Metric`)."""
    return Metric(**kwargs)


def equivalence(fn: Callable[..., Any], description: str = "") -> Policy:
    """A function of (original_ir, candidate_ir, inputs) decides."""
    return Equivalence(fn, description)
