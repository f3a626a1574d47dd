"""speculative: speculative decoding (graphopt.speculative) against plain kv-cache decoding and
Hugging Face's assisted generation and prompt lookup, batch 1, greedy, 64 new tokens.

Models:

- ``shakespeare``: the trained decoder (samples/shakespeare/checkpoint, 3.4M parameters), with two
  drafts: the trained 1-layer draft of samples/shakespeare/draft (same tokenizer; trained by
  ``samples/shakespeare/train.py --layers 1 ...``, see its training.json) and the target's own first
  layer (``graphopt.compile(DIR, layers=1)``: no second checkpoint);
- ``tiny-llama``: the 31.8M-parameter Llama shape of the decode case (random weights), with its
  own first layer as the draft (the model cut to 1 of its 8 layers).

Prompts (held-out text of tinyshakespeare, tokenized with the trained decoder's tokenizer; the
random-weight model reads the same ids):

- ``grounded``: a passage of ``passage_len`` tokens, a newline, then the passage's first
  ``restart_len`` tokens again: continuing means repeating the passage (input-grounded text, where
  prompt lookup pays);
- ``open``: another passage, continued freely.

Systems per (model, prompt): graphopt plain kv-cache ``Engine.generate`` (the baseline), graphopt
prompt lookup and graphopt with each draft at starting draft lengths ``ks`` (adapted per step),
HF ``generate`` with its KV cache, HF prompt lookup (``prompt_lookup_num_tokens``) and HF assisted
generation with the same draft model (its default heuristic schedule). Quality: agreement of the
new tokens with the baseline's (graphopt's speculation must give 1.0: it is lossless).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.cases import Case
from bench.cases.decode import TINY_LLAMA, _summary, agreement
from bench.harness import BASELINE, GRAPHOPT, PEER, BenchContext, Candidate, CaseResult, System, run_latency
from bench.systems import load_engine

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "samples" / "shakespeare" / "checkpoint"
DRAFT = REPO / "samples" / "shakespeare" / "draft"


@dataclass
class Params:
    models: str = "shakespeare,tiny-llama"
    prompts: str = "grounded,open"
    ks: str = "2,4,8"
    passage_len: int = 48
    restart_len: int = 8
    new_tokens: int = 64
    hf_lookup_tokens: int = 8
    warmup: int = 1
    iters: int = 5


def _shallow(model: Any, keep: int = 1) -> Any:
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:keep]
    m.config.num_hidden_layers = keep
    return m


def _prompts(p: Params) -> dict[str, torch.Tensor]:
    import importlib.util

    from tokenizers import Tokenizer

    spec = importlib.util.spec_from_file_location("_bench_shakespeare_text", REPO / "samples/models/shakespeare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    held = mod.split_text(mod.read_text())[1]
    tok = Tokenizer.from_file(str(SHAKESPEARE / "tokenizer.json"))
    a = tok.encode(held[3000:6000]).ids[: p.passage_len]
    b = tok.encode(held[20000:23000]).ids[: p.passage_len]
    newline = tok.encode("\n").ids
    out = {"grounded": torch.tensor([a + newline + a[: p.restart_len]]), "open": torch.tensor([b])}
    return {k: v for k, v in out.items() if k in [x.strip() for x in p.prompts.split(",")]}


def _models(ctx: BenchContext, p: Params, name: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(HF target, {draft label: HF draft}, {label: graphopt artifact path}) for ``name``."""
    from transformers import AutoModelForCausalLM

    import graphopt

    work = ctx.workdir / "speculative" / name
    longest = p.passage_len + 1 + p.restart_len + p.new_tokens + 16
    dyn = {n: {0: (1, 4), 1: (1, max(256, longest))} for n in ("input_ids", "attention_mask")}
    pipeline = "cleanup,fuse,kv-cache"
    arts: dict[str, Any] = {}
    if name == "shakespeare":
        target = AutoModelForCausalLM.from_pretrained(str(SHAKESPEARE), local_files_only=True).eval()
        dyn = {n: {0: (1, 4), 1: (1, target.config.max_position_embeddings)} for n in dyn}
        arts["target"] = graphopt.compile(str(SHAKESPEARE), pipeline=pipeline, out=work / "target", report=None,
                                          dynamic=dyn).path
        drafts = {"first layer of the target": _shallow(target)}
        arts["first layer of the target"] = graphopt.compile(str(SHAKESPEARE), pipeline=pipeline, layers=1,
                                                             out=work / "first_layer", report=None, dynamic=dyn).path
        if (DRAFT / "config.json").is_file():
            drafts = {"trained 1-layer draft": AutoModelForCausalLM.from_pretrained(str(DRAFT), local_files_only=True)
                      .eval(), **drafts}
            arts["trained 1-layer draft"] = graphopt.compile(str(DRAFT), pipeline=pipeline, out=work / "draft",
                                                             report=None, dynamic=dyn).path
        return target, drafts, arts
    if name == "tiny-llama":
        from graphopt.model_loader import load_factory

        target, ex, _ = load_factory(f"{REPO}/samples/models/hf_llama.py:build", **TINY_LLAMA,
                                     attn_implementation="sdpa", max_position_embeddings=256, batch=2, seq_len=16)
        draft = _shallow(target)
        arts["target"] = graphopt.compile(target, ex, pipeline=pipeline, out=work / "target", report=None,
                                          dynamic=dyn).path
        arts["first layer of the target"] = graphopt.compile(draft, ex, pipeline=pipeline, out=work / "first_layer",
                                                             report=None, dynamic=dyn).path
        return target, {"first layer of the target": draft}, arts
    raise ValueError(f"unknown speculative model {name!r}; known: shakespeare, tiny-llama")


