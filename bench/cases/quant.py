"""quant: graphopt-quant on this CPU, against ONNX Runtime's own int8.

MiniLM-L6 (real weights, batch 8 x 128, the inputs of the ``minilm`` case: 245 real tokens, 779
padding): ONNX Runtime's ``quantize_dynamic`` int8 (on the transformers-optimized export, the
``minilm`` case's peer) is the baseline; graphopt fp32 (``cleanup,fuse``) and graphopt W8A8 static
(calibrated on tinyshakespeare lines of the training split, ``observer=auto``, accuracy guard
``min_cosine``) run beside it. Quality is always against torch eager fp32 ``last_hidden_state`` on
the real tokens (worst / mean token cosine).

Trained decoder (``samples/models/shakespeare.py``): held-out perplexity (the last 10 % of the text,
``heldout_perplexity``, 128-token windows) of fp32, W8A8 SmoothQuant and weight-only int4 (block 64)
and int8, calibrated on the training split only; decode tokens/s of each artifact (ONNX Runtime,
greedy, ``Engine.generate``, prefix recomputed every step: no KV cache) vs fp32.

``ort_profile_ms`` (ONNX Runtime's profiler, kernel ms per forward) and ``int8_kernels`` (ops in
ORT's optimized graph) show which integer kernels really run and where the time goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.cases import Case
from bench.harness import BASELINE, BenchContext, Candidate, CaseResult, System, run_latency
from bench.systems import (
    numpy_inputs,
    onnx_export,
    ort_quantize_dynamic,
    ort_system,
    ort_transformers_optimize,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MINILM = "samples/models/minilm.py:build"
SHAKESPEARE = "samples/models/shakespeare.py:build"
#: the quantization issue's bound on the mean token cosine (the worst one is ``min_cosine``)
MIN_MEAN_COSINE = 0.998


def cpu_has_vnni() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI): ONNX Runtime's u8s8 int8 GEMMs then need no 7-bit weights."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def minilm_pipeline(tokenizer: str, min_cosine: float, scheme: str = "w8a8") -> str:
    observer = "auto" if scheme == "w8a8" else "minmax"
    # reduce_range (7-bit weights) only where the AVX2 u8s8 kernels could saturate: without VNNI
    reduce = "false" if cpu_has_vnni() else "true"
    return (f"cleanup,fuse,calibrate(calib={DATA},tokenizer={tokenizer},text_mode=lines,text_end=0.9,"
            f"max_samples=64,batch_size=8,observer={observer}),"
            f"quantize(scheme={scheme},activations=uint8,reduce_range={reduce},min_cosine={min_cosine},"
            f"min_mean_cosine={MIN_MEAN_COSINE})")


def decoder_pipelines(calib_windows: int) -> dict[str, str]:
    cal = f"calibrate(calib={DATA},text_end=0.9,seq_len=128,max_samples={calib_windows},batch_size=4)"
    return {
        "fp32": "cleanup,fuse",
        "w8a8 smoothquant": f"cleanup,fuse,{cal},quantize(scheme=smoothquant,alpha=0.5,activations=uint8,"
                            "reduce_range=true,max_ppl_increase=0.02)",
        "int4 weight-only (block 64)": "cleanup,fuse,quantize(scheme=int4-weight,block_size=64)",
        "int8 weight-only": "cleanup,fuse,quantize(scheme=int8-weight)",
    }


@dataclass
class Params:
    batch: int = 8
    seq_len: int = 128
    warmup: int = 3
    iters: int = 12
    min_cosine: float = 0.99
    decoder: bool = True
    ppl_windows: int = 64
    calib_windows: int = 32
    decode_tokens: int = 32


def run(ctx: BenchContext, p: Params) -> CaseResult:
    import graphopt
    from graphopt.model_loader import load_factory
    from graphopt.verify.metrics import token_cosine
    from samples.models.minilm import model_dir

    model, inputs, dynamic = load_factory(MINILM, batch=p.batch, seq_len=p.seq_len)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        eager = model(**inputs)["last_hidden_state"].float()
    work = ctx.workdir / "quant"
    work.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    notes: list[str] = []

    def quality(_ref: Any, out: torch.Tensor) -> dict[str, float]:
        cos = token_cosine(eager[keep], out[keep])
        return {"cos_worst": cos["worst"], "cos_mean": cos["mean"],
                "max_abs_err": float((eager[keep] - out[keep]).abs().max())}

    def from_numpy(outs: list) -> torch.Tensor:
        return torch.from_numpy(outs[0]).float()

    def ort_int8() -> System:
        plain = onnx_export(model, inputs, dynamic, work / "plain" / "model.onnx",
                            output_names=["last_hidden_state", "pooler_output"])
        opt = work / "ort_opt" / "model.onnx"
        opt.parent.mkdir(parents=True, exist_ok=True)
        ort_transformers_optimize(plain, opt, model_type="bert", num_heads=cfg.num_attention_heads,
                                  hidden_size=cfg.hidden_size)
        q = ort_quantize_dynamic(opt, work / "ort_int8" / "model.onnx")
        s = ort_system("ORT quantize_dynamic int8 (peer)", q, inputs, ctx, extract=from_numpy)
        s.kind = BASELINE
        s.info["ort_profile_ms"] = _profile(q, inputs, ctx.threads)
        return s

    def graphopt_system(name: str, pipeline: str, tokenizer: str | None = None) -> System:
        t0 = time.perf_counter()
        slug = "".join(c if c.isalnum() else "_" for c in name)
        art = graphopt.compile(model, inputs, pipeline=pipeline, target="onnx", out=work / slug,
                               dynamic=dynamic, report=None, tokenizer=tokenizer)
        eng = graphopt.load(art.path, threads=ctx.threads, spinning=False)
        flat = eng.bind(**numpy_inputs(inputs, eng.input_names))
        s = System(name, lambda: eng.runner.run(flat), extract=lambda outs: outs[0].float().cpu(), close=eng.close)
        s.info["compile_s"] = round(time.perf_counter() - t0, 1)
        qrec = next((r.get("quantization") for r in art.report["passes"] if r.get("quantization")), None)
        if qrec:
            s.info["int8_layers"] = qrec["quantized"]
            s.info["float_fallback"] = len(qrec["fallback"])
            s.info["guard_calib_worst_cos"] = round((qrec.get("guard") or {}).get("quantized", {}).get("worst_cosine", 0), 4)
        disabled = list(eng.runner.disabled_optimizers)
        s.info["int8_kernels"] = _int8_kernels(art.path / "model.onnx", ctx.threads, disabled)
        s.info["ort_profile_ms"] = _profile(art.path / "model.onnx", numpy_inputs(inputs, eng.input_names), ctx.threads,
                                            disabled=disabled)
        return s

    tok = str(model_dir() / "tokenizer.json")
    candidates = [
        Candidate("ORT quantize_dynamic int8 (peer)", ort_int8, BASELINE),
        Candidate("graphopt fp32 (cleanup,fuse)", lambda: graphopt_system("graphopt fp32 (cleanup,fuse)",
                                                                         "cleanup,fuse")),
        Candidate("graphopt w8a8 static (guarded)",
                  lambda: graphopt_system("graphopt w8a8 static (guarded)", minilm_pipeline(tok, p.min_cosine), tok)),
        Candidate("graphopt smoothquant w8a8 (guarded)",
                  lambda: graphopt_system("graphopt smoothquant w8a8 (guarded)",
                                          minilm_pipeline(tok, p.min_cosine, "smoothquant"), tok)),
        # the same two with remove-padding (opt-in: per-token work on the real tokens only)
        Candidate("graphopt fp32 + remove-padding",
                  lambda: graphopt_system("graphopt fp32 + remove-padding", "cleanup,fuse,remove-padding")),
        Candidate("graphopt w8a8 static (guarded) + remove-padding",
                  lambda: graphopt_system("graphopt w8a8 static (guarded) + remove-padding",
                                          minilm_pipeline(tok, p.min_cosine) + ",remove-padding", tok)),
    ]
    systems, run_notes = run_latency(ctx, candidates, quality=quality, warmup=p.warmup, iters=p.iters,
                                     group="minilm int8")
    notes += run_notes
    if p.decoder:
        systems += _decoder(ctx, p, work, notes)
    settings = {"minilm": MINILM, "batch": p.batch, "seq_len": p.seq_len, "real_tokens": int(keep.sum()),
                "min_cosine": p.min_cosine, "min_mean_cosine": MIN_MEAN_COSINE,
                "int8_weights": "8-bit (CPU has VNNI)" if cpu_has_vnni() else "7-bit reduce_range (no VNNI)",
                "decoder": SHAKESPEARE, "ppl_windows": p.ppl_windows,
                "quality_reference": "torch eager fp32, real tokens"}
    return CaseResult("quant", CASE.title, "latency", settings,
                      baselines={"minilm int8": "ORT quantize_dynamic int8 (peer)", "shakespeare": "fp32"},
                      systems=systems, notes=notes)


def _decoder(ctx: BenchContext, p: Params, work: Path, notes: list[str]) -> list:
    import graphopt
    from graphopt.model_loader import load_factory
    from graphopt.verify.metrics import heldout_perplexity
    from samples.models.shakespeare import TOKENIZER, heldout_ids

    model, inputs, dynamic = load_factory(SHAKESPEARE)
    ids = heldout_ids()
    with torch.no_grad():
        ppl_eager = heldout_perplexity(lambda x: model(input_ids=x).logits, ids, max_windows=p.ppl_windows)
    prompt = ids[:32].unsqueeze(0)
    engines: dict[str, Any] = {}

    def build(label: str, pipeline: str) -> System:
        art = graphopt.compile(model, inputs, pipeline=pipeline, target="onnx", out=work / f"dec_{len(engines)}",
                               dynamic=dynamic, report=None, tokenizer=str(TOKENIZER))
        eng = graphopt.load(art.path, threads=ctx.threads, spinning=False)
        engines[label] = eng
        ppl = heldout_perplexity(lambda x: eng(input_ids=x, attention_mask=torch.ones_like(x))["logits"], ids,
                                 max_windows=p.ppl_windows)
        s = System(label, lambda: eng.generate(prompt, max_new_tokens=p.decode_tokens), close=eng.close,
                   extract=lambda out: out)
        s.info["perplexity"] = round(ppl, 4)
        s.info["ppl_vs_fp32"] = f"{(ppl / engines_ppl.setdefault('fp32', ppl) - 1) * 100:+.2f}%"
        s.info["ppl_torch_eager"] = round(ppl_eager, 4)
        qrec = next((r.get("quantization") for r in art.report["passes"] if r.get("quantization")), None)
        if qrec:
            s.info["quantized_layers"] = qrec["quantized"]
            s.info["float_fallback"] = len(qrec["fallback"])
        return s

    engines_ppl: dict[str, float] = {}
    cands = [Candidate(label, lambda label=label, pipe=pipe: build(label, pipe), BASELINE if i == 0 else "graphopt")
             for i, (label, pipe) in enumerate(decoder_pipelines(p.calib_windows).items())]

    def agree(ref: Any, out: Any) -> dict[str, float]:
        n = min(ref.shape[1], out.shape[1])
        return {"token_agreement": float((ref[:, 32:n] == out[:, 32:n]).float().mean())}

    systems, run_notes = run_latency(ctx, cands, quality=agree, warmup=1, iters=max(3, p.iters // 4),
                                     group="shakespeare")
    for s in systems:
        if s.samples_s:
            tps = sorted(p.decode_tokens / t for t in s.samples_s)
            s.throughput = {"unit": "tokens/s", "median": tps[len(tps) // 2], "p10": tps[0], "p90": tps[-1]}
    notes += run_notes
    notes.append("decode: Engine.generate without a KV cache (the prefix is recomputed every step) for every "
                 "system, so tokens/s compare the forward passes")
    return systems


def _profile(path: Path, inputs: dict, threads: int, runs: int = 3, disabled: list[str] | None = None) -> str:
    """ONNX Runtime's own profiler: kernel time per op type (ms per forward), the top five.
    ``disabled``: the graph optimizers the timed session leaves out (graphopt's runner's list)."""
    import collections
    import json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.log_severity_level = 3
    so.profile_file_prefix = str(path.with_name("ort_profile"))
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or [])
    feed = {i.name: (v.numpy() if isinstance(v, torch.Tensor) else v)
            for i in sess.get_inputs() for k, v in inputs.items() if k == i.name}
    sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / (runs + 1)
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:5]
    return ", ".join(f"{k} {v:.1f}" for k, v in top)


def _int8_kernels(path: Path, threads: int, disabled: list[str] | None = None) -> str:
    """Which integer kernels ONNX Runtime runs for the artifact (from its optimized graph), with the
    graph optimizers the timed session leaves out (``disabled``)."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.optimized_model_filepath = str(path.with_name("ort_optimized.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or [])
    counts = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    kinds = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits")
    return ", ".join(f"{k} {counts[k]}" for k in kinds if counts.get(k)) or "none"


CASE = Case(
    name="quant", title="Quantization: graphopt-quant vs ONNX Runtime int8",
    measures="MiniLM int8 latency + cosine vs ORT quantize_dynamic; Shakespeare decoder perplexity and decode "
             "tokens/s for W8A8 SmoothQuant, int4/int8 weight-only vs fp32",
    params=Params, run=run, quick={"warmup": 1, "iters": 3, "ppl_windows": 8, "calib_windows": 8,
                                   "decode_tokens": 8},
)
