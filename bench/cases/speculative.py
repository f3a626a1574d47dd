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
from bench.systems import load_engine, ort_providers

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
        # the ceiling takes each model's fastest session: ORT's thread pool spinning between calls
        # (fastest for one model alone), or one thread (no pool to wake: fastest for a small draft)
        import graphopt

        providers = ort_providers(ctx.device)  # the bench's device for every session
        variants = {label: [e, graphopt.load(arts[label], providers=providers, threads=ctx.threads, spinning=True),
                            graphopt.load(arts[label], providers=providers, threads=1)]
                    for label, e in engines.items()}
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
            out = engines["target"].generate(prompt, p.new_tokens)[0, prompt.shape[1]:].tolist()
            ceil = _ceiling(prompt, variants, out)
            for label, d in ceil["drafters"].items():  # rendered as the group's ceiling table
                result.rows.append({"group": group, "drafter": label, **d,
                                    "target_call_ms_1": ceil["target_call_ms"][1],
                                    "target_call_ms_5": ceil["target_call_ms"][5]})
        for es in variants.values():
            for e in es:
                e.close()
    return result


# -- what any loop could reach: measured call costs, the target's own tokens -----------------------------

def _bare_call(engine: Any, prompt: torch.Tensor, seq: int) -> Any:
    """One bare ONNX Runtime call of ``engine``'s kv-cache graph (a closure): ``seq`` new tokens
    after a cache of the prompt, feeds built once (no loop, no conversions)."""
    import numpy as np

    from graphopt.speculative import _Cache

    cache = _Cache(engine, 1)
    cache.feed([prompt[0].tolist()])
    gen = engine.manifest["generation"]
    ids = prompt[:, torch.arange(seq) % prompt.shape[1]]  # real token ids; the values do not change the cost
    feed = {gen["ids"]: ids, gen["attention_mask"]: torch.ones(1, seq, dtype=torch.int64), **cache.cache}
    arrays = {n: np.ascontiguousarray(feed[n].numpy()) for n in engine.input_names}
    session = engine.runner.session
    return lambda: session.run(None, arrays)


def _medians_ms(calls: dict[Any, Any], rounds: int = 10, block: int = 6) -> dict[Any, float]:
    """Median ms of each call: blocks of ``block`` back-to-back calls (the first of a block, after
    another session ran, is not counted: a decoding loop calls one session over and over), blocks
    of every call interleaved over ``rounds`` rounds so that drift of the machine falls on all."""
    import time

    import numpy as np

    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, f in calls.items():
            f()
            for _ in range(block - 1):
                t0 = time.perf_counter()
                f()
                times[key].append(time.perf_counter() - t0)
    return {key: float(np.median(ts)) * 1e3 for key, ts in times.items()}


def _agreement(engine: Any, seq: list[int], start: int) -> list[bool]:
    """Teacher-forced: does ``engine``'s argmax after ``seq[:t]`` equal ``seq[t]``, for t >= start."""
    from graphopt.speculative import _Cache

    logits = _Cache(engine, 1).forward(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.int64))
    pred = logits[0].argmax(-1).tolist()  # pred[t] follows seq[: t + 1]
    return [pred[t - 1] == seq[t] for t in range(start, len(seq))]


def _replay(seq: list[int], p0: int, t: dict[int, float], round_cost: Any, propose: Any, kmax: int
            ) -> dict[str, Any]:
    """Lossless speculation replayed over ``seq`` (a prompt of ``p0`` tokens, then the target's
    greedy tokens; the first comes from the prefill): ``propose(i, k)`` drafts ``k`` tokens for
    position ``i``, a round that checked ``m`` drafts costs ``round_cost(m)`` and a plain step
    ``t[1]``. Speedups over plain steps for the best fixed draft length (``fixed``, ``k``, its
    ``acceptance``) and for the best draft length at every step, chosen knowing the outcome
    (``ceiling``, ``target_calls``): no draft-length policy does better."""
    plain = (len(seq) - p0 - 1) * t[1]

    def match(d: list[int], i: int) -> int:
        n = 0
        while n < len(d) and i + n < len(seq) and d[n] == seq[i + n]:
            n += 1
        return n

    top: dict[str, Any] = {"fixed": 0.0}
    for k in range(1, kmax + 1):
        i, cost, proposed, kept = p0 + 1, 0.0, 0, 0
        while i < len(seq):
            d = propose(i, k)
            n = match(d, i)
            cost += round_cost(len(d))
            proposed, kept = proposed + len(d), kept + n
            i += n + 1
        if cost and plain / cost > top["fixed"]:
            top = {"fixed": round(plain / cost, 3), "k": k, "acceptance": round(kept / max(proposed, 1), 4)}
    # the best any draft-length policy can do (drafts are prefix-consistent: k + 1 drafts extend k):
    # from position i, a round drafting m tokens (m = 0: a plain step) costs round_cost(m) and moves
    # past min(m, run[i]) kept drafts plus the target's own token; shortest path to the end
    ends = len(seq)
    run = {i: match(propose(i, kmax), i) for i in range(p0 + 1, ends)}
    best: dict[int, tuple[float, int]] = {ends: (0.0, 0)}  # position -> (cost to the end, target calls)
    for i in range(ends - 1, p0, -1):
        options = []
        for m in range(kmax + 1):
            after = best[min(i + min(m, run[i]) + 1, ends)]
            options.append(((t[1] if m == 0 else round_cost(m)) + after[0], after[1] + 1))
        best[i] = min(options)
    cost, rounds = best[p0 + 1]
    return {"ceiling": round(plain / cost, 3) if cost else 1.0, "target_calls": rounds, **top}