def _hf(name: str, model: Any, prompt: torch.Tensor, n: int, kind: str, **kw: Any) -> System:
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = None
    cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    mask = torch.ones_like(prompt)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=mask, generation_config=cfg, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True, **kw)

    return System(name, call, kind=kind, extract=lambda out: out[0, prompt.shape[1]:].tolist())


def _graphopt(name: str, engine: Any, prompt: torch.Tensor, n: int, kind: str, speculative: Any = None) -> System:
    sys_ = System(name, lambda: None, kind=kind, extract=lambda out: out[0, prompt.shape[1]:].tolist())

    def call() -> torch.Tensor:
        out = engine.generate(prompt, n, speculative=speculative)
        spec = getattr(out, "speculation", None)
        if spec:
            sys_.info.update(acceptance=spec["acceptance_rate"], target_calls=spec["target_calls"],
                             mean_draft=spec["mean_draft_length"])
        return out

    sys_.call = call
    return sys_


def _candidates(p: Params, ks: list[int], prompt: torch.Tensor, target: Any, hf_drafts: dict[str, Any],
                engines: dict[str, Any], base: str) -> list[Candidate]:
    from graphopt.speculative import Draft, PromptLookup

    n, eng = p.new_tokens, engines["target"]
    cands = [Candidate(base, partial(_graphopt, base, eng, prompt, n, BASELINE), BASELINE)]
    for k in ks:
        label = f"graphopt prompt-lookup (k={k})"
        opts = PromptLookup(num_tokens=k, max_tokens=max(16, k))
        cands.append(Candidate(label, partial(_graphopt, label, eng, prompt, n, GRAPHOPT, opts), GRAPHOPT))
    for i, dlabel in enumerate(hf_drafts):
        for k in ks if i == 0 else [4]:
            label = f"graphopt draft: {dlabel} (k={k})"
            opts = Draft(engines[dlabel], num_tokens=k, max_tokens=max(16, k))
            cands.append(Candidate(label, partial(_graphopt, label, eng, prompt, n, GRAPHOPT, opts), GRAPHOPT))
    cands.append(Candidate("HF generate (KV cache)", partial(_hf, "HF generate (KV cache)", target, prompt, n, PEER)))
    hl = f"HF prompt lookup (prompt_lookup_num_tokens={p.hf_lookup_tokens})"
    cands.append(Candidate(hl, partial(_hf, hl, target, prompt, n, PEER, prompt_lookup_num_tokens=p.hf_lookup_tokens)))
    for dlabel, dmodel in hf_drafts.items():
        al = f"HF assisted generation: {dlabel}"
        cands.append(Candidate(al, partial(_hf, al, target, prompt, n, PEER, assistant_model=dmodel)))
    return cands


def run(ctx: BenchContext, p: Params) -> CaseResult:
    ks = [int(k) for k in p.ks.split(",") if k.strip()]
    prompts = _prompts(p)
    result = CaseResult("speculative", CASE.title, "latency", {
        "models": p.models, "prompts": {k: int(v.shape[1]) for k, v in prompts.items()}, "ks": ks,
        "new_tokens": p.new_tokens, "batch": 1, "greedy": True,
        "warmup": ctx.warmup if ctx.warmup is not None else p.warmup,
        "iters": ctx.iters if ctx.iters is not None else p.iters,
        "quality_reference": "greedy tokens of graphopt's plain kv-cache generate"})
    for name in [m.strip() for m in p.models.split(",") if m.strip()]:
        ctx.log(f"speculative: compiling {name} and its drafts ...")
        target, hf_drafts, arts = _models(ctx, p, name)
        engines = {label: load_engine(path, "onnx", ctx) for label, path in arts.items()}
        result.settings.setdefault("parameters", {})[name] = {
            "target": sum(t.numel() for t in target.parameters()),
            **{label: sum(t.numel() for t in m.parameters()) for label, m in hf_drafts.items()}}
        for kind, prompt in prompts.items():
            group = f"{name} · {kind}"
            base = "graphopt kv-cache (plain generate)"
            cands = _candidates(p, ks, prompt, target, hf_drafts, engines, base)
            systems, notes = run_latency(ctx, cands, quality=agreement, warmup=p.warmup, iters=p.iters, group=group)
            for s in systems:
                if s.samples_s:
                    s.throughput = {"unit": "tokens/s", **_summary([p.new_tokens / t for t in s.samples_s])}
            result.systems += systems
            result.baselines[group] = base
            result.notes += [f"{group}: {n}" for n in notes]
        for e in engines.values():
            e.close()
    return result


CASE = Case(
    name="speculative", title="Speculative decoding: tokens/s vs plain kv-cache decoding, acceptance",
    measures="speculative decoding (batch 1, greedy, 64 new tokens) of the trained decoder and the 31.8M tiny "
             "Llama on input-grounded and open prompts: graphopt prompt lookup and draft models (k 2/4/8) vs "
             "plain kv-cache generate, HF prompt lookup and HF assisted generation with the same drafts",
    params=Params, run=run, quick={"warmup": 0, "iters": 1, "ks": "4", "new_tokens": 16,
                                   "models": "shakespeare"},
)
