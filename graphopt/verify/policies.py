"""Verification policies: what "still computes the same thing" means for a pass.

Each policy compares the outputs of the graph after a pass with the outputs of the ORIGINAL
captured graph on the same inputs (the example inputs plus fresh random ones):

- ``exact()``                bit-identical outputs: rewrites that are exact by construction on any
                             dtype (dead-code elimination, integer-only changes);
- ``reference()``            the fp64 rule, for rewrites that are exact in real arithmetic but not in
                             floating point (fusions, reassociations, no-op removal, folding): against
                             an fp64 run of the original, per output and input set,
                             ``rms(new - r)  <= k * rms(orig - r)  + floor_rms`` and
                             ``max|new - r| <= k * max|orig - r| + floor_max``;
- ``allclose(rtol, atol)``   ``|new - orig| <= atol + rtol * |orig|`` (fixed tolerances: use
                             ``reference()`` unless the tolerances come from the problem itself);
- ``metric(...)``            bounds on quality metrics (cosine similarity, top-1 agreement) for
                             lossy passes such as quantization and pruning;
- ``equivalence(fn)``        a function decides, for passes that change the calling convention
                             (KV-cache insertion: greedy decoding must give the same tokens).

``policy.ignoring_padding("attention_mask")`` makes any of the first four compare real tokens only:
positions where that input is 0 are zeroed in both outputs first (the ``remove-padding`` pass
computes nothing there). Once such a pass ran, every later check does the same.

Why not fixed tolerances for fusions: an fp32 graph is not exact either. Its own error against the
fp64 result grows with depth, width, sequence length and the magnitude of real activations (a
24-layer model on real text has max errors of 1e-5 and more), and a fused kernel that sums in
another order has an error of the same size. ``allclose(1e-5, 1e-5)`` therefore fails correct
rewrites on real inputs, and a tolerance loose enough for the largest model lets real bugs through
on the small ones. The fp64 rule measures the noise the original itself makes on these very inputs
and allows ``k`` times that: it scales with the model, the inputs and the dtype (an fp16 graph's
own error is ~1e-3 relative, so its bound is too) without a number to tune.
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
    #: outputs of the graph before this pass (the last verified one), when the verifier provides
    #: them: :class:`Exact` then holds the pass to that graph, which is linked to the original by the
    #: checks before it (an exact pass after a fusion cannot be bit-identical to the original)
    previous: list[list[torch.Tensor]] | None = None


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
    """Bit-identical outputs (NaN equals NaN), for rewrites that are exact by construction on every
    dtype: dead-code elimination, integer-only changes. Compared with the graph before the pass when
    the verifier hands it over (``Evidence.previous``), else with the original."""

    name = "exact"

    def check(self, ev: Evidence) -> Outcome:
        want = ev.previous if ev.previous is not None else ev.original
        than = " to the graph before the pass" if ev.previous is not None else ""
        for outs_a, outs_b in zip(want, ev.candidate):
            for name, x, y in zip(ev.output_names, outs_a, outs_b):
                if x.shape != y.shape or x.dtype != y.dtype:
                    return Outcome(False, f"output {name!r} changed shape/dtype: "
                                          f"{tuple(x.shape)} {x.dtype} -> {tuple(y.shape)} {y.dtype}", name)
                if not _equal_nan(x, y):
                    err, _ = max_abs_error(want, ev.candidate, ev.output_names)
                    return Outcome(False, f"output {name!r} is not bit-identical{than} (max abs error {err:.3g})",
                                   name, {"max_abs_error": err})
        return Outcome(True, "bit-identical" + than, figures={"max_abs_error": 0.0})

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


#: ``k`` of the fp64 rule: a candidate may have this many times the original's own error (dynamo's
#: ``same(..., fp64_ref)`` uses 3 too). Measured with real text on MiniLM (batches 1 to 32), 24-layer
#: BERT and Llama shapes, fp32/fp16/bf16: correct cleanup and fusion passes stay at or under 1.1x
#: (RMS) and 1.4x (max); a dropped padding mask is 100x to 1e6x, an attention scale off by 1e-3 20x
#: to 1600x (wherever attention is not nearly uniform; where it is, no fp32 test can see it).
MULTIPLIER = 3.0
#: the floor of the fp64 rule in units of the output dtype's epsilon: ``ulps * eps * rms(r)`` for the
#: RMS rule and ``ulps * eps * max|r|`` for the max rule, i.e. one ulp of the output's scale. It
#: matters only where the original is (nearly) exact itself: a one-op graph whose result is
#: correctly rounded (0.5 ulp), a half-precision graph whose error is mostly the rounding of its
#: outputs (0.2 to 0.7 ulp RMS); larger, it would let a bf16 error of 2% through.
FLOOR_ULPS = 1.0
#: an output with fewer float elements than this (over all input sets) has a noisy own error (the
#: RMS of 4 samples can be 10x below their spread by chance): its ``k`` grows by sqrt(MIN_SAMPLES / n)
MIN_SAMPLES = 64
#: without an fp64 run (the original cannot run in float64): allclose with this ``rtol`` and an
#: ``atol`` of the same fraction of each output's RMS, per output dtype
FALLBACK_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class Reference(Policy):
    """The fp64 rule, for rewrites that are exact in real arithmetic (fusions, reassociations, no-op
    removal, constant folding) and for precision changes (with an explicit ``tol``).

    For every float output, with ``r`` the ORIGINAL graph run in float64, ``x`` the original's own
    outputs and ``y`` the candidate's, pooled over the input sets::

        rms(y - r)  <= k * rms(x - r)  + ulps * eps * rms(r) + tol
        max|y - r| <= k * max|x - r| + ulps * eps * max|r| + tol * max|r| / rms(r)

    ``k`` = ``multiplier`` (times sqrt(MIN_SAMPLES / n) for outputs of n < MIN_SAMPLES elements),
    ``eps`` the machine epsilon of the original output's dtype, so an fp16 graph is held to fp16
    noise by itself. Both rules: the RMS rule catches a small error spread over the whole output (an
    attention scale off by 1e-3), the max rule one confined to a few elements, which the RMS dilutes
    (a mask dropped in one padded row, one wrong head). ``tol`` is an absolute slack for the RMS
    rule (precision passes give a fraction of the outputs' RMS); the max rule gets the same slack
    relative to the output's scale.

    Outputs bit-identical to the original pass as such, without running the fp64 reference;
    integer and boolean outputs must be identical; NaN and infinities of the original must be
    reproduced exactly. When the original cannot run in float64, the check falls back to
    ``|y - x| <= t * |x| + t * rms(x) + tol`` with ``t`` = ``FALLBACK_TOL[dtype]`` and says so in
    its message, its figures (``fp64_reference = 0``) and its label.
    """

    name = "reference"
    needs_reference64 = True

    def __init__(self, tol: float = 0.0, multiplier: float = MULTIPLIER, *, ulps: float = FLOOR_ULPS):
        if tol < 0 or multiplier < 1 or ulps < 0:
            raise ValueError(f"reference(tol={tol}, multiplier={multiplier}, ulps={ulps}): need tol >= 0, "
                             "multiplier >= 1 and ulps >= 0")
        self.tol, self.multiplier, self.ulps = tol, multiplier, ulps
        #: the rule the last check fell back to when it had no fp64 run (None: it had one); label() shows it
        self.last_fallback: str | None = None

    def check(self, ev: Evidence) -> Outcome:
        self.last_fallback = None
        exact = _exact_part(ev)
        if exact is not None:
            return exact
        lossy = _after_lossy_pass(ev)
        if lossy:
            return self._fallback(ev, lossy)
        if any(x.dtype == torch.float64 for outs in ev.original for x in outs):
            return self._fallback(ev, "the graph computes in float64 already: an fp64 run is no more exact than it")
        try:
            ref = ev.reference64() if ev.reference64 else None
            why = "the original graph could not run in float64" if ev.reference64 else "no fp64 run was provided"
        except Exception as e:  # the reference run's own failure: reported in the outcome, never hidden
            first = (str(e).strip().splitlines() or [""])[0]
            ref, why = None, f"the float64 run of the original failed: {type(e).__name__}: {first}"
        if ref is None or any(outs is None for outs in ref):  # None: that input set could not run in fp64
            return self._fallback(ev, why)
        pooled: dict[str, _metrics.ReferenceErrors] = {}
        dtypes: dict[str, torch.dtype] = {}
        for r_outs, a_outs, b_outs in zip(ref, ev.original, ev.candidate):
            for name, r, x, y in zip(ev.output_names, r_outs, a_outs, b_outs):
                if r is None or not x.is_floating_point():
                    continue  # integers were compared exactly above
                pooled[name] = pooled.get(name, _metrics.ReferenceErrors()) + _metrics.reference_errors(r, x, y)
                dtypes[name] = x.dtype
        figures = {"max_abs_error": max_abs_error(ev.original, ev.candidate, ev.output_names)[0]}
        for name, e in pooled.items():
            if e.nonfinite_mismatch:
                return Outcome(False, f"output {name!r}: NaN/inf where the original has a finite value, or a "
                                      "finite value where the original has NaN/inf", name, figures)
        judged = [(self._judge(e, dtypes[name]), name, e) for name, e in pooled.items()]
        if not judged:
            return Outcome(True, "no float outputs; integer outputs identical", figures=figures)
        (ratio, k, rms_bound, max_bound), name, e = max(judged, key=lambda j: j[0][0])
        figures.update(rmse_vs_fp64_original=e.rms_orig, rmse_vs_fp64_candidate=e.rms_new,
                       max_vs_fp64_original=e.max_orig, max_vs_fp64_candidate=e.max_new,
                       rms_bound=rms_bound, max_bound=max_bound, bound_ratio=ratio, fp64_reference=1.0)
        floor_rms, floor_max = rms_bound - k * e.rms_orig, max_bound - k * e.max_orig
        rms_bad, max_bad = e.rms_new > rms_bound, e.max_new > max_bound
        parts = (f"rms {e.rms_new:.3g} {'>' if rms_bad else '<='} {k:.3g} x {e.rms_orig:.3g} + {floor_rms:.2g}, "
                 f"max {e.max_new:.3g} {'>' if max_bad else '<='} {k:.3g} x {e.max_orig:.3g} + {floor_max:.2g}")
        if ratio <= 1:
            return Outcome(True, f"error vs fp64 within {k:.3g} x the original's own: {parts} (worst: output "
                                 f"{name!r}, {ratio:.2f} of the bound)", name, figures)
        return Outcome(False, f"output {name!r}: error vs fp64 exceeds {k:.3g} x the original's own error "
                              f"({ratio:.3g} x the bound): {parts}", name, figures)

    def _judge(self, e: _metrics.ReferenceErrors, dtype: torch.dtype) -> tuple[float, float, float, float]:
        """``(ratio, k, rms_bound, max_bound)``: ratio = the larger of error / bound over both rules."""
        k = self.multiplier * max(1.0, math.sqrt(MIN_SAMPLES / max(e.count, 1)))
        eps = torch.finfo(dtype).eps
        crest = e.max_ref / e.rms_ref if e.rms_ref > 0 else 1.0
        rms_bound = k * e.rms_orig + self.ulps * eps * e.rms_ref + self.tol
        max_bound = k * e.max_orig + self.ulps * eps * e.max_ref + self.tol * crest
        return max(_ratio(e.rms_new, rms_bound), _ratio(e.max_new, max_bound)), k, rms_bound, max_bound

    def _fallback(self, ev: Evidence, why: str) -> Outcome:
        """No fp64 run: allclose with a tolerance from each output's dtype, scaled to its RMS."""
        worst_excess, worst_name, dtypes = -math.inf, None, set()
        for outs_a, outs_b in zip(ev.original, ev.candidate):
            for name, x, y in zip(ev.output_names, outs_a, outs_b):
                if not x.is_floating_point():
                    continue
                t = FALLBACK_TOL.get(x.dtype, FALLBACK_TOL[torch.float32])
                dtypes.add((str(x.dtype).removeprefix("torch."), t))
                excess = _allclose_excess(x, y, t, t * _rms(x) + self.tol)
                if excess > worst_excess:
                    worst_excess, worst_name = excess, name
        err = max_abs_error(ev.original, ev.candidate, ev.output_names)[0]
        rule = ", ".join(f"allclose(rtol={t:g}, atol={t:g} x RMS{f' + {self.tol:g}' if self.tol else ''}) for {d}"
                         for d, t in sorted(dtypes)) or "allclose"
        self.last_fallback = rule
        ok = worst_excess <= 0
        msg = (f"fp64 reference unavailable ({why}); checked with {rule} instead: max abs error {err:.3g} "
               + ("within it" if ok else f"exceeds it at output {worst_name!r}"))
        return Outcome(ok, msg, worst_name, {"max_abs_error": err, "fp64_reference": 0.0,
                                             "fallback_rtol": max((t for _, t in dtypes), default=0.0)})

    def tolerance(self) -> tuple[float, float]:
        return (self.tol * 10, self.tol * 10) if self.tol else (1e-4, 1e-5)

    def describe(self) -> str:
        tol = f"tol={self.tol:g}, " if self.tol else ""
        return f"reference({tol}multiplier={self.multiplier:g}, ulps={self.ulps:g})"

    def label(self) -> str:
        """``describe()`` (and the padding rule); after a check that had no fp64 run, also the
        allclose it fell back to, so the report table and the CLI line show it."""
        fell_back = f" [no fp64 run: {self.last_fallback}]" if self.last_fallback else ""
        return super().label() + fell_back


def _after_lossy_pass(ev: Evidence) -> str | None:
    """Why the fp64 run of the original cannot judge this candidate, or None. After a lossy pass
    (quantize, prune: they set ``ir.meta["lowering_check"]["against"] = "optimized"``) the verifier
    compares closeness policies with that pass's graph, whose distance to the original is the loss
    itself: ``k`` times it would let bugs of that size through."""
    meta = getattr(ev.candidate_ir, "meta", None) or {}
    if (meta.get("lowering_check") or {}).get("against") == "optimized":
        return ("a lossy pass ran before (its graph, not the original, is the reference now, and the fp64 run "
                "of the original measures the loss, not this pass's rounding)")
    return None


def _exact_part(ev: Evidence) -> Outcome | None:
    """What every closeness policy checks exactly: output count and shapes, and integer/bool outputs.
    Returns a failing Outcome, a passing one when every output is bit-identical, else None."""
    identical = True
    for si, (outs_a, outs_b) in enumerate(zip(ev.original, ev.candidate)):
        if len(outs_a) != len(outs_b):
            return Outcome(False, f"the graph has {len(outs_b)} outputs instead of {len(outs_a)}")
        for name, x, y in zip(ev.output_names, outs_a, outs_b):
            if x.shape != y.shape:
                return Outcome(False, f"output {name!r} changed shape {tuple(x.shape)} -> {tuple(y.shape)}", name)
            if not (x.is_floating_point() and y.is_floating_point()):
                if x.dtype != y.dtype or not torch.equal(x, y):
                    return Outcome(False, f"integer/bool output {name!r} differs (input set {si})", name)
                continue
            identical = identical and x.dtype == y.dtype and _equal_nan(x, y)
    if identical:
        return Outcome(True, "bit-identical", figures={"max_abs_error": 0.0})
    return None


def _ratio(value: float, bound: float) -> float:
    """value / bound, where 0 / 0 is 0 and anything else over 0 is inf."""
    if bound > 0:
        return value / bound
    return 0.0 if value <= 0 else math.inf


def _rms(x: torch.Tensor, chunk: int = 1 << 22) -> float:
    flat = x.detach().reshape(-1)
    total, n = 0.0, 0
    for i in range(0, flat.numel(), chunk):
        c = flat[i:i + chunk].double()
        c = c[torch.isfinite(c)]
        total, n = total + float(c.square().sum()), n + c.numel()
    return math.sqrt(total / n) if n else 0.0


def _allclose_excess(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float, chunk: int = 1 << 22) -> float:
    """max(|y - x| - (atol + rtol |x|)) over finite positions (inf where NaN/inf differ), chunked."""
    fx, fy = x.detach().reshape(-1), y.detach().reshape(-1)
    worst = -math.inf
    for i in range(0, fx.numel(), chunk):
        xd, yd = fx[i:i + chunk].double(), fy[i:i + chunk].double()
        finite = torch.isfinite(xd) & torch.isfinite(yd)
        if (~finite & ~((xd == yd) | (torch.isnan(xd) & torch.isnan(yd)))).any():
            return math.inf
        if finite.any():
            worst = max(worst, float(((xd - yd).abs() - (atol + rtol * xd.abs()))[finite].max()))
    return worst


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


def reference(tol: float = 0.0, multiplier: float = MULTIPLIER, *, ulps: float = FLOOR_ULPS) -> Policy:
    """The fp64 rule (see :class:`Reference`): RMS and max error vs an fp64 run of the original at
    most ``multiplier`` x the original's own, plus a floor of ``ulps`` of the output's scale (+ ``tol``)."""
    return Reference(tol, multiplier, ulps=ulps)


def metric(**kwargs: Any) -> Policy:
    """Quality-metric bounds (see :class:`Metric`)."""
    return Metric(**kwargs)


def equivalence(fn: Callable[..., Any], description: str = "") -> Policy:
    """A function of (original_ir, candidate_ir, inputs) decides."""
    return Equivalence(fn, description)
