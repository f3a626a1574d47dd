"""prune: quality and speed of pruning the trained Shakespeare decoder (3.4M params, no fine-tuning).

Systems, all graphopt artifacts on the same target, timed side by side: the dense model
(``cleanup,fuse``, the baseline), structured pruning of attention heads (a KV head and its query
heads at a time) and of FFN channels at 10 / 25 / 50 %, unstructured 50 % by magnitude and by
Wanda, and 2:4 by magnitude and by Wanda. Wanda calibrates on 32 windows of 128 tokens from the
TRAINING split (the first 90 % of tinyshakespeare); perplexity is measured on the held-out last
10 %.

Quality: held-out perplexity (the first 64 non-overlapping windows of 128 tokens, as the sample's
README reports it: 39.5 dense), its ratio to the dense model, and mean logit cosine / top-1
agreement with the dense model on the timing batch. Speed: one forward of batch x seq tokens
(prefill), latency and tokens/s; speedup vs dense per interleaved round. Unstructured and 2:4
masks keep dense weights, so on a CPU they are not expected to run faster (2:4 needs sparse tensor
cores: the artifact records the pattern for TensorRT).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from bench.cases import Case
from bench.harness import (
    BASELINE,
    GRAPHOPT,
    BenchContext,
    BenchError,
    Candidate,
    CaseResult,
    System,
    run_latency,
    summarize,
)
from bench.systems import load_engine, numpy_inputs, widen_for_export

MODEL = "samples/models/shakespeare.py:build"
PREFIX = "cleanup,fuse"
DENSE = "dense (cleanup,fuse)"
_CALIB = "calib={data},calib_fraction=0.9,calib_samples=32,calib_seq=128,tokenizer={tok}"


def pipelines(calib: str) -> dict[str, str]:
    """label → pipeline text; the first is the dense baseline."""
    out = {DENSE: "cleanup,fuse"}
    for structure in ("heads", "channels"):
        for amount in (0.1, 0.25, 0.5):
            out[f"{structure} {int(amount * 100)}%"] = (
                f"cleanup,fuse,prune(structure={structure},amount={amount})"
            )
    out["unstructured 50% magnitude"] = "cleanup,fuse,prune(structure=unstructured,amount=0.5)"
    out["unstructured 50% wanda"] = (
        f"cleanup,fuse,prune(method=wanda,structure=unstructured,amount=0.5,{calib})"
    )
    out["2:4 magnitude"] = "cleanup,fuse,prune(structure=2:4)"
    out["2:4 wanda"] = f"cleanup,fuse,prune(method=wanda,structure=2:4,{calib})"
    return out


@dataclass
class Params:
    batch: int = 8
    seq_len: int = 128
    ppl_windows: int = 64
    warmup: int = 3
    iters: int = 20


class Scored:
    """What a system's output is compared by: its logits on the timing batch and its held-out
    perplexity (measured once, when the system was built)."""

    def __init__(self, logits: torch.Tensor, ppl: float, params: int | None):
        self.logits, self.ppl, self.params = logits, ppl, params

    def __eq__(self, other: object) -> bool:  # the harness's baseline-drift check
        return isinstance(other, Scored) and torch.equal(self.logits, other.logits) and self.ppl == other.ppl

    __hash__ = None  # type: ignore[assignment]


def run(ctx: BenchContext, p: Params) -> CaseResult:
    from graphopt.model_loader import load_factory
    from graphopt.verify.metrics import heldout_perplexity, token_cosine, top1_agreement

    try:
        model, inputs, dynamic = load_factory(MODEL, batch=p.batch, seq_len=p.seq_len)
        mod = _sample_module()
    except Exception as e:
        raise BenchError(f"the trained Shakespeare model is not available: {e}") from e
    heldout = mod.heldout_ids()
    calib = _CALIB.format(data=mod.DATA_PATH, tok=mod.TOKENIZER)

    def graphopt_system(name: str, engine: Any) -> System:
        feed = numpy_inputs(inputs, engine.input_names)
        flat = engine.bind(**feed)
        idx = engine.output_names.index("logits") if "logits" in engine.output_names else 0

        def forward(ids: torch.Tensor) -> torch.Tensor:
            return engine(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"]

        ppl = heldout_perplexity(forward, heldout, window=128, max_windows=p.ppl_windows)
        params = _params(engine)
        sys_ = System(
            name,
            lambda: engine.runner.run(flat),
            extract=lambda outs: Scored(outs[idx].float().cpu(), ppl, params),
        )
        sys_.info["heldout_ppl"] = round(ppl, 3)
        return sys_

    dense_ppl: dict[str, float] = {}

    def quality(ref: Scored, out: Scored) -> dict[str, Any]:
        dense_ppl.setdefault("ppl", ref.ppl)
        cos = token_cosine(ref.logits, out.logits)
        return {
            "heldout_ppl": round(out.ppl, 2),
            "ppl_vs_dense": round(out.ppl / ref.ppl, 3),
            "logit_cos_mean": round(cos["mean"], 4),
            "top1_vs_dense": round(top1_agreement(ref.logits, out.logits), 4),
            "params": out.params,
        }

    cands = _candidates(ctx, pipelines(calib), model, inputs, dynamic, graphopt_system)
    base_name = cands[0].name
    systems, notes = run_latency(
        ctx, cands, quality=quality, warmup=p.warmup, iters=p.iters, group="shakespeare"
    )
    tokens = p.batch * p.seq_len
    for s in systems:
        if s.samples_s:
            st = summarize([tokens / t for t in s.samples_s])
            s.throughput = {"unit": "tokens/s", "median": st["median"], "p10": st["p10"], "p90": st["p90"]}
    settings = {
        "model": MODEL,
        "batch": p.batch,
        "seq_len": p.seq_len,
        "forward_tokens": tokens,
        "ppl": f"held-out, first {p.ppl_windows} windows of 128 tokens",
        "warmup": ctx.warmup if ctx.warmup is not None else p.warmup,
        "iters": ctx.iters if ctx.iters is not None else p.iters,
        "graphopt_targets": ctx.graphopt_targets,
        "calibration": "tinyshakespeare training split (first 90 %)",
    }
    notes = list(notes) + [
        "No fine-tuning after pruning: perplexity rises, as expected; structured rows trade it for speed.",
        "Unstructured and 2:4 rows keep dense weight matrices (zeros stored): no speedup is expected on a "
        "CPU; 2:4 is recorded in the artifact (manifest sparsity) for TensorRT's sparse-weights flag.",
    ]
    return CaseResult(
        "prune",
        CASE.title,
        "latency",
        settings,
        baselines={"shakespeare": base_name},
        systems=systems,
        notes=notes,
    )


def _candidates(
    ctx: BenchContext, pipes: dict[str, str], model: Any, inputs: Any, dynamic: Any, make_system: Any
) -> list[Candidate]:
    """One candidate per (pipeline, target). Every pipeline starts with ``cleanup,fuse``: that part is
    captured and run once (verified), and each system compiles ``prune(...)`` from a copy of it."""
    import graphopt

    shared: dict[str, Any] = {}

    def base() -> Any:
        if "ir" not in shared:
            ctx.log("capturing the trained decoder and running cleanup,fuse once ...")
            _, ir, _, _ = graphopt.optimize(model, widen_for_export(inputs, dynamic), PREFIX, dynamic=dynamic)
            shared["ir"] = ir
        return shared["ir"]

    out = []
    targets = ctx.graphopt_targets
    for i, (label, pipeline) in enumerate(pipes.items()):
        rest = pipeline[len(PREFIX) :].lstrip(",")
        for target in targets:
            name = label if len(targets) == 1 else f"{label} [{target}]"

            def build(
                name: str = name, rest: str = rest, target: str = target, pipeline: str = pipeline
            ) -> System:
                t0 = time.perf_counter()
                art = graphopt.compile(
                    base().copy(),
                    pipeline=rest,
                    target=target,
                    report=None,
                    out=ctx.workdir / "prune" / f"{_slug(name)}_{target}",
                )
                compile_s = time.perf_counter() - t0
                engine = load_engine(art.path, target, ctx)
                sys_ = make_system(name, engine)
                sys_.kind = BASELINE if name == out[0].name else GRAPHOPT
                sys_.close = engine.close
                ver = art.manifest.get("verification") or {}
                sys_.info.update(
                    compile_s=round(compile_s, 2),
                    target=target,
                    pipeline=pipeline,
                    verified=ver.get("passed"),
                )
                stats = (art.report.get("passes") or [{}])[-1].get("stats") or {}
                for key in ("units_removed", "units_total", "sparsity"):
                    if key in stats:
                        sys_.info[key] = stats[key]
                if art.manifest.get("sparsity"):
                    sys_.info["manifest sparsity"] = art.manifest["sparsity"]["pattern"]
                return sys_

            out.append(Candidate(name, build, BASELINE if i == 0 else GRAPHOPT))
    return out


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _sample_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "samples" / "models" / "shakespeare.py"
    name = "_bench_shakespeare_sample"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(spec)
        sys.modules[name] = m
        spec.loader.exec_module(m)
    return sys.modules[name]


def _params(engine: Any) -> int | None:
    """Parameter count after the last pass, from the artifact's report."""
    try:
        import json

        rep = json.loads((engine.path / "report.json").read_text())
        passes = rep.get("passes") or []
        return passes[-1].get("params_after") if passes else (rep.get("original") or {}).get("params")
    except Exception:
        return None


CASE = Case(
    name="prune",
    title="Pruning the trained Shakespeare decoder: quality and speed",
    measures="held-out perplexity and forward latency / tokens/s of the trained decoder pruned by heads and "
    "channels (10/25/50 %), unstructured 50 % (magnitude vs Wanda) and 2:4, vs the dense model",
    params=Params,
    run=run,
    quick={"warmup": 1, "iters": 3, "ppl_windows": 16},
)
