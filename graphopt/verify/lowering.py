"""The lowering check: the lowered artifact, run by its own runtime, against the graph it was
lowered from (compile's ``verify:lower`` phase).

Everything the check compares with is computed on the torch side first (:class:`LoweringCheck`:
reference outputs on the verifier's input sets, their fp64 run when the policy asks, the probes at
the smallest size of every dynamic dim); then the compile drops its torch graphs and opens the
artifact (:func:`verify_lowered`), so the runtime's copy of the weights never lives beside them.
A lowered program that refuses its smallest sizes has that dim's minimum raised in the manifest
(:func:`probe_minimum_sizes`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import InputError
from graphopt.ir.graph_ir import GraphIR
from graphopt.verify.policies import allclose
from graphopt.verify.verifier import Verifier


def lowering_policy(backend, ir: GraphIR):
    """How the lowered artifact is checked against the original graph.

    - a pass declared in ``ir.meta["lowering_check"]`` that the graph no longer computes in the
      original precision (the precision pass: ``{"policy": "reference", "tol": ..., "multiplier":
      ...}``): the artifact is held to that pass's own reference policy (error vs an fp64 run of
      the original), since an fp32 allclose cannot hold for an fp16 program;
    - a graph whose float outputs or weights are fp16/bf16 (a model converted with
      ``.to(torch.bfloat16)``): the same rule, RMS error vs fp64 <= 3 x the original's own + a floor
      of 1/64 ulp at 1 of the dtype (fp16 rounds at ~1e-3 and bf16 at ~8e-3 relative: a fixed 1e-4
      allclose fails any runtime that merely sums in another order, or runs a bf16 graph in fp32;
      the floor, 1.5e-5 fp16 / 1.2e-4 bf16, only matters where the original is exact);
    - otherwise the backend's allclose."""
    from graphopt.verify.policies import reference

    def half_dtypes(ir: GraphIR) -> set[torch.dtype]:  # fp16/bf16 among the outputs and weights
        from graphopt.ir.graph_ir import dtype_from_name

        found = {dtype_from_name(s.dtype) for s in ir.outputs if s.dtype in ("float16", "bfloat16")}
        gm = ir.graph_module
        return found | {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.dtype in (torch.float16, torch.bfloat16)}

    declared = ir.meta.get("lowering_check") or {}
    half = half_dtypes(ir)
    if declared.get("policy") == "reference":
        policy = reference(tol=float(declared.get("tol", 1e-4)), multiplier=float(declared.get("multiplier", 3.0)))
    elif declared.get("policy") == "metric":  # quantization: integer kernels may round a value to the next level
        from graphopt.verify.policies import metric

        policy = metric(min_cosine=float(declared.get("min_cosine", 0.999)))
    elif half:
        policy = reference(tol=max(torch.finfo(dt).eps for dt in half) / 64, multiplier=3.0)
    else:
        policy = allclose(rtol=backend.rtol, atol=backend.atol)
    if declared.get("padding_mask"):  # remove-padding: padded positions are zeros by design
        policy.ignoring_padding(declared["padding_mask"])
    return policy


def lowering_reference(verifier: Verifier, ir: GraphIR, inputs: list | None = None) -> list:
    """The outputs the lowered artifact must reproduce: the original graph's, unless a lossy pass
    verified by quality metrics (pruning) declared ``ir.meta["lowering_check"]["against"] =
    "optimized"``; then the optimized graph's own outputs (the pass already bounded its distance to
    the original). ``inputs``: one input set (default: the verifier's sets, a list of outputs each)."""
    optimized = (ir.meta.get("lowering_check") or {}).get("against") == "optimized"
    if inputs is not None:
        return (ir if optimized else verifier.original).run(inputs)
    return [ir.run(inp) for inp in verifier.input_sets] if optimized else verifier.original_outputs


