"""minilm: sentence-embedding latency of all-MiniLM-L6-v2 (real weights), batch 8 x 128 tokens.

Systems, side by side in one process: torch eager (the baseline), ``torch.compile`` (inductor),
ONNX Runtime on a plain ``torch.onnx.export`` (dynamo exporter, same dynamic dims as graphopt:
the natural peer), ONNX Runtime after ``onnxruntime.transformers.optimizer`` (bert, 12 heads,
hidden 384), that plus ``quantize_dynamic`` int8, and every pipeline in GRAPHOPT_PIPELINES compiled
by graphopt (onnx target on CPU; torch target, and onnx on ORT CUDA when present, on CUDA).

Quality, against torch eager fp32 ``last_hidden_state`` over the non-padded tokens only (padded
positions carry no meaning): max abs error, and worst / mean per-token cosine similarity.

Floor: one forward of B x T tokens. FLOPs = 2 x (encoder linear weights) x B·T + 2 x (pooler
weights) x B + attention 4 x layers x B x T² x hidden (QKᵀ and AV, bidirectional). Bytes = the
weights read once (embedding tables excepted: only the used rows) + the token embeddings and the
``last_hidden_state`` output once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.cases import Case
from bench.floor import floor_of, linear_weights, weight_bytes
from bench.harness import BASELINE, BenchContext, Candidate, CaseResult, SkipSystem, System, run_latency
from bench.systems import (
    graphopt_candidates,
    numpy_inputs,
    on_device,
    onnx_export,
    ort_quantize_dynamic,
    ort_system,
    ort_transformers_optimize,
    to_device,
    torch_compiled,
    torch_eager,
)

MODEL = "samples/models/minilm.py:build"

#: label → pipeline text. Add a line to benchmark a pipeline; one whose passes are not registered
#: yet shows up in the results as skipped, with the reason.
GRAPHOPT_PIPELINES = {
    "graphopt cleanup": "cleanup",
    "graphopt cleanup,fuse": "cleanup,fuse",
    # opt-in: per-token work on the real tokens only (padded outputs become 0)
    "graphopt cleanup,fuse,remove-padding": "cleanup,fuse,remove-padding",
}

OUTPUT_NAMES = ["last_hidden_state", "pooler_output"]


@dataclass
class Params:
    batch: int = 8
    seq_len: int = 128
    warmup: int = 3
    iters: int = 30


def run(ctx: BenchContext, p: Params) -> CaseResult:
    from graphopt.model_loader import load_factory
    from graphopt.verify.metrics import token_cosine

    model, inputs, dynamic = load_factory(MODEL, batch=p.batch, seq_len=p.seq_len)
    dev_model = on_device(model, ctx.device)  # exports and graphopt capture the CPU model
    dev_inputs = to_device(inputs, ctx.device)
    keep = inputs["attention_mask"].bool()  # [B, T]: the real (non-padded) tokens
    cfg = model.config
    work: Path = ctx.workdir / "minilm"
    notes: list[str] = []

    def from_torch(out: Any) -> torch.Tensor:
        return out["last_hidden_state"].float().cpu()

    def from_numpy(outs: list) -> torch.Tensor:
        return torch.from_numpy(outs[0]).float()

    def quality(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
        r, o = ref[keep], out[keep]
        cos = token_cosine(r, o)
        return {"max_abs_err": float((r.double() - o.double()).abs().max()),
                "cos_worst": cos["worst"], "cos_mean": cos["mean"]}

    # The ONNX Runtime peers build on each other: export once, optimize once.
    cache: dict[str, Any] = {}

    def exported() -> Path:
        if "plain" not in cache:
            cache["plain"] = onnx_export(model, inputs, dynamic, work / "plain" / "model.onnx",
                                         output_names=OUTPUT_NAMES)
        return cache["plain"]

    def optimized() -> tuple[Path, dict[str, int]]:
        if "opt" not in cache:
            dst = work / "ort_opt" / "model.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            stats = ort_transformers_optimize(exported(), dst, model_type="bert", num_heads=cfg.num_attention_heads,
                                              hidden_size=cfg.hidden_size, use_gpu=ctx.device == "cuda")
            cache["opt"] = (dst, stats)
            if not stats.get("Attention") and not stats.get("MultiHeadAttention"):
                notes.append(f"onnxruntime.transformers.optimizer fused 0 Attention nodes on the torch.onnx "
                             f"(dynamo) export; what it did fuse: {_fmt_counts(stats)}")
        return cache["opt"]

    def ort_plain() -> System:
        return ort_system("ORT (torch.onnx export)", exported(), inputs, ctx, extract=from_numpy)

    def ort_opt() -> System:
        path, stats = optimized()
        s = ort_system("ORT + transformers optimizer", path, inputs, ctx, extract=from_numpy)
        s.info["fused"] = stats
        s.info["attention_fused"] = stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0)
        return s

    def ort_int8() -> System:
        if ctx.device == "cuda":
            raise SkipSystem("quantize_dynamic emits integer ops that ONNX Runtime runs on the CPU only")
        path, _ = optimized()
        q = ort_quantize_dynamic(path, work / "ort_int8" / "model.onnx")
        s = ort_system("ORT + optimizer + int8 dynamic", q, inputs, ctx, extract=from_numpy)
        s.info["quantization"] = "QInt8 weights per tensor, dynamic activations, no pre-processing"
        return s

    def graphopt_system(name: str, engine: Any) -> System:
        feed = dev_inputs if engine.target == "torch" else numpy_inputs(inputs, engine.input_names)
        flat = engine.bind(**feed)
        index = engine.output_names.index("last_hidden_state") if "last_hidden_state" in engine.output_names else 0
        return System(name, lambda: engine.runner.run(flat), extract=lambda outs: outs[index].float().cpu())

    work.mkdir(parents=True, exist_ok=True)
    candidates = [
        Candidate("torch eager", lambda: torch_eager("torch eager", dev_model, dev_inputs, kind=BASELINE,
                                                     extract=from_torch), BASELINE),
        Candidate("torch.compile (inductor)", lambda: torch_compiled("torch.compile (inductor)", dev_model, dev_inputs,
                                                                     extract=from_torch)),
        Candidate("ORT (torch.onnx export)", ort_plain),
        Candidate("ORT + transformers optimizer", ort_opt),
        Candidate("ORT + optimizer + int8 dynamic", ort_int8),
        *graphopt_candidates(ctx, GRAPHOPT_PIPELINES, model, inputs, dynamic, graphopt_system, case="minilm"),
    ]

    floor = minilm_floor(model, p.batch, inputs["input_ids"].shape[1], ctx.rates())
    systems, run_notes = run_latency(ctx, candidates, quality=quality, warmup=p.warmup, iters=p.iters,
                                     floor_s=floor["time_s"], group="minilm")
    tokens = int(keep.sum())
    settings = {"model": MODEL, "batch": p.batch, "seq_len": int(inputs["input_ids"].shape[1]),
                "real_tokens": tokens, "padded_tokens": int(keep.numel()) - tokens,
                "warmup": ctx.warmup if ctx.warmup is not None else p.warmup,
                "iters": ctx.iters if ctx.iters is not None else p.iters,
                "graphopt_pipelines": GRAPHOPT_PIPELINES, "graphopt_targets": ctx.graphopt_targets,
                "quality_reference": "torch eager fp32 last_hidden_state, non-padded tokens"}
    return CaseResult("minilm", CASE.title, "latency", settings, baselines={"minilm": "torch eager"},
                      systems=systems, floors={"minilm": floor}, notes=notes + run_notes)


def minilm_floor(model: torch.nn.Module, batch: int, seq: int, rates: dict[str, Any]) -> dict[str, Any]:
    cfg = model.config
    tokens = batch * seq
    enc = linear_weights(model.encoder)
    pool = linear_weights(model.pooler) if getattr(model, "pooler", None) is not None else 0
    attn = 4.0 * cfg.num_hidden_layers * batch * seq * seq * cfg.hidden_size
    flops = 2.0 * enc * tokens + 2.0 * pool * batch + attn
    act = 2 * tokens * cfg.hidden_size * 4  # token embeddings in, last_hidden_state out
    fl = floor_of([(flops, weight_bytes(model) + act)], rates)
    fl["formula"] = ("FLOPs = 2*encoder_linear_weights*B*T + 2*pooler*B + 4*layers*B*T^2*hidden; "
                     "bytes = weights (no embedding tables) + B*T*hidden*4 in and out")
    return fl


def _fmt_counts(stats: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items()) or "nothing"


CASE = Case(
    name="minilm", title="MiniLM-L6 sentence embeddings: latency and quality",
    measures="all-MiniLM-L6-v2 forward latency (batch 8 x 128): torch eager, torch.compile, ONNX Runtime "
             "(plain export, transformers optimizer, int8) vs graphopt pipelines; error and cosine vs eager",
    params=Params, run=run, quick={"warmup": 1, "iters": 2},
)
