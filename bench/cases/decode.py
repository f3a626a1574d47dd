"""decode: greedy decoding, a 32-token prompt and 64 new tokens, batch 1.

Models: a 31.8M-parameter tiny Llama (8 layers, hidden 512, FFN 1408, 8 heads / 4 KV heads, vocab
8000, random weights from ``hf_llama.build(seed=0)``) and the trained Shakespeare model
(``samples/models/shakespeare.py:build``), skipped with a note while that file does not exist.

Systems: HF ``generate`` with its own KV cache (the baseline), HF ``generate`` without a cache,
and every pipeline in GRAPHOPT_PIPELINES compiled by graphopt and driven by ``Engine.generate``
(which recomputes the whole prefix each step until a kv-cache pipeline exists). A model without
``generate`` (a plain nn.Module) gets a torch eager greedy loop as its baseline instead.
EOS never stops a run: every system generates exactly ``new_tokens`` tokens.

Metrics: tokens/s, speedup vs HF generate with cache, agreement with its greedy tokens (fraction
of identical new tokens, first divergence position).

Floor (the cached algorithm, whatever the system does): one prefill forward of the prompt and
``new_tokens - 1`` single-token forwards. Per forward, FLOPs = 2 x body linear weights x tokens +
2 x lm_head weights (last position only) + attention 4 x layers x (heads x head_dim) x context per
token (causal); bytes = every weight read once (embedding tables excepted) + the KV cache read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.cases import Case
from bench.floor import floor_of, linear_weights, weight_bytes
from bench.harness import BASELINE, PEER, BenchContext, BenchError, Candidate, CaseResult, System, run_latency
from bench.systems import graphopt_candidates, on_device

#: label → pipeline text. Add a line to benchmark a pipeline; one whose passes are not registered
#: yet shows up in the results as skipped, with the reason.
GRAPHOPT_PIPELINES = {
    "graphopt cleanup": "cleanup",
    "graphopt cleanup,fuse,kv-cache": "cleanup,fuse,kv-cache",
    "graphopt cleanup,fuse,kv-cache(static)": "cleanup,fuse,kv-cache(static=true,max_len=128)",
}

TINY_LLAMA = {"vocab_size": 8000, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4}
TINY_LLAMA_PARAMS = 31.8e6
SHAKESPEARE = "samples/models/shakespeare.py:build"


@dataclass
class Params:
    models: str = "tiny-llama,shakespeare"
    prompt_len: int = 32
    new_tokens: int = 64
    warmup: int = 1
    iters: int = 5


def load_model(name: str, prompt_len: int, new_tokens: int, log) -> tuple[Any, Any, dict | None, torch.Tensor]:
    """``(module, compile example inputs, dynamic, prompt ids [1, prompt_len])``."""
    from graphopt.model_loader import load_factory

    if name == "tiny-llama":
        model, inputs, dynamic = load_factory("samples/models/hf_llama.py:build", **TINY_LLAMA,
                                              max_position_embeddings=max(256, prompt_len + new_tokens),
                                              batch=2, seq_len=prompt_len)
        n = sum(p.numel() for p in model.parameters())
        log(f"tiny-llama: {n:,} parameters")
        if abs(n - TINY_LLAMA_PARAMS) > 0.01 * TINY_LLAMA_PARAMS:
            raise BenchError(f"the tiny-Llama config has {n:,} parameters, expected ~31.8M; check TINY_LLAMA")
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, TINY_LLAMA["vocab_size"], (1, prompt_len), generator=g)
        return model, inputs, dynamic, prompt
    if name == "shakespeare":
        if not Path(SHAKESPEARE.split(":")[0]).is_file():
            raise FileNotFoundError(f"{SHAKESPEARE.split(':')[0]} does not exist yet")
        model, inputs, dynamic = load_factory(SHAKESPEARE, seq_len=prompt_len)  # real held-out text windows
        ids = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        row = ids[:1].long()
        reps = -(-prompt_len // row.shape[1])
        return model, inputs, dynamic, row.repeat(1, reps)[:, :prompt_len]
    raise ValueError(f"unknown decode model {name!r}; known: tiny-llama, shakespeare")


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]


def hf_generate(name: str, model: Any, prompt: torch.Tensor, new_tokens: int, *, use_cache: bool,
                kind: str) -> System:
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = None  # exactly new_tokens tokens, like every other system
    cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    mask = torch.ones_like(prompt)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=mask, generation_config=cfg, max_new_tokens=new_tokens,
                                  min_new_tokens=0, do_sample=False, use_cache=use_cache)

    return System(name, call, kind=kind, extract=lambda out: out[0, prompt.shape[1]:].tolist())


def eager_greedy(name: str, model: Any, example: Any, prompt: torch.Tensor, new_tokens: int) -> System:
    """Greedy decoding by rerunning the whole prefix: the baseline for a model without generate()."""
    key = next(iter(example)) if isinstance(example, dict) else None
    with_mask = isinstance(example, dict) and "attention_mask" in example

    def call() -> torch.Tensor:
        seq = prompt
        with torch.inference_mode():
            for _ in range(new_tokens):
                if key is None:
                    out = model(seq)
                else:
                    feed = {key: seq, **({"attention_mask": torch.ones_like(seq)} if with_mask else {})}
                    out = model(**feed)
                seq = torch.cat([seq, _logits(out)[:, -1, :].argmax(-1, keepdim=True).to(seq)], dim=1)
        return seq

    return System(name, call, kind=BASELINE, extract=lambda out: out[0, prompt.shape[1]:].tolist())


def agreement(ref: list[int], out: list[int]) -> dict[str, Any]:
    same = sum(a == b for a, b in zip(ref, out))
    first = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), None)
    if first is None and len(out) != len(ref):
        first = min(len(ref), len(out))
    return {"token_agreement": same / max(len(ref), 1), "first_divergence": first, "new_tokens": len(out)}


def decode_floor(model: Any, prompt_len: int, new_tokens: int, rates: dict[str, Any]) -> dict[str, Any]:
    cfg = getattr(model, "config", None)

    def get(*names: str) -> Any:
        return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)

    layers, hidden = get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    if not (layers and hidden and heads):
        raise ValueError("the model's config does not give layers / hidden size / heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    p_head = linear_weights(head) if head is not None else 0
    p_body = linear_weights(model) - p_head
    wbytes = weight_bytes(model)
    elem = next(model.parameters()).element_size()
    d_attn, kv_dim = heads * head_dim, kv_heads * head_dim
    steps = []
    t = prompt_len
    causal = t * (t + 1) / 2  # sum of contexts over the prompt positions
    steps.append((2.0 * p_body * t + 2.0 * p_head + 4.0 * layers * d_attn * causal,
                  wbytes + t * hidden * elem))
    for k in range(1, new_tokens):
        ctx = prompt_len + k
        steps.append((2.0 * (p_body + p_head) + 4.0 * layers * d_attn * ctx,
                      wbytes + 2.0 * layers * kv_dim * ctx * elem))
    fl = floor_of(steps, rates)
    fl["formula"] = ("1 prefill + (new_tokens-1) cached steps; per forward FLOPs = 2*body_linear*tokens + "
                     "2*lm_head + 4*layers*heads*head_dim*context (causal); bytes = weights (no embedding "
                     "tables) + KV cache read")
    return fl


def run(ctx: BenchContext, p: Params) -> CaseResult:
    names = [m.strip() for m in p.models.split(",") if m.strip()]
    result = CaseResult("decode", CASE.title, "latency", {
        "models": names, "prompt_len": p.prompt_len, "new_tokens": p.new_tokens, "batch": 1,
        "warmup": ctx.warmup if ctx.warmup is not None else p.warmup,
        "iters": ctx.iters if ctx.iters is not None else p.iters,
        "graphopt_pipelines": GRAPHOPT_PIPELINES, "graphopt_targets": ctx.graphopt_targets,
        "quality_reference": "greedy tokens of the group's baseline"})
    for name in names:
        try:
            loaded = load_model(name, p.prompt_len, p.new_tokens, ctx.log)
        except BenchError:
            raise
        except Exception as e:
            result.notes.append(f"{name}: skipped, {type(e).__name__}: {e}")
            ctx.log(f"decode: {name} skipped: {e}")
            continue
        run_model(ctx, p, name, *loaded, result)
    if not result.systems:
        raise BenchError("no decode model could be loaded: " + "; ".join(result.notes))
    return result


def run_model(ctx: BenchContext, p: Params, name: str, model: Any, example: Any, dynamic: dict | None,
              prompt: torch.Tensor, result: CaseResult) -> None:
    """Time one model's systems side by side and add them to ``result`` as group ``name``."""
    result.settings.setdefault("parameters", {})[name] = sum(t.numel() for t in model.parameters())
    dev_model = on_device(model, ctx.device)
    dev_prompt = prompt.to(ctx.device)
    if hasattr(dev_model, "generate") and hasattr(dev_model, "generation_config"):
        base = "HF generate (KV cache)"
        candidates = [
            Candidate(base, lambda: hf_generate(base, dev_model, dev_prompt, p.new_tokens, use_cache=True,
                                                kind=BASELINE), BASELINE),
            Candidate("HF generate (no cache)", lambda: hf_generate(
                "HF generate (no cache)", dev_model, dev_prompt, p.new_tokens, use_cache=False, kind=PEER)),
        ]
    else:
        base = "torch eager greedy (full prefix)"
        candidates = [Candidate(base, lambda: eager_greedy(base, dev_model, example, dev_prompt, p.new_tokens),
                                BASELINE)]
        result.notes.append(f"{name}: not a transformers model (no generate()); the baseline is a torch "
                            "eager greedy loop over the full prefix")

    def graphopt_system(sys_name: str, engine: Any) -> System:
        def call() -> torch.Tensor:
            return engine.generate(prompt, max_new_tokens=p.new_tokens)

        sys_ = System(sys_name, call, extract=lambda out: out[0, prompt.shape[1]:].tolist())
        if "kv-cache" not in str(engine.manifest.get("pipeline", "")):
            sys_.notes.append("no KV cache: Engine.generate recomputes the whole prefix every step")
        return sys_

    candidates += graphopt_candidates(ctx, GRAPHOPT_PIPELINES, model, example, dynamic, graphopt_system,
                                      case=f"decode_{name}")
    try:
        floor = decode_floor(model, p.prompt_len, p.new_tokens, ctx.rates())
    except Exception as e:
        floor = None
        result.notes.append(f"{name}: no floor ({e})")
    systems, notes = run_latency(ctx, candidates, quality=agreement, warmup=p.warmup, iters=p.iters,
                                 floor_s=floor["time_s"] if floor else None, group=name)
    for s in systems:
        if s.samples_s:
            s.throughput = {"unit": "tokens/s", **_summary([p.new_tokens / t for t in s.samples_s])}
    result.systems += systems
    result.baselines[name] = base
    if floor:
        result.floors[name] = floor
    result.notes += [f"{name}: {n}" for n in notes]


def _summary(xs: list[float]) -> dict[str, float]:
    from bench.harness import summarize

    s = summarize(xs)
    return {"median": s["median"], "p10": s["p10"], "p90": s["p90"]}


CASE = Case(
    name="decode", title="Greedy decoding: tokens/s and token agreement",
    measures="greedy decoding (prompt 32, 64 new tokens, batch 1) of a 31.8M tiny Llama and the trained "
             "Shakespeare model: HF generate with/without cache vs graphopt Engine.generate",
    params=Params, run=run, quick={"warmup": 0, "iters": 2},
)