class LoweringCheck:
    """What the lowered artifact is checked against, computed on the torch side BEFORE its runtime
    session opens: the reference outputs on the verifier's input sets (and their fp64 run when the
    policy asks for one), and the probes at the smallest size of every dynamic dim with the
    reference's outputs there. Once prepared, the compile drops its torch graphs (the optimized
    one and the verifier's, whose rewritten weights, e.g. merge-gemms' stacked ones, only they
    hold) so that the session's copy of the weights never lives beside them."""

    def __init__(self, backend, verifier: Verifier, ir: GraphIR):
        from graphopt.verify.kernels import verification_kernels

        t0 = time.perf_counter()
        with verification_kernels():
            self._prepare(backend, verifier, ir)
        #: seconds of each part of the check, for the report (see verify_lowered)
        self.timings = {"references_s": round(time.perf_counter() - t0, 3)}

    def _prepare(self, backend, verifier: Verifier, ir: GraphIR) -> None:
        from graphopt.verify.verifier import inputs_with_sizes, run_float64

        self.policy = lowering_policy(backend, ir)
        self.names = list(ir.output_names)
        self.input_names = list(ir.input_names)
        self.input_sets = verifier.input_sets
        want = lowering_reference(verifier, ir)
        self.want = [[t.detach() for t in outs] for outs in want]
        self.ref64 = verifier.reference64() if self.policy.needs_reference64 else None
        labels: dict[str, tuple[int, int]] = {}
        for spec in ir.inputs:
            for d, rng in spec.dynamic.items():
                if isinstance(spec.shape[d], str):
                    labels.setdefault(spec.shape[d], rng)
        #: (label, size, inputs, reference outputs or the exception the reference raised or None
        #: when not computed, fp64 outputs)
        self.probes: list[tuple[str, int, list, Any, Any]] = []
        large = bool(verifier.plan.get("large"))
        # large models: the other dims of a probe at 2 (not the example's sizes), so that each
        # reference forward (and the runtime's) reads a few tokens, not the example's batch
        small = {label: min(hi, max(lo, 2)) for label, (lo, hi) in labels.items()} if large else {}
        for label, (lo, hi) in labels.items():
            for size in range(lo, min(lo + 2, hi) + 1):
                inputs = inputs_with_sizes(ir, {**small, label: size}, seed=size)
                if large and size > lo and not isinstance(self.probes[-1][3], BaseException):
                    # a full forward each on a large model, needed only if the lowered program
                    # refuses the smaller size (rare): then this size is checked to run, not compared
                    self.probes.append((label, size, inputs, None, None))
                    continue
                try:
                    ref = lowering_reference(verifier, ir, inputs)
                except Exception as e:  # noqa: BLE001 - judged by the probe (a refused size, or raised)
                    ref, ref64 = e, None
                else:
                    ref64 = run_float64(verifier.original, inputs) if self.policy.needs_reference64 else None
                self.probes.append((label, size, inputs, ref, ref64))

    def views(self, input_sets: list, *output_sets: list) -> list:
        from graphopt.verify.policies import zero_padding

        if not self.policy.padding_mask:
            return list(output_sets)
        return [zero_padding(outs, input_sets, self.input_names, self.policy.padding_mask) for outs in output_sets]


def verify_lowered(backend, path: Path, manifest: dict, check: LoweringCheck) -> dict:
    load = getattr(backend, "load_for_verification", None) or backend.load  # backends not derived from Backend
    t0 = time.perf_counter()
    runner = load(path, manifest)
    timings = {**getattr(check, "timings", {}), "load_s": round(time.perf_counter() - t0, 3)}
    try:
        from graphopt.verify.policies import Evidence, max_abs_error

        policy, names = check.policy, check.names
        candidate = [runner.run(inp) for inp in check.input_sets]
        candidate = [[t.detach().cpu() for t in outs] for outs in candidate]
        want, candidate = check.views(check.input_sets, check.want, candidate)
        ref64 = None
        if check.ref64 is not None:
            ref64 = check.views(check.input_sets, check.ref64)[0]
        ev = Evidence(output_names=names, original=want, candidate=candidate,
                      reference64=(lambda: ref64) if policy.needs_reference64 else None)
        outcome = policy.check(ev)
        err = max_abs_error(want, candidate, names)[0]  # vs what it must reproduce (the pruned graph after pruning)
        record = {"policy": policy.label(), "passed": outcome.passed, "message": outcome.message,
                  "error_vs_original": err, "worst_output": outcome.worst_output,
                  "input_sets": len(check.input_sets),
                  "inputs": [[list(t.shape) for t in inp] for inp in check.input_sets]}
        timings["compare_s"] = round(time.perf_counter() - t0 - timings["load_s"], 3)
        if outcome.passed:
            t1 = time.perf_counter()
            record["narrowed"] = probe_minimum_sizes(runner, check, manifest)
            timings["probes_s"] = round(time.perf_counter() - t1, 3)
        record["timings"] = timings
        return record
    finally:
        runner.close()


