"""compile: how long graphopt takes to compile each sample model, and what verification costs.

For every (model, pipeline in GRAPHOPT_PIPELINES, target) and every round, two compiles run back to
back in the same process: verified (the default) and ``--no-verify``. Each is split into

- capture: ``graphopt.capture`` timed here (the captured GraphIR is then handed to ``compile``);
- passes: the sum of the per-pass ``time_s`` in ``report.json``;
- verification: the sum of the per-pass ``verify.time_s``;
- lowering: ``lowering.time_s``;
- lowering verification + reference runs (derived): what the verified compile spends outside the
  phases above, minus the same residue of the unverified compile (running the original graph on
  the verification inputs, running the lowered artifact on them, comparing);
- writing: the unverified compile's residue (example outputs, report, checksums, atomic rename).

Verification cost = (verified - unverified) / verified, per round (paired), then the median; and
the same share from the verified compile's own phases ((verification + lowering verification) /
total), which drift between the two compiles cannot swamp.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any

from bench.cases import Case
from bench.harness import BenchContext, CaseResult, first_line, paired_ratio, summarize
from bench.systems import unregistered_passes

#: label → pipeline text. Add a line to time a pipeline; one whose passes are not registered yet is
#: listed in the results as skipped, with the reason.
GRAPHOPT_PIPELINES = {
    "cleanup": "cleanup",
    "cleanup,fuse": "cleanup,fuse",
}

MODELS = {
    "nanogpt": "samples/models/nanogpt.py:build",
    "hf_llama": "samples/models/hf_llama.py:build",
    "hf_gpt2": "samples/models/hf_gpt2.py:build",
    "minilm": "samples/models/minilm.py:build",
}

PHASES = ["capture", "passes", "verification", "lowering", "lowering_verification", "writing"]


@dataclass
class Params:
    models: str = "nanogpt,hf_llama,hf_gpt2,minilm"
    rounds: int = 3
    warmup: int = 1  # untimed compiles first: the process's first export/lowering pays one-time costs


def compile_once(module: Any, inputs: Any, dynamic: Any, pipeline: str, target: str, out: Any,
                 verify: bool) -> dict[str, float]:
    import graphopt

    t0 = time.perf_counter()
    ir = graphopt.capture(module, inputs, dynamic)
    capture = time.perf_counter() - t0
    t1 = time.perf_counter()
    art = graphopt.compile(ir, pipeline=pipeline, target=target, out=out, verify=verify, report=None)
    wall = time.perf_counter() - t1
    rep = art.report
    passes = sum(r.get("time_s") or 0.0 for r in rep["passes"])
    ver = sum(((r.get("verify") or {}).get("time_s") or 0.0) for r in rep["passes"])
    lowering = (rep.get("lowering") or {}).get("time_s") or 0.0
    sample = {"capture": capture, "passes": passes, "verification": ver, "lowering": lowering,
              "residue": max(0.0, wall - passes - ver - lowering), "total": capture + wall,
              "nodes_before": rep["original"].get("nodes"),
              "nodes_after": rep["passes"][-1].get("nodes_after") if rep["passes"] else rep["original"].get("nodes")}
    shutil.rmtree(art.path, ignore_errors=True)
    return sample


def run(ctx: BenchContext, p: Params) -> CaseResult:
    from graphopt.model_loader import load_factory

    rounds = ctx.iters if ctx.iters is not None else p.rounds
    names = [m.strip() for m in p.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown} for the compile case; known: {', '.join(MODELS)}")
    result = CaseResult("compile", CASE.title, "compile", {
        "models": {n: MODELS[n] for n in names}, "rounds": rounds, "graphopt_pipelines": GRAPHOPT_PIPELINES,
        "targets": ctx.graphopt_targets, "verification_inputs": "example inputs + 1 random set (compile default)"})

    pipelines = {}
    for label, text in GRAPHOPT_PIPELINES.items():
        missing = unregistered_passes(text)
        if missing:
            result.rows.append({"model": "all models", "pipeline": label, "status": "skipped",
                                "note": f"pass(es) {', '.join(missing)} not registered yet"})
        else:
            pipelines[label] = text
    models = {}
    for n in names:
        try:
            models[n] = load_factory(MODELS[n])
        except Exception as e:
            result.rows.append({"model": n, "pipeline": "all pipelines", "status": "failed", "note": first_line(e)})

    jobs = [(m, label, target) for m in models for label in pipelines for target in ctx.graphopt_targets
            if ctx.wanted(f"{m} {label}")]
    samples: dict[tuple, dict[bool, list[dict]]] = {j: {True: [], False: []} for j in jobs}
    errors: dict[tuple, str] = {}
    warmup = ctx.warmup if ctx.warmup is not None else p.warmup
    for w in range(warmup if jobs else 0):
        m, label, target = jobs[0]
        ctx.log(f"warm-up compile {w + 1}/{warmup}: {m} / {label} / {target} (untimed)")
        try:
            compile_once(*models[m], pipelines[label], target, ctx.workdir / "compile" / f"warmup_{w}", False)
        except Exception as e:  # the timed rounds will report it
            ctx.log(f"  warm-up failed: {first_line(e)}")
    for r in range(rounds):
        for job in jobs:
            if job in errors:
                continue
            m, label, target = job
            module, inputs, dynamic = models[m]
            for verify in (True, False):  # back to back: drift hits both alike
                ctx.log(f"round {r + 1}/{rounds}: {m} / {label} / {target} ({'verified' if verify else '--no-verify'})")
                out = ctx.workdir / "compile" / f"{m}_{label.replace(',', '_')}_{target}_{int(verify)}_{r}"
                try:
                    samples[job][verify].append(compile_once(module, inputs, dynamic, pipelines[label], target,
                                                             out, verify))
                except Exception as e:
                    errors[job] = first_line(e)
                    ctx.log(f"  failed: {errors[job]}")
                    break

    for job in jobs:
        m, label, target = job
        row: dict[str, Any] = {"model": m, "pipeline": label, "target": target}
        if job in errors:
            row.update(status="failed", note=errors[job])
            result.rows.append(row)
            continue
        v, nv = samples[job][True], samples[job][False]
        n = min(len(v), len(nv))
        v, nv = v[:n], nv[:n]
        phases = {k: summarize([s[k] for s in v]) for k in ("capture", "passes", "verification", "lowering")}
        phases["lowering_verification"] = summarize([max(0.0, a["residue"] - b["residue"]) for a, b in zip(v, nv)])
        phases["writing"] = summarize([b["residue"] for b in nv])
        phases_nv = {k: summarize([s[k] for s in nv]) for k in ("capture", "passes", "lowering")}
        phases_nv["writing"] = phases["writing"]
        total_v = [s["total"] for s in v]
        total_nv = [s["total"] for s in nv]
        row.update(status="ok", rounds=n, nodes_before=v[0]["nodes_before"], nodes_after=v[0]["nodes_after"],
                   phases_s=phases, phases_unverified_s=phases_nv, total_verified_s=summarize(total_v), total_unverified_s=summarize(total_nv),
                   verified_over_unverified=paired_ratio(total_v, total_nv),
                   verification_fraction=summarize([(a - b) / a for a, b in zip(total_v, total_nv) if a > 0]),
                   # the same share from the verified compile's own phases: immune to the drift between
                   # the two compiles, which dominates the difference when verification is small
                   verification_fraction_phases=summarize(
                       [(a["verification"] + max(0.0, a["residue"] - b["residue"])) / a["total"]
                        for a, b in zip(v, nv) if a["total"] > 0]))
        result.rows.append(row)
    return result


CASE = Case(
    name="compile", title="graphopt compile time: capture, passes, verification, lowering",
    measures="compile time of each graphopt pipeline on nanogpt, hf_llama, hf_gpt2, minilm, split into "
             "capture / passes / verification / lowering / lowering verification, and verification's share",
    params=Params, run=run, quick={"rounds": 1, "warmup": 0},
)