def _ceiling(prompt: torch.Tensor, variants: dict[str, list[Any]], out: list[int], kmax: int = 16) -> dict[str, Any]:
    """The speedup a speculative loop with no costs of its own could reach on this prompt: the
    target's greedy tokens ``out`` replayed (lossless decoding emits exactly them), each round
    costing a bare target call over ``k + 1`` tokens plus ``k`` bare draft calls (prompt lookup: no
    draft cost), against ``len(out) - 1`` bare one-token target calls (the prefill, the same in
    both, left out). ``variants``: per model (``"target"`` and each draft), sessions of it with
    different settings; each call costs what the fastest of them takes."""
    from graphopt.speculative import _lookup

    calls = {("target", s, v): _bare_call(e, prompt, s) for s in range(1, kmax + 2)
             for v, e in enumerate(variants["target"])}
    calls.update({(label, 1, v): _bare_call(e, prompt, 1) for label, es in variants.items() if label != "target"
                  for v, e in enumerate(es)})
    med = _medians_ms(calls)
    ms = {(label, s): min(m for (lb, ss, _), m in med.items() if (lb, ss) == (label, s)) for label, s, _ in med}
    t = {s: ms[("target", s)] for s in range(1, kmax + 2)}
    engines = {label: es[0] for label, es in variants.items()}
    seq = prompt[0].tolist() + out
    p0 = prompt.shape[1]
    res: dict[str, Any] = {"target_call_ms": {s: round(t[s], 4) for s in (1, 2, 3, 5, 9)}, "drafters": {}}

    def best(round_cost: Any, propose: Any) -> dict[str, Any]:
        return _replay(seq, p0, t, round_cost, propose, kmax)

    res["drafters"]["prompt lookup"] = best(lambda m: t[m + 1], lambda i, k: _lookup(seq[:i], 3, k))
    for label, eng in engines.items():
        if label == "target":
            continue
        d1 = ms[(label, 1)]
        agree = [True] * (p0 + 1) + _agreement(eng, seq, p0 + 1)  # agree[i]: the draft's argmax after seq[:i] is seq[i]

        def propose(i: int, k: int, agree: list[bool] = agree) -> list[int]:
            n = 0  # the draft proposes its own argmax; it matches the target's token while it agrees
            while n < k and i + n < len(seq) and agree[i + n]:
                n += 1
            return seq[i:i + n] + [-1] * (k - n)  # -1: a wrong draft (it drafts k tokens all the same)

        top = best(lambda m, d1=d1: t[m + 1] + m * d1, propose)
        res["drafters"][label] = {**top, "draft_call_ms": round(d1, 4),
                                  "agreement": round(sum(agree[p0 + 1:]) / max(1, len(seq) - p0 - 1), 4)}
    return res


CASE = Case(
    name="speculative", title="Speculative decoding: tokens/s vs plain kv-cache decoding, acceptance",
    measures="speculative decoding (batch 1, greedy, 64 new tokens) of the trained decoder and the 31.8M tiny "
             "Llama on input-grounded and open prompts: graphopt prompt lookup and draft models (k 2/4/8) vs "
             "plain kv-cache generate, HF prompt lookup and HF assisted generation with the same drafts",
    params=Params, run=run, quick={"warmup": 0, "iters": 1, "ks": "4", "new_tokens": 16,
                                   "models": "shakespeare"},
)
