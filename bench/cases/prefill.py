"""prefill: one forward over a whole prompt of the 31.8M tiny Llama (GQA, RoPE, RMSNorm, SwiGLU).

The prompt-processing half of LLM inference (the decode case times the other half). Batch 4 x 128
tokens by default, every token real (no padding), random weights from ``hf_llama.build(seed=0)``
with the decode case's config, eager attention.

Systems, side by side in one process: HF eager (the baseline), ``torch.compile`` (inductor), ONNX
Runtime on a plain ``torch.onnx.export`` (same dynamic dims), and every pipeline in
GRAPHOPT_PIPELINES compiled by graphopt (onnx target on CPU; torch and onnx on CUDA).

Quality, against eager fp32 logits: max abs error and top-1 agreement over every position.

Floor: FLOPs = 2 x (body linear weights + lm_head) x B·T + causal attention 2 x layers x B x T² x
(heads x head_dim); bytes = the weights read once (embedding table excepted) + the logits written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.cases import Case
from bench.cases.decode import TINY_LLAMA, TINY_LLAMA_PARAMS
from bench.floor import floor_of, linear_weights, weight_bytes
from bench.harness import BASELINE, BenchContext, BenchError, Candidate, CaseResult, System, run_latency
from bench.systems import (
    graphopt_candidates,
    numpy_inputs,
    on_device,
    onnx_export,
    ort_system,
    to_device,
    torch_compiled,
    torch_eager,
)

MODEL = "samples/models/hf_llama.py:build"

#: label → pipeline text (see the minilm case).
GRAPHOPT_PIPELINES = {
    "graphopt cleanup": "cleanup",
    "graphopt cleanup,fuse": "cleanup,fuse",
}


@dataclass
class Params:
    batch: int = 4
    seq_len: int = 128
    warmup: int = 2
    iters: int = 20


def run(ctx: BenchContext, p: Params) -> CaseResult:
    from graphopt.model_loader import load_factory
    from graphopt.verify.metrics import top1_agreement

    model, inputs, dynamic = load_factory(MODEL, **TINY_LLAMA, max_position_embeddings=max(256, p.seq_len),
                                          batch=p.batch, seq_len=p.seq_len)
    n = sum(q.numel() for q in model.parameters())
    if abs(n - TINY_LLAMA_PARAMS) > 0.01 * TINY_LLAMA_PARAMS:
        raise BenchError(f"the tiny-Llama config has {n:,} parameters, expected ~31.8M; check TINY_LLAMA")
    g = torch.Generator().manual_seed(1234)  # fresh random tokens, not the factory's
    inputs = {"input_ids": torch.randint(0, TINY_LLAMA["vocab_size"], (p.batch, p.seq_len), generator=g),
              "attention_mask": torch.ones(p.batch, p.seq_len, dtype=torch.int64)}
    dev_model = on_device(model, ctx.device)
    dev_inputs = to_device(inputs, ctx.device)
    work: Path = ctx.workdir / "prefill"
    work.mkdir(parents=True, exist_ok=True)

    def from_torch(out: Any) -> torch.Tensor:
        return out["logits"].float().cpu()

    def from_numpy(outs: list) -> torch.Tensor:
        return torch.from_numpy(outs[0]).float()

    def quality(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
        return {"max_abs_err": float((ref.double() - out.double()).abs().max()),
                "top1_agreement": top1_agreement(ref, out)}

    def ort_plain() -> System:
        path = onnx_export(model, inputs, dynamic, work / "plain" / "model.onnx", output_names=["logits"])
        return ort_system("ORT (torch.onnx export)", path, inputs, ctx, extract=from_numpy)

    def graphopt_system(name: str, engine: Any) -> System:
        feed = dev_inputs if engine.target == "torch" else numpy_inputs(inputs, engine.input_names)
        flat = engine.bind(**feed)
        index = engine.output_names.index("logits") if "logits" in engine.output_names else 0
        return System(name, lambda: engine.runner.run(flat), extract=lambda outs: outs[index].float().cpu())

    candidates = [
        Candidate("torch eager", lambda: torch_eager("torch eager", dev_model, dev_inputs, kind=BASELINE,
                                                     extract=from_torch), BASELINE),
        Candidate("torch.compile (inductor)", lambda: torch_compiled("torch.compile (inductor)", dev_model,
                                                                     dev_inputs, extract=from_torch)),
        Candidate("ORT (torch.onnx export)", ort_plain),
        *graphopt_candidates(ctx, GRAPHOPT_PIPELINES, model, inputs, dynamic, graphopt_system, case="prefill"),
    ]
    floor = prefill_floor(model, p.batch, p.seq_len, ctx.rates())
    systems, notes = run_latency(ctx, candidates, quality=quality, warmup=p.warmup, iters=p.iters,
                                 floor_s=floor["time_s"], group="prefill")
    settings = {"model": MODEL, "config": TINY_LLAMA, "parameters": n, "batch": p.batch, "seq_len": p.seq_len,
                "warmup": ctx.warmup if ctx.warmup is not None else p.warmup,
                "iters": ctx.iters if ctx.iters is not None else p.iters,
                "graphopt_pipelines": GRAPHOPT_PIPELINES, "graphopt_targets": ctx.graphopt_targets,
                "quality_reference": "torch eager fp32 logits, every position"}
    return CaseResult("prefill", CASE.title, "latency", settings, baselines={"prefill": "torch eager"},
                      systems=systems, floors={"prefill": floor}, notes=notes)


def prefill_floor(model: torch.nn.Module, batch: int, seq: int, rates: dict[str, Any]) -> dict[str, Any]:
    cfg = model.config
    tokens = batch * seq
    lin = linear_weights(model)  # body + lm_head
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = 2.0 * cfg.num_hidden_layers * batch * seq * seq * cfg.num_attention_heads * head_dim  # causal half
    flops = 2.0 * lin * tokens + attn
    act = tokens * cfg.vocab_size * 4
    fl = floor_of([(flops, weight_bytes(model) + act)], rates)
    fl["formula"] = ("FLOPs = 2*linear_weights*B*T + 2*layers*B*T^2*heads*head_dim (causal); "
                     "bytes = weights (no embedding table) + B*T*vocab*4 logits")
    return fl


CASE = Case(
    name="prefill", title="Tiny Llama prefill (prompt processing) latency",
    measures="31.8M tiny Llama forward over batch 4 x 128 prompt tokens: torch eager, torch.compile, ONNX Runtime "
             "(plain export) vs graphopt pipelines; error and top-1 agreement vs eager",
    params=Params, run=run, quick={"warmup": 1, "iters": 2, "batch": 1, "seq_len": 32},
)
