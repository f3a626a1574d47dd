"""Runs graphs on verification inputs and checks each pass against the ORIGINAL graph.

The original's outputs are computed once; each pass is compared against them with its policy,
and against the previous pass's outputs (for the report). When a check fails, the first
diverging node is located by running both graphs node by node.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx

from graphopt.ir.graph_ir import PROVENANCE, GraphIR, op_name
from graphopt.verify.kernels import verification_kernels
from graphopt.verify.policies import Evidence, Outcome, Policy, max_abs_error

log = logging.getLogger(__name__)


#: parameters from which verification runs the light plan (see :func:`verification_plan`)
LARGE_MODEL_PARAMS = 200_000_000
#: parameters from which long dims are set to a quarter of the example's size, not a half
QUARTER_LONG_DIMS_PARAMS = 1_000_000_000


def verification_plan(ir: GraphIR, n_random: int = 1) -> dict[str, Any]:
    """How many and which inputs verification runs every checked graph on. Every check is a
    forward of the whole model per input set, so on large models (``LARGE_MODEL_PARAMS`` and up)
    the sets are kept small: the ``n_random`` random sets only (the example's own sizes are what
    capture traced; a random set at other sizes exercises the dynamic dims), short dynamic dims
    (batch) one step away from the example's size, long ones (sequence, 8 and up) at half of it:
    every check's forward costs about its token count, and a different length exercises the dim as
    well as a longer one; from ``QUARTER_LONG_DIMS_PARAMS`` (1B) on at a quarter, at least 4: a
    1B model's check of 3 x 8 tokens is ~1.8 s on 2 CPU cores, of 3 x 4 ~1.1 s). Small models: the
    example plus the random sets, dims three steps away."""
    params = ir.param_count()
    large = params >= LARGE_MODEL_PARAMS
    return {"include_example": not large or n_random == 0, "step": 1 if large else 3, "n_random": n_random,
            "large": large, "halve_long_dims": large, "long_dim_divisor": 4 if params >= QUARTER_LONG_DIMS_PARAMS else 2}


def describe_inputs(sets: list[list[torch.Tensor]], names: list[str]) -> str:
    """``2 input sets: input_ids [2, 16], attention_mask [2, 16]; input_ids [5, 19], ...``"""
    shapes = "; ".join(", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, inp) if isinstance(t, torch.Tensor))
                       for inp in sets)
    return f"{len(sets)} input set{'s' if len(sets) != 1 else ''}: {shapes}"


def make_verification_inputs(ir: GraphIR, n_random: int = 1, seed: int = 0, *, include_example: bool = True,
                             step: int = 3, halve_long_dims: bool = False,
                             long_dim_divisor: int = 2) -> list[list[torch.Tensor]]:
    """The example inputs (unless ``include_example=False``) plus ``n_random`` fresh random sets
    (never zeros).

    Random sets vary every dynamic dim within its range (so dynamic shapes are exercised: ``step``
    more or fewer than the example, else one more, else the range's ends; with ``halve_long_dims``,
    dims of 8 and more are set to the example's size divided by ``long_dim_divisor`` (at least 4)
    instead), draw token-like integer
    inputs from the example's value range, keep mask-like inputs (only 0/1 values) as all-ones, and
    draw float inputs from a normal with the example's mean and std.
    """
    sets = [list(ir.example_inputs)] if include_example else []
    g = torch.Generator().manual_seed(seed)
    for k in range(n_random):
        sizes: dict[str, int] = {}
        for spec, ex in zip(ir.inputs, ir.example_inputs):
            for d, (lo, hi) in spec.dynamic.items():
                label = spec.shape[d] if isinstance(spec.shape[d], str) else f"{spec.name}.{d}"
                if label not in sizes:
                    cur = int(ex.shape[d])
                    floor = 4 if long_dim_divisor > 2 else 2
                    first = (max(cur // long_dim_divisor - k, floor),) if halve_long_dims and cur >= 8 else ()
                    choices = [s for s in (*first, cur + step + k, cur - step - k, cur + 1, hi, lo)
                               if lo <= s <= hi and s != cur and s >= 2]
                    sizes[label] = choices[0] if choices else cur
        new = []
        for spec, ex in zip(ir.inputs, ir.example_inputs):
            shape = list(ex.shape)
            for d in spec.dynamic:
                label = spec.shape[d] if isinstance(spec.shape[d], str) else f"{spec.name}.{d}"
                shape[d] = sizes[label]
            new.append(_random_like(ex, shape, g))
        sets.append(new)
    return sets


def inputs_with_sizes(ir: GraphIR, sizes: dict[str, int], seed: int = 0) -> list[torch.Tensor]:
    """Random inputs like the examples, with the dynamic dims labelled in ``sizes`` set to those
    sizes (e.g. ``{"batch": 1}``) and every other dim as in the example."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec, ex in zip(ir.inputs, ir.example_inputs):
        shape = list(ex.shape)
        for d in spec.dynamic:
            label = spec.shape[d] if isinstance(spec.shape[d], str) else f"{spec.name}.{d}"
            if label in sizes:
                shape[d] = sizes[label]
        out.append(_random_like(ex, shape, g))
    return out