def probe_minimum_sizes(runner, check: LoweringCheck, manifest: dict) -> list[str]:
    """Run the lowered program at the smallest size of each dynamic dim. A program that refuses a
    size (torch.export guards such as ``batch != 1``) or gets it wrong has that dim's minimum raised
    in the manifest, so the Engine rejects such inputs with a clear message instead of failing
    inside the runtime. Returns what was narrowed and why (the error's type and first line, or the
    check that failed), for the report notes.

    Only a refusal of the size narrows: what runtimes raise for a shape they cannot take
    (:class:`InputError` from graphopt's runners, torch guard and shape errors, ONNX Runtime's
    ``InvalidArgument`` / ``Fail`` / ``RuntimeException``). Anything else (out of memory, a closed
    or broken artifact, a bug: ``TypeError``, ``KeyError``, ...) propagates with a note saying
    which probe it happened in, rather than quietly shrinking the artifact's range."""
    from graphopt.errors import GraphoptError
    from graphopt.verify.policies import Evidence

    policy = check.policy

    def refuses_size(e: BaseException) -> bool:
        if isinstance(e, InputError):
            return True
        if isinstance(e, (GraphoptError, MemoryError, torch.OutOfMemoryError)):
            return False  # ArtifactError, RuntimeFailure, ResourceError, host or GPU memory
        if type(e).__module__.startswith("onnxruntime"):  # pybind exceptions derive from Exception only
            return type(e).__name__ in ("InvalidArgument", "Fail", "RuntimeException", "NotImplemented")
        return isinstance(e, (RuntimeError, AssertionError, ValueError, IndexError))

    def why(e: BaseException) -> str:
        return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]

    narrowed, done = [], set()
    for label, size, inputs, want, want64 in check.probes:
        if label in done:
            continue
        probe = f"while graphopt ran the lowered program at {label} = {size} (the smallest sizes it is checked at)"
        try:
            got = [t.detach().cpu() for t in runner.run(inputs)]
        except Exception as e:
            if not refuses_size(e):
                e.add_note(probe)
                raise
            narrowed.append(f"{label} >= {size + 1} (the lowered program rejects {label} = {size}: {why(e)})")
        else:
            if want is None:  # a large model's next size, reference not computed (LoweringCheck)
                done.add(label)
                narrowed[-1] += f"; it runs at {label} = {size} (outputs not compared there on a model this large)"
                continue
            if isinstance(want, BaseException):
                if not refuses_size(want):
                    want.add_note(f"while graphopt ran the original graph at {label} = {size} to check the lowered program")
                    raise want
                narrowed.append(f"{label} >= {size + 1} (the original graph itself fails at {label} = {size}: "
                                f"{why(want)})")
            else:
                want_, got_ = check.views([inputs], [want], [got])
                ref64 = check.views([inputs], [want64])[0] if want64 is not None else None
                outcome = policy.check(Evidence(check.names, want_, got_,
                                                reference64=(lambda ref64=ref64: ref64) if want64 is not None else None))
                if outcome.passed:
                    done.add(label)
                    continue
                narrowed.append(f"{label} >= {size + 1} (the lowered program computes {label} = {size} wrong: "
                                f"{policy.label()}: {outcome.message})")
        for spec in manifest["inputs"]:
            for d, rng in spec["dynamic"].items():
                if spec["shape"][int(d)] == label and rng[0] <= size:
                    rng[0] = size + 1
    return narrowed
