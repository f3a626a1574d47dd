"""Speculative decoding: a cheap drafter proposes tokens, the target checks them in one forward.

Decoding is memory-bound: a forward over k + 1 tokens reads the weights once, as a forward over
one token does. A drafter proposes up to k tokens per row; the target runs ``[last, d1..dk]``
through its kv-cache graph after its cache (one call, ``seq = k + 1``), keeps the longest prefix of
drafts it agrees with plus one token of its own (the correction, or a bonus token when every draft
was kept), and rolls its cache back past the rest. Nothing is recompiled: the kv-cache graph takes
any number of new tokens after any past.

Lossless: greedy decoding gives exactly the tokens of plain ``generate`` (a draft is kept only
where it equals the target's argmax, and the target's own choice follows). Sampling uses the
standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): draft token ``d`` drawn from
``q`` is kept with probability ``min(1, p(d) / q(d))``, else a token is drawn from
``max(p - q, 0)`` normalized, so every emitted token is distributed as the target's ``p``. Prompt
lookup proposes deterministically (``q`` is one-hot on ``d``): kept with probability ``p(d)``,
else drawn from ``p`` without ``d``.

Drafters:

- :class:`PromptLookup` (``"prompt-lookup"``): the longest recent n-gram of the row (``ngram``
  tokens down to 1) is looked up earlier in the prompt and the text so far; the tokens that
  followed it are the draft. No second model; it pays on input-grounded text (summaries, edits,
  code, "repeat this passage") and backs off where drafts keep failing.
- :class:`Draft`: another graphopt artifact compiled with ``kv-cache`` over the same vocabulary
  (a smaller model, a pruned or shallower copy of the target), decoding ``num_tokens`` tokens per
  step with its own cache, rolled back with the target's.

Draft length adapts per step like Hugging Face's "heuristic" schedule: +2 after a step where every
draft was kept, -1 otherwise (at least 1, at most ``max_tokens``).

Batches: every row is checked in the same target call; rows keep different numbers of tokens. The
cache of a row that kept fewer than the batch's longest keeps masked columns (the kv-cache graph
numbers positions by the cumulative padding mask, so a masked column changes nothing); columns
rejected by every row are cut off, and the cache is compacted (every row's kept columns moved
right, padding on the left) when the artifact's length would not hold the next check.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graphopt.errors import InputError

if TYPE_CHECKING:
    from graphopt.runtime.engine import Engine
    from graphopt.runtime.generation import Request

__all__ = ["PromptLookup", "Draft", "resolve"]


@dataclass
class PromptLookup:
    """Drafts from n-gram matches in the prompt and the text generated so far.

    ``ngram``: the longest suffix matched (tried from ``ngram`` tokens down to 1); ``num_tokens``:
    the draft length to start with (adapted per step between 1 and ``max_tokens``)."""

    ngram: int = 3
    num_tokens: int = 8
    max_tokens: int = 16
    adaptive: bool = True

    def __post_init__(self) -> None:
        _check_counts(self, ngram=self.ngram)

    @property
    def name(self) -> str:
        return "prompt-lookup"


@dataclass
class Draft:
    """Drafts from a smaller graphopt artifact (compiled with ``kv-cache``, same vocabulary):
    ``engine`` is a loaded :class:`~graphopt.runtime.engine.Engine` or an artifact directory."""

    engine: Any
    num_tokens: int = 4
    max_tokens: int = 16
    adaptive: bool = True
    #: a row stops drafting at a token whose draft probability is below this (Hugging Face's
    #: ``assistant_confidence_threshold``, 0.4 there). Off by default: knowing the next token's
    #: probability costs the draft call anyway, and on the CPU a wider check costs the target
    #: little, so stopping early lost more accepted tokens than it saved (trained decoder, 1-layer draft)
    confidence: float = 0.0

    def __post_init__(self) -> None:
        _check_counts(self)
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) \
                or not 0 <= self.confidence < 1:
            raise InputError(f"Draft(confidence=...) must be a number in [0, 1), got {self.confidence!r}")
        if isinstance(self.engine, (str, Path)):
            import graphopt

            path = Path(self.engine)
            if not (path / "manifest.json").is_file():
                raise InputError(f"draft artifact {path} does not exist (no manifest.json there); compile the draft "
                                 "model with --pipeline cleanup,fuse,kv-cache first, or pass speculative='prompt-lookup'")
            self.engine = graphopt.load(path)

    @property
    def name(self) -> str:
        return f"draft {self.engine.path.name}"


def _check_counts(opts: Any, **extra: int) -> None:
    for key, value in {"num_tokens": opts.num_tokens, "max_tokens": opts.max_tokens, **extra}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{type(opts).__name__}({key}=...) must be an int >= 1, got {value!r}")
    if opts.num_tokens > opts.max_tokens:
        raise InputError(f"{type(opts).__name__}: num_tokens ({opts.num_tokens}) exceeds max_tokens "
                         f"({opts.max_tokens}); raise max_tokens or lower num_tokens")


def resolve(speculative: Any) -> PromptLookup | Draft:
    """``speculative=`` of ``generate``/``stream`` as an options object: ``"prompt-lookup"``, a
    draft artifact directory, a loaded Engine, or :class:`PromptLookup` / :class:`Draft`."""
    from graphopt.runtime.engine import Engine

    if isinstance(speculative, (PromptLookup, Draft)):
        return speculative
    if isinstance(speculative, Engine):
        return Draft(speculative)
    if isinstance(speculative, str) and speculative.strip().lower() in ("prompt-lookup", "prompt_lookup", "ngram"):
        return PromptLookup()
    if isinstance(speculative, (str, Path)):
        return Draft(speculative)
    raise InputError(f"speculative must be 'prompt-lookup', a draft artifact directory, a loaded Engine, "
                     f"graphopt.speculative.PromptLookup(...) or graphopt.speculative.Draft(...); got "
                     f"{type(speculative).__name__}")


# -- the cache of one kv-cache artifact, rolled back per row ---------------------------------------
class _Cache:
    """A kv-cache artifact's cache (torch tensors) with per-row rollback.

    ``cols`` is the cache length in use (dynamic: the tensors' length; static: the next slot).
    Rolled-back columns get mask 0; columns masked in every row at the end are cut off (dynamic)
    or returned to the free slots (static: their mask is cleared)."""

    def __init__(self, engine: Engine, batch: int):
        from graphopt.runtime.generation import empty_cache_input

        self.engine = engine
        self.gen = gen = engine.manifest["generation"]
        self.static = bool(gen.get("static"))
        specs = {s.name: s for s in engine.inputs}
        self.names = list(gen["cache_inputs"])
        self.mask_name = next(n for n in self.names if "mask" in n)
        self.outputs = dict(zip(gen["cache_outputs"], gen["cache_inputs"]))
        self.cache = {n: empty_cache_input(specs[n], batch) for n in self.names}
        # the shortest past the program takes (one masked slot where torch.export refused an empty one)
        self.min_past = 0 if self.static else specs[self.names[0]].dynamic.get(1, (0, 0))[0]
        self.cols = self.min_past
        self.capacity = int(gen["max_len"])
        self.calls = 0
        # ONNX Runtime on the CPU, no dtype conversions: its session is called directly (the
        # runner's per-call checks and conversions cost as much as a small draft's forward)
        runner = engine.runner
        direct = (engine.target == "onnx" and getattr(runner, "device", None) == "cpu"
                  and getattr(runner, "session", None) is not None
                  and all(d is None for d in getattr(runner, "output_dtypes", [object()])))
        self.session = runner.session if direct else None

    @property
    def mask(self) -> torch.Tensor:
        return self.cache[self.mask_name]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` [B, s] (``mask`` 0 for padding) after the cache: logits [B, s, V]."""
        gen = self.gen
        feed = {gen["ids"]: ids, gen["attention_mask"]: mask, **self.cache}
        if self.static:
            feed[gen["cache_position"]] = torch.tensor([self.cols], dtype=torch.int64)
        if self.session is not None:
            arrays = self.session.run(None, {n: np.ascontiguousarray(feed[n].numpy()) for n in self.engine.input_names})
            outs = dict(zip(self.engine.output_names, (torch.from_numpy(a) for a in arrays)))
        else:
            outs = dict(zip(self.engine.output_names,
                            self.engine.runner.run([feed[n] for n in self.engine.input_names])))
        self.cache = {past: torch.as_tensor(outs[present]) for present, past in self.outputs.items()}
        self.cols += ids.shape[1]
        self.calls += 1
        return torch.as_tensor(outs[gen["logits"]])

    def feed(self, rows: list[list[int]]) -> torch.Tensor:
        """One call with each row's tokens right-aligned (shorter rows padded on the left, masked;
        an empty row is all padding): the last column's logits [B, V]."""
        width = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.int64)
                mask[i, width - len(r):] = 1
        return self.forward(ids, mask)[:, -1, :]

    def drop(self, counts: list[int]) -> None:
        """Roll row ``i`` back by its last ``counts[i]`` columns (the newest call's, at most)."""
        common = min(counts)
        if any(n > common for n in counts) and self.mask.is_inference():
            # the torch runner returns inference tensors, which refuse in-place updates
            self.cache[self.mask_name] = self.mask.clone()
        for i, n in enumerate(counts):
            if n > common:
                self.mask[i, self.cols - n: self.cols - common] = 0
        if common:
            self._cut(self.cols - common)

    def _cut(self, cols: int) -> None:
        if self.static:
            if self.mask.is_inference():
                self.cache[self.mask_name] = self.mask.clone()
            self.mask[:, cols:] = 0
        else:
            self.cache = {n: (t[:, :cols] if t.dim() == 2 else t[:, :, :cols]).contiguous()
                          for n, t in self.cache.items()}
        self.cols = cols

    def room(self) -> int:
        """Tokens one more call may append."""
        return self.capacity - self.cols

    def compact(self) -> None:
        """Move every row's kept (mask 1) columns to the right end, padding on the left; the cache
        shrinks to the longest row. One copy of the cache."""
        m = self.mask[:, : self.cols].ne(0)
        counts = m.sum(1)
        cols = max(int(counts.max()), self.min_past)
        if cols == self.cols:
            return
        # row i's kept columns, in order, land at cols - counts[i] .. cols - 1
        order = torch.sort(m.to(torch.int8), dim=1, stable=True).indices[:, self.cols - cols:]
        new = {}
        for name, t in self.cache.items():
            if t.dim() == 2:
                part = t[:, : self.cols].gather(1, order)
            else:
                idx = order[:, None, :, None].expand(t.shape[0], t.shape[1], cols, t.shape[3])
                part = t[:, :, : self.cols].gather(2, idx)
            if self.static:
                full = torch.zeros_like(t)
                (full[:, :cols] if t.dim() == 2 else full[:, :, :cols]).copy_(part)
                part = full
            new[name] = part.contiguous()
        self.cache = new
        self.cols = cols