def _random_like(ex: torch.Tensor, shape: list[int], g: torch.Generator) -> torch.Tensor:
    if ex.is_floating_point():
        std = float(ex.float().std()) if ex.numel() > 1 else 1.0
        mean = float(ex.float().mean()) if ex.numel() else 0.0
        return (torch.randn(shape, generator=g) * (std if std > 0 else 1.0) + mean).to(ex.dtype)
    if ex.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    values = torch.unique(ex)
    if values.numel() <= 2 and set(values.tolist()) <= {0, 1}:
        # mask-like (attention_mask, token_type_ids): keep the example's values where they fit
        fill = int(values.max()) if values.numel() else 1
        out = torch.full(shape, fill, dtype=ex.dtype)
        if values.numel() == 1:
            return out
        return torch.ones(shape, dtype=ex.dtype)
    lo, hi = int(ex.min()), int(ex.max())
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=ex.dtype)


_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def _up(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in _LOW_PRECISION:
        return x.double()
    if isinstance(x, torch.dtype) and x in _LOW_PRECISION:
        return torch.float64
    if isinstance(x, (list, tuple)):
        return type(x)(_up(v) for v in x)
    return x


class _Float64Interpreter(torch.fx.Interpreter):
    """Runs a graph with every floating tensor, parameter and dtype argument promoted to float64."""

    def get_attr(self, target, args, kwargs):
        return _up(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        return super().call_function(target, _up(args), {k: _up(v) for k, v in kwargs.items()})

    def call_method(self, target, args, kwargs):
        return super().call_method(target, _up(args), {k: _up(v) for k, v in kwargs.items()})


def run_float64(ir: GraphIR, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The graph run with every float tensor promoted to float64. Raises what the run raises (an op
    without a float64 kernel, say): the ``reference`` policy reports it and says which fallback it used."""
    with torch.no_grad():
        out = _Float64Interpreter(ir.graph_module).run(*[_up(x) for x in inputs])
    return list(out) if isinstance(out, (tuple, list)) else [out]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def record_values(ir: GraphIR, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    rec = _Recorder(ir.graph_module)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def first_divergence(original: GraphIR, candidate: GraphIR, inputs: list[torch.Tensor],
                     rtol: float = 1e-4, atol: float = 1e-4, pass_name: str | None = None) -> dict | None:
    """The first node (in the candidate's order) whose value differs from the original node of the
    same name beyond tolerance; else the first node the failing pass created."""
    try:
        a = record_values(original, inputs)
        b = record_values(candidate, inputs)
    except Exception as e:
        return {"node": None, "message": f"could not run graphs node by node: {e}"}
    for n in candidate.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or n.name not in a or n.name not in b:
            continue
        x, y = a[n.name], b[n.name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return _describe(n, f"shape/dtype changed: {tuple(x.shape)} {x.dtype} -> {tuple(y.shape)} {y.dtype}", math.inf)
        if x.is_floating_point():
            close = torch.allclose(y.double(), x.double(), rtol=rtol, atol=atol, equal_nan=True)
        else:
            close = torch.equal(x, y)
        if not close:
            err = float((x.double() - y.double()).abs().nan_to_num(nan=math.inf).max()) if x.numel() else 0.0
            return _describe(n, "differs from the original node of the same name", err)
    for n in candidate.graph.nodes:
        if pass_name and n.meta.get(PROVENANCE) == pass_name and n.op != "get_attr":
            return _describe(n, f"created by {pass_name!r}; no original node to compare with", None)
    return None


def _describe(n: torch.fx.Node, why: str, err: float | None) -> dict:
    return {"node": n.name, "op": op_name(n), "format": n.format_node(), "why": why,
            "provenance": n.meta.get(PROVENANCE, "capture"), "max_abs_error": err,
            "stack_trace": (n.meta.get("stack_trace") or "").strip().splitlines()[-2:]}


class Verifier:
    """Holds the original graph's outputs on the verification inputs; checks candidates."""

    def __init__(self, original: GraphIR, input_sets: list[list[torch.Tensor]], plan: dict[str, Any] | None = None):
        self.original = original
        self.input_sets = input_sets
        #: how the sets were made (:func:`verification_plan`): a rebase makes its new sets the same way
        self.plan = plan or {"include_example": True, "step": 3, "n_random": max(len(input_sets) - 1, 1)}
        with verification_kernels():
            self.original_outputs = [original.run(inp) for inp in input_sets]
        self.previous = self.original_outputs
        # After a lossy pass (a Metric policy: pruning, quantization) has been accepted, later
        # closeness policies (exact, allclose) hold each pass to the graph before it; Metric
        # policies keep judging quality against the original.
        self.baseline = self.original_outputs
        self._ref64: list[list[torch.Tensor]] | None = None
        self._ref64_done = False
        #: error vs original (and what it was checked against) of the last graph that passed: a
        #: pass that changes nothing inherits it (graphopt.instruments skips its check)
        self.last_record: dict = {"error_vs_original": 0.0, "input_sets": len(input_sets)}

    def reference64(self) -> list[list[torch.Tensor]] | None:
        """fp64 outputs of the original on every input set, computed once (weights promoted one op
        at a time, never an fp64 copy of the model). A failure is kept and raised again."""
        if not self._ref64_done:
            self._ref64_done = True
            try:
                self._ref64 = [run_float64(self.original, inp) for inp in self.input_sets]
            except Exception as e:  # noqa: BLE001 - kept and re-raised to every policy that asks
                log.info("the fp64 reference run of the original failed: %s", e)
                self._ref64_error = e
        if getattr(self, "_ref64_error", None) is not None:
            raise self._ref64_error
        return self._ref64

    def check(self, ir: GraphIR, policy: Policy, before: GraphIR | None = None) -> tuple[Outcome, dict]:
        """Check ``ir`` with ``policy``. ``before``: the graph the pass rewrote, which an
        :class:`Equivalence` policy compares with (it is linked to the original by the checks of
        the passes before it); the original when not given. Forwards run in
        :func:`~graphopt.verify.kernels.verification_kernels`."""
        with verification_kernels():
            return self._check(ir, policy, before)

    def _check(self, ir: GraphIR, policy: Policy, before: GraphIR | None) -> tuple[Outcome, dict]:
        from graphopt.verify.policies import Equivalence

        names = self.original.output_names
        if isinstance(policy, Equivalence):
            # the pass may change the calling convention: the policy's function drives both graphs
            ev = Evidence(output_names=names, original=self.original_outputs, candidate=[],
                          reference64=self.reference64, original_ir=before if before is not None else self.original,
                          candidate_ir=ir, inputs=self.input_sets)
            outcome = policy.check(ev)
            record = {"policy": policy.describe(), "passed": outcome.passed, "message": outcome.message,
                      "worst_output": outcome.worst_output, "error_vs_original": None, "error_vs_previous": None,
                      "figures": {k: _finite(v) for k, v in outcome.figures.items()},
                      "input_sets": len(self.input_sets)}
            if outcome.passed and (ir.input_names != self.original.input_names or ir.output_names != names):
                self.rebase(ir)
                record["rebased"] = True
            return outcome, record
        candidate = [ir.run(inp) for inp in self.input_sets]
        from graphopt.verify.policies import Metric, zero_padding

        lossy = isinstance(policy, Metric)
        want = self.original_outputs if lossy else self.baseline
        reference64 = self.reference64
        mask = policy.padding_mask or (ir.meta.get("padding_removed") or {}).get("mask")
        if mask:  # remove-padding ran (or runs now): only real tokens carry meaning
            names_in = self.original.input_names

            def pad(outs):
                return zero_padding(outs, self.input_sets, names_in, mask)

            want, candidate = pad(want), pad(candidate)
            reference64 = lambda: None if self.reference64() is None else pad(self.reference64())  # noqa: E731
        previous = None if lossy else (pad(self.previous) if mask else self.previous)
        ev = Evidence(output_names=names, original=want, candidate=candidate,
                      reference64=reference64, original_ir=self.original, candidate_ir=ir,
                      inputs=self.input_sets, previous=previous)
        outcome = policy.check(ev)
        same_arity = all(len(a) == len(b) for a, b in zip(self.original_outputs, candidate))
        orig_cmp, prev_cmp = self.original_outputs, self.previous
        if mask:
            orig_cmp, prev_cmp = pad(orig_cmp), pad(prev_cmp)
        err_orig = max_abs_error(orig_cmp, candidate, names)[0] if same_arity else None
        err_prev = max_abs_error(prev_cmp, candidate, names)[0] if same_arity else None
        record = {"policy": policy.label(), "passed": outcome.passed, "message": outcome.message,
                  "worst_output": outcome.worst_output, "error_vs_original": _finite(err_orig),
                  "error_vs_previous": _finite(err_prev), "figures": {k: _finite(v) for k, v in outcome.figures.items()},
                  "input_sets": len(self.input_sets)}
        if outcome.passed:
            self.previous = candidate
            if lossy:
                self.baseline = candidate
        if self.baseline is not self.original_outputs and not lossy:
            record["checked_against"] = "the graph after the last lossy pass"
        if outcome.passed:
            self.last_record = {k: record[k] for k in ("error_vs_original", "input_sets", "checked_against")
                                if k in record}
        return outcome, record

    def rebase(self, ir: GraphIR) -> None:
        """After a verified pass that changed the calling convention (kv-cache), later passes are
        compared with that pass's graph: the equivalence proof links it to the original."""
        log.info("verification now compares with the graph after the calling-convention change")
        self.original = ir.copy()
        self.input_sets = make_verification_inputs(self.original, n_random=max(self.plan["n_random"], 1),
                                                   include_example=self.plan["include_example"],
                                                   step=self.plan["step"],
                                                   halve_long_dims=self.plan.get("halve_long_dims", False),
                                                   long_dim_divisor=self.plan.get("long_dim_divisor", 2))
        with verification_kernels():
            self.original_outputs = [self.original.run(inp) for inp in self.input_sets]
        self.previous = self.baseline = self.original_outputs
        self._ref64, self._ref64_done, self._ref64_error = None, False, None


def _finite(x: float | None) -> float | str | None:
    if x is None:
        return None
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return x