def _tokenizer_sha(engine: Engine) -> str | None:
    name = engine.manifest.get("tokenizer")
    if not name:
        return None
    entry = (engine.manifest.get("files") or {}).get(name) or {}
    if entry.get("sha256"):
        return str(entry["sha256"])
    path = engine.path / name
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_draft(target: Engine, draft: Engine) -> None:
    """The draft must decode with a cache over the target's vocabulary and tokenizer."""
    from graphopt.runtime.generation import limits

    dl = limits(draft.manifest)
    if dl.kind != "kv-cache":
        raise InputError(f"draft artifact {draft.path} was compiled without the kv-cache pass; a draft decodes a "
                         "token per call with its cache: compile it with --pipeline cleanup,fuse,kv-cache")
    if draft.target == "tensorrt":
        raise InputError("a TensorRT engine cannot be the draft (its step profile takes one token after a "
                         "prompt); compile the draft for the onnx target")
    tl = limits(target.manifest)
    if dl.vocab != tl.vocab:
        raise InputError(f"draft artifact {draft.path} has a vocabulary of {dl.vocab} tokens, the target "
                         f"{tl.vocab}; a draft must share the target's tokenizer: compile a draft of the same "
                         "model family (a pruned or shallower copy of the target's checkpoint)")
    a, b = _tokenizer_sha(target), _tokenizer_sha(draft)
    if a is not None and b is not None and a != b:
        raise InputError(f"draft artifact {draft.path} ships another tokenizer than the target (tokenizer.json "
                         f"sha256 {b[:12]}… vs {a[:12]}…); its token ids would mean other text: compile the draft "
                         "with the target's tokenizer")
    if dl.batch[1] < tl.batch[0]:
        raise InputError(f"draft artifact {draft.path} takes batches of {dl.batch[0]}..{dl.batch[1]} rows")


# -- drafters --------------------------------------------------------------------------------------
class _LookupDrafter:
    def __init__(self, opts: PromptLookup):
        self.opts = opts

    def start(self, rows: list[list[int]]) -> None:
        pass

    def propose(self, rows: list[list[int]], active: list[bool], k: int, req: Request
                ) -> tuple[list[list[int]], torch.Tensor | None]:
        return [_lookup(r, self.opts.ngram, k) if a else [] for r, a in zip(rows, active)], None

    def commit(self, kept: list[int], proposed: list[int], active: list[bool]) -> None:
        pass


def _lookup(seq: list[int], ngram: int, k: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the row's last ``n`` tokens
    (longest ``n`` first), at most ``k``. A copy that reaches the end of the text (the text
    repeats with a period of ``d`` tokens) goes on copying what it drafted: the period again."""
    n_tok = len(seq)
    for n in range(min(ngram, n_tok - 1), 0, -1):
        tail = seq[n_tok - n:]
        first = tail[0]
        for i in range(n_tok - n - 1, -1, -1):
            if seq[i] == first and seq[i: i + n] == tail:
                cont = seq[i + n: i + n + k]
                if cont:
                    return [cont[j % len(cont)] for j in range(k)] if i + n + len(cont) == n_tok else cont
    return []


class _ModelDrafter:
    """A draft artifact with its own cache: it has fed ``fed[i]`` tokens of row ``i``."""

    def __init__(self, opts: Draft, batch: int):
        self.engine: Engine = opts.engine
        self.cache = _Cache(self.engine, batch)
        self.fed = [0] * batch
        self.confidence = float(opts.confidence)
        self.added = self.width = 0  # columns the last proposal appended; its first call's
        self.pending: list[int] = []
        self.fed_drafts: list[int] = []

    def start(self, rows: list[list[int]]) -> None:
        self.cache.feed([r[:-1] for r in rows])  # the prompt; its last token is fed with the first draft
        self.fed = [len(r) - 1 for r in rows]

    def propose(self, rows: list[list[int]], active: list[bool], k: int, req: Request
                ) -> tuple[list[list[int]], torch.Tensor | None]:
        from graphopt.runtime.generation import filtered_scores

        pending = [r[f:] if a else [] for r, f, a in zip(rows, self.fed, active)]
        width = max(len(p) for p in pending)
        self.added = 0
        if self.cache.room() < width + k - 1:
            self.cache.compact()
        k = min(k, self.cache.room() - width + 1)
        if k < 1:
            return [[] for _ in rows], None
        logits = self.cache.feed(pending)
        self.added = self.width = width
        self.pending = [len(p) for p in pending]
        drafts: list[list[int]] = [[] for _ in rows]
        drafting = list(active)
        fed_drafts = [0] * len(rows)
        qs = []
        for j in range(k):
            if req.temperature > 0:
                q = torch.softmax(filtered_scores(logits, req.temperature, req.top_k), -1)
                tok = torch.multinomial(q, 1, generator=req.generator).squeeze(-1)
                qs.append(q)
            else:
                q = torch.softmax(logits.float(), -1) if self.confidence else None
                tok = logits.argmax(-1)
            if self.confidence and j:  # a draft the drafter doubts is not worth a check (HF's threshold);
                top = q.max(-1).values  # the first is always proposed (one draft call buys it anyway)
                drafting = [d and float(top[i]) >= self.confidence for i, d in enumerate(drafting)]
            for i, d in enumerate(drafting):
                if d:
                    drafts[i].append(int(tok[i]))
            if j == k - 1 or not any(drafting):
                break
            logits = self.cache.feed([[drafts[i][-1]] if d else [] for i, d in enumerate(drafting)])
            self.added += 1
            fed_drafts = [f + 1 if d else f for f, d in zip(fed_drafts, drafting)]
        self.fed_drafts = fed_drafts
        return drafts, (torch.stack(qs, 1)[:, : max(len(d) for d in drafts)] if qs else None)

    def commit(self, kept: list[int], proposed: list[int], active: list[bool]) -> None:
        """Row ``i`` kept ``kept[i]`` of its ``proposed[i]`` drafts; the draft fed it
        ``fed_drafts[i]`` of them (all but the last, unless the row stopped drafting early): the
        draft's cache keeps the row's pending tokens and the kept drafts it fed, and drops every
        column of this round after them (rows that took no part: the whole round, padding)."""
        if not self.added:
            return
        kept_fed = [min(k, f) for k, f in zip(kept, self.fed_drafts)]
        self.cache.drop([self.added - (self.width + kf) if a else self.added
                         for kf, a in zip(kept_fed, active)])
        self.fed = [f + (p + kf if a else 0) for f, p, kf, a in zip(self.fed, self.pending, kept_fed, active)]
        self.added = 0  # a step without drafts (k = 0) commits nothing


# -- the decoding loop -----------------------------------------------------------------------------
@dataclass
class Stats:
    """What speculation did in one ``generate``/``stream`` call (``out.speculation``)."""

    method: str
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    steps: list[float] = field(default_factory=list)  # mean draft length of the rows that drafted, per step

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else 0.0,
                "target_calls": self.target_calls, "draft_calls": self.draft_calls,
                "mean_draft_length": round(sum(self.steps) / len(self.steps), 2) if self.steps else 0.0}


def stream_speculative(engine: Engine, req: Request, opts: PromptLookup | Draft) -> Iterator[torch.Tensor]:
    """Speculative decoding of a checked request (see the module docstring)."""
    from graphopt.runtime.generation import filtered_scores, mark

    B = req.ids.shape[0]
    mask = req.attention_mask if req.attention_mask is not None else torch.ones_like(req.ids)
    rows = [req.ids[i][mask[i].bool()].tolist() for i in range(B)]
    prompt_len = req.ids.shape[1]
    target = _Cache(engine, B)
    drafter: _LookupDrafter | _ModelDrafter
    if isinstance(opts, Draft):  # checked by Engine._start, before the first step
        drafter = _ModelDrafter(opts, B)
    else:
        drafter = _LookupDrafter(opts)
    stats = Stats(opts.name)
    n_new = req.new_tokens
    eos = set(req.eos.tolist()) if req.eos is not None else set()
    pad = int(req.eos[0]) if req.eos is not None else 0
    new: list[list[int]] = [[] for _ in range(B)]  # each row's new tokens (up to its first eos)
    finished = [False] * B
    yielded = 0

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if req.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(filtered_scores(logits, req.temperature, req.top_k), -1)
        return torch.multinomial(probs, 1, generator=req.generator).squeeze(-1)

    def add(i: int, tokens: list[int]) -> None:
        for t in tokens:
            if finished[i] or len(new[i]) >= n_new:
                return
            new[i].append(t)
            rows[i].append(t)
            if t in eos:
                finished[i] = True

    def ready() -> int:
        """Columns every row has (a finished row has them all)."""
        open_rows = [len(new[i]) for i in range(B) if not finished[i]]
        return min(open_rows) if open_rows else max(len(r) for r in new)

    def emit(upto: int, end: str | None) -> torch.Tensor:
        out = torch.full((B, prompt_len + upto), pad, dtype=torch.int64)
        out[:, :prompt_len] = req.ids
        for i in range(B):
            got = new[i][:upto]
            out[i, prompt_len: prompt_len + len(got)] = torch.tensor(got, dtype=torch.int64)
        ended = torch.tensor([finished[i] and len(new[i]) <= upto for i in range(B)])
        seq = mark(out, ended, end)
        seq.speculation = stats.as_dict()
        return seq

    # prefill: the target reads the prompt, the drafter its own copy
    logits = target.forward(req.ids, mask)[:, -1, :]
    stats.target_calls += 1
    first = pick(logits)
    for i in range(B):
        add(i, [int(first[i])])
    drafter.start(rows)
    policy = _Policy(opts)
    while True:
        ready_now = ready()
        done = all(finished[i] or len(new[i]) >= n_new for i in range(B))
        while yielded < ready_now:
            yielded += 1
            yield emit(yielded, req.end if done and yielded == ready_now else None)
        if done:
            if isinstance(drafter, _ModelDrafter):
                stats.draft_calls = drafter.cache.calls
            return
        active = [not finished[i] and len(new[i]) < n_new for i in range(B)]
        # the target's check appends k + 1 columns; never more than the rows still need
        need = max(n_new - len(new[i]) for i in range(B) if active[i])
        k_now = min(policy.k(), need - 1)
        if target.room() < k_now + 1:
            target.compact()
        k_now = max(0, min(k_now, target.room() - 1))
        drafts: list[list[int]] = [[] for _ in range(B)]
        q = None
        t0 = time.perf_counter()
        calls0 = drafter.cache.calls if isinstance(drafter, _ModelDrafter) else 0
        if k_now > 0:
            drafts, q = drafter.propose(rows, active, k_now, req)
            if isinstance(drafter, _ModelDrafter):
                stats.draft_calls = drafter.cache.calls
        t_draft = time.perf_counter() - t0
        draft_calls = (drafter.cache.calls - calls0) if isinstance(drafter, _ModelDrafter) else 0
        proposed = [len(d) for d in drafts]
        width = max(proposed) + 1
        ids = torch.zeros(B, width, dtype=torch.int64)
        feed_mask = torch.zeros(B, width, dtype=torch.int64)
        for i in range(B):
            if active[i]:
                toks = [rows[i][-1], *drafts[i]]
                ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.int64)
                feed_mask[i, : len(toks)] = 1
        t0 = time.perf_counter()
        logits = target.forward(ids, feed_mask)  # [B, width, V]
        t_target = time.perf_counter() - t0
        stats.target_calls += 1
        kept = [0] * B
        for i in range(B):
            if not active[i]:
                continue
            d = drafts[i]
            if req.temperature <= 0:
                choice = logits[i, : len(d) + 1].argmax(-1).tolist()
                a = 0
                while a < len(d) and d[a] == choice[a]:
                    a += 1
                tokens = d[:a] + [choice[a]]
            else:
                tokens, a = _rejection_sample(logits[i, : len(d) + 1], d, None if q is None else q[i], req)
            kept[i] = a
            add(i, tokens)
        stats.proposed += sum(p for p, a in zip(proposed, active) if a)
        stats.accepted += sum(kept)
        live_rows = [p for p, a in zip(proposed, active) if a and p]
        if live_rows:
            stats.steps.append(sum(live_rows) / len(live_rows))
        # roll back: row i keeps [last, d1..d_a]; the columns after them go
        target.drop([width - (kept[i] + 1) if active[i] else width for i in range(B)])
        drafter.commit(kept, proposed, active)
        live = [i for i in range(B) if active[i] and proposed[i]]
        policy.observe([proposed[i] for i in live], [kept[i] for i in live], t_target,
                       t_draft, draft_calls, rounds_drafted=bool(live))


class _Policy:
    """The draft length of the next step.

    Like Hugging Face's heuristic it lengthens drafts that keep being accepted and shortens ones
    that do not, but on the measured economics of this machine: ``alpha``, the chance that a
    draft token is accepted once the ones before it were (counts decayed per step, so it follows
    the text), the target's call time and the drafter's time per drafted token. The next length
    ``k`` maximizes the expected tokens per second of a step, ``(1 - alpha^(k+1)) / (1 - alpha)``
    tokens for ``t_target + k * t_draft``; when no length beats a plain step (``1 / t_target``)
    by 5 % the step is plain, and one draft token is probed after 8 plain steps (16, 32, ...
    while probes keep failing) so that the estimate can recover. ``adaptive=False`` keeps
    ``num_tokens``."""

    DECAY = 0.9

    def __init__(self, opts: PromptLookup | Draft):
        self.opts = opts
        self.tried, self.accepted = 2.0, 1.0  # a prior of alpha = 0.5, worth two draft tokens
        self.t_target: float | None = None
        self.t_draft = 0.0  # seconds per drafted token
        self.plain_steps = 0  # plain steps since the last drafting one
        self.probe_every = 8  # doubles while probes fail
        self.last = opts.num_tokens

    def k(self) -> int:
        if not self.opts.adaptive or self.t_target is None:
            return self.opts.num_tokens
        alpha = min(self.accepted / self.tried, 0.98)
        best_k, best_rate = 0, 1.05 / self.t_target  # drafting must win by 5 % (the loop's own costs)
        gain = 1.0
        for k in range(1, self.opts.max_tokens + 1):
            gain += alpha ** k  # expected tokens of a step: 1 + alpha + ... + alpha^k
            rate = gain / (self.t_target + k * self.t_draft)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k == 0:
            self.plain_steps += 1
            if self.plain_steps >= self.probe_every:
                best_k = 1
        self.last = best_k
        return best_k

    def observe(self, proposed: list[int], kept: list[int], t_target: float, t_draft: float, draft_calls: int,
                rounds_drafted: bool) -> None:
        self.t_target = t_target if self.t_target is None else 0.8 * self.t_target + 0.2 * t_target
        if not rounds_drafted:
            return
        if self.plain_steps >= self.probe_every:  # that was a probe: back off while probes fail
            self.probe_every = 8 if sum(kept) else min(2 * self.probe_every, 256)
        self.plain_steps = 0
        drafted = max(proposed)
        per_token = t_draft / drafted if drafted else 0.0
        self.t_draft = per_token if not self.t_draft else 0.8 * self.t_draft + 0.2 * per_token
        # per row: the accepted tokens were tried and kept; the first rejected one was tried
        tried = sum(min(p, k + 1) for p, k in zip(proposed, kept))
        self.tried = self.DECAY * self.tried + tried
        self.accepted = self.DECAY * self.accepted + sum(kept)


def _rejection_sample(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, req: Request
                      ) -> tuple[list[int], int]:
    """One row's kept drafts and next token by the rejection rule: ``logits`` [len(drafts) + 1, V]
    of the target, ``q`` [len(drafts), V] the drafter's probabilities (None: one-hot drafts)."""
    from graphopt.runtime.generation import filtered_scores

    p = torch.softmax(filtered_scores(logits, req.temperature, req.top_k), -1)
    g = req.generator
    for j, d in enumerate(drafts):
        qd = 1.0 if q is None else float(q[j, d])
        pd = float(p[j, d])
        u = float(torch.rand((), generator=g))
        if qd > 0 and u < min(1.0, pd / qd):
            continue
        residual = p[j].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[j]).clamp_min(0.0)
        total = float(residual.sum())
        if total <= 0:  # p == q: any draw from p is exact
            residual = p[j]
        tok = int(torch.multinomial(residual, 1, generator=g))
        return drafts[:j] + [tok], j
    tok = int(torch.multinomial(p[len(drafts)], 1, generator=g))
    return list(drafts) + [tok], len(drafts)
