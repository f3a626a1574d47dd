"""Token generation on an Engine: argument checks, length limits, sampling and the decoding loops.

Without a KV cache every step reruns the whole sequence (what HF does with use_cache=False).
That is correct for any decoder artifact that maps token ids (and optionally an attention mask)
to logits for every position; the kv-cache pass gives the fast path.

Every request is checked BEFORE the first step (:func:`prepare`): argument types, the batch and
prompt length against the compiled ranges, and prompt + ``max_new_tokens`` against the longest
sequence the artifact holds (:func:`limits`). A request that does not fit is an
:class:`InputError` unless ``truncate=True``, which stops at the limit with stop reason
``"length"``; generation never returns fewer tokens than asked without saying why.

Why the limit is "prompt + new tokens <= the compiled sequence maximum": the last token is never
fed back, so the graph could produce one more, but every sequence ``generate`` returns stays a
valid input of the same artifact (scoring it, continuing it), and the number a user compiled with
(``--dynamic input_ids:1=1..256``) is the number they get.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graphopt.errors import InputError
from graphopt.ir.graph_ir import TensorSpec

if TYPE_CHECKING:
    from graphopt.runtime.engine import Engine

#: Why decoding stopped: every row produced ``eos_token_id``; the artifact's maximum length was
#: reached (only with ``truncate=True``); ``max_new_tokens`` were generated.
STOP_EOS, STOP_LENGTH, STOP_MAX_NEW_TOKENS = "eos", "length", "max_new_tokens"


def filtered_scores(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Sampling scores of logits [..., V]: divided by ``temperature``, all but the ``top_k`` best
    set to -inf (softmax of them is the distribution a token is drawn from)."""
    scores = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return scores


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]: argmax at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = filtered_scores(logits, temperature, top_k)
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=gen).squeeze(-1)


def _roles(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> tuple[str, str | None, str]:
    names = [s.name for s in inputs]
    ids = next((s.name for s in inputs if s.dtype.startswith("int") and s.name != "attention_mask"), None)
    if ids is None:
        raise InputError("this artifact has no integer token-id input; generate() needs a decoder LM artifact")
    mask = "attention_mask" if "attention_mask" in names else None
    others = [n for n in names if n not in (ids, mask)]
    if others:
        raise InputError(f"generate() cannot fill the inputs {others}; it drives token ids and attention_mask only")
    logits = next((s.name for s in outputs if s.name == "logits"), None) or \
        next((s.name for s in outputs if len(s.shape) == 3), None)
    if logits is None:
        raise InputError("this artifact has no [batch, seq, vocab] logits output; generate() needs a decoder LM")
    return ids, mask, logits


# -- limits --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What a decoder artifact can generate, read from its manifest.

    ``max_len`` bounds prompt + new tokens; ``prompt`` is the range of prompt lengths one call
    takes; ``batch`` the range of rows. ``kind`` is ``"kv-cache"`` (compiled with the kv-cache
    pass; ``static`` for pre-allocated buffers) or ``"full-prefix"`` (every step recomputes the
    whole sequence).
    """

    kind: str
    static: bool
    max_len: int
    prompt: tuple[int, int]
    batch: tuple[int, int]
    ids: str
    mask: str | None
    logits: str
    vocab: int | None

    def describe(self) -> str:
        """One line for ``graphopt inspect``."""
        kind = ("kv-cache (static, pre-allocated)" if self.static else "kv-cache (dynamic)") \
            if self.kind == "kv-cache" else "full prefix (no KV cache; every step recomputes the prefix)"
        prompt = "" if self.prompt == (1, self.max_len) else f", prompt {self.prompt[0]}..{self.prompt[1]} tokens"
        return (f"{kind}, max length {self.max_len} tokens (prompt + new){prompt}, "
                f"batch {self.batch[0]}..{self.batch[1]}")


def _dim_range(spec: TensorSpec, d: int) -> tuple[int, int] | None:
    if d in spec.dynamic:
        return spec.dynamic[d]
    size = spec.shape[d] if d < len(spec.shape) else None
    return (size, size) if isinstance(size, int) else None


def limits(manifest: dict[str, Any]) -> Limits:
    """The :class:`Limits` of a decoder artifact; :class:`InputError` when it is not one."""
    inputs = [TensorSpec.from_json(s) for s in manifest["inputs"]]
    outputs = [TensorSpec.from_json(s) for s in manifest["outputs"]]
    gen = manifest.get("generation") or {}
    if gen.get("kind") == "kv-cache":
        ids, mask, logits = gen["ids"], gen.get("attention_mask"), gen["logits"]
    else:
        ids, mask, logits = _roles(inputs, outputs)
    ids_spec = next(s for s in inputs if s.name == ids)
    logits_spec = next(s for s in outputs if s.name == logits)
    if len(ids_spec.shape) != 2:
        raise InputError(f"token-id input {ids!r} has shape {ids_spec.shape}, not [batch, seq]; generate() "
                         "needs a decoder LM artifact")
    seq = _dim_range(ids_spec, 1) or (1, 1)
    batch = _dim_range(ids_spec, 0) or (1, 1)
    vocab = logits_spec.shape[-1] if isinstance(logits_spec.shape[-1], int) else None
    if gen.get("kind") == "kv-cache":
        max_len = int(gen["max_len"])
        past = next((s for s in inputs if s.name == (gen.get("cache_inputs") or [""])[0]), None)
        if past is not None and not gen.get("static") and isinstance(past.shape[1], str):
            max_len -= past.dynamic.get(1, (0, 0))[0]  # the padding slot(s) of a program that takes no empty past
        return Limits("kv-cache", bool(gen.get("static")), max_len, (seq[0], min(seq[1], max_len)), batch,
                      ids, mask, logits, vocab)
    return Limits("full-prefix", False, seq[1], seq, batch, ids, mask, logits, vocab)


# -- requests ------------------------------------------------------------------------------------
@dataclass
class Request:
    """One checked generation request: what the decoding loops run."""

    ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor | None  # [B, T] int64; None when the artifact takes no mask
    new_tokens: int  # steps to run: max_new_tokens, or fewer when truncate=True hits the limit
    end: str  # the stop reason when every step runs: "max_new_tokens" or "length"
    temperature: float
    top_k: int | None
    eos: torch.Tensor | None  # 1-D int64 token ids that end a row
    generator: torch.Generator | None
    limits: Limits


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _token_tensor(what: str, value: Any, fix: str) -> torch.Tensor:
    """A torch tensor / numpy array of integers → torch int64 (no copy for int64 tensors)."""
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
            raise InputError(f"{what} must hold integers, got a numpy array of {value.dtype}; {fix}")
        return torch.from_numpy(np.ascontiguousarray(value)).long()
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise InputError(f"{what} must hold integers, got a tensor of {value.dtype}; {fix}")
        return value.detach().cpu().long()
    raise InputError(f"{what} must be a torch.Tensor or numpy array, got {type(value).__name__}; {fix}")


def prepare(engine: Engine, ids: Any, max_new_tokens: Any, *, temperature: Any = 0.0, top_k: Any = None,
            eos_token_id: Any = None, attention_mask: Any = None, seed: Any = None, truncate: Any = False
            ) -> Request:
    """Check every argument of ``generate``/``stream`` against the artifact, before any step runs."""
    lim = limits(engine.manifest)
    # token ids
    seq = _token_tensor("ids (the prompt token ids)", ids,
                        "pass token ids as an integer tensor [batch, seq], e.g. torch.tensor([[1, 2, 3]]) "
                        "(tokenize text first)")
    if isinstance(ids, torch.Tensor) and ids.dtype == torch.bool or isinstance(ids, np.ndarray) and ids.dtype == np.bool_:
        raise InputError("ids must hold integer token ids, got booleans; pass torch.tensor([[1, 2, 3]])")
    if seq.dim() == 1:
        seq = seq.unsqueeze(0)
    if seq.dim() != 2:
        raise InputError(f"ids must be [batch, seq] (or [seq] for one prompt), got shape {tuple(seq.shape)}")
    B, T = seq.shape
    if B == 0 or T == 0:
        raise InputError(f"ids has shape {tuple(seq.shape)}: the prompt is empty; pass at least one token")
    if lim.vocab is not None and (int(seq.min()) < 0 or int(seq.max()) >= lim.vocab):
        bad = int(seq.min()) if int(seq.min()) < 0 else int(seq.max())
        raise InputError(f"ids holds token id {bad}, outside the artifact's vocabulary 0..{lim.vocab - 1}; "
                         "was the prompt tokenized with this model's tokenizer?")
    # scalar options
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, (bool, np.bool_)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InputError(f"top_k must be None (no cut) or an int >= 1, got {top_k!r}")
    if seed is not None and not _is_int(seed):
        raise InputError(f"seed must be None or an int, got {seed!r}")
    if not isinstance(truncate, (bool, np.bool_)):
        raise InputError(f"truncate must be True or False, got {truncate!r}")
    eos = None
    if eos_token_id is not None:
        many = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        if not many or not all(_is_int(e) for e in many):
            raise InputError(f"eos_token_id must be None, an int or a list of ints, got {eos_token_id!r}")
        out = [e for e in many if e < 0 or (lim.vocab is not None and e >= lim.vocab)]
        if out:
            raise InputError(f"eos_token_id {out[0]} is outside the artifact's vocabulary "
                             f"0..{(lim.vocab or 0) - 1}; decoding could never produce it")
        eos = torch.tensor([int(e) for e in many], dtype=torch.int64)
    # attention mask
    mask = None
    if attention_mask is not None:
        if lim.mask is None:
            raise InputError("this artifact takes no attention_mask (it was compiled without one), so it cannot "
                             "decode left-padded prompts; drop attention_mask, or recompile with attention_mask "
                             "as an input")
        mask = _token_tensor("attention_mask", attention_mask, "pass 1 for real tokens and 0 for padding, "
                             "as an integer or bool tensor shaped like ids")
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != (B, T):
            raise InputError(f"attention_mask has shape {tuple(mask.shape)} but the prompt ids have {(B, T)}; "
                             "pass one mask value per token")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InputError("attention_mask must hold only 0 (padding) and 1 (real token)")
        empty = [i for i in range(B) if not bool(mask[i].any())]
        if empty:
            raise InputError(f"attention_mask row {empty[0]} is all padding; every prompt needs at least one token")
    elif lim.mask is not None:
        mask = torch.ones_like(seq)
    # the artifact's ranges
    lo_b, hi_b = lim.batch
    if not lo_b <= B <= hi_b:
        raise InputError(f"ids has {B} rows but the artifact takes a batch of {lo_b}..{hi_b}; split the batch, "
                         f"or recompile with --dynamic {lim.ids}:0=1..{B}")
    lo_t, hi_t = lim.prompt
    if lim.kind == "full-prefix" and lo_t == hi_t:
        raise InputError(f"this artifact was compiled for a fixed sequence length of {hi_t} tokens ({lim.ids} dim "
                         "1 is static), so a sequence cannot grow; recompile with a dynamic sequence dim, e.g. "
                         f"--dynamic {lim.ids}:1=1..{max(T + max_new_tokens, 2)}")
    if lim.kind == "kv-cache" and lo_t > 1:
        raise InputError(f"this artifact's program rejects single-token steps ({lim.ids} dim 1 starts at "
                         f"{lo_t}; see the lowering notes in report.json), so it cannot decode with its cache; "
                         "compile it for the onnx target")
    if T < lo_t:
        raise InputError(f"the prompt has {T} token(s) but the artifact takes at least {lo_t} ({lim.ids} dim 1 "
                         f"range {lo_t}..{hi_t}); pass a longer prompt")
    if T > hi_t:
        raise InputError(f"the prompt has {T} tokens but the artifact takes at most {hi_t} in one call; shorten "
                         f"the prompt, or {_recompile_hint(lim, T + max_new_tokens)}")
    room = lim.max_len - T
    new_tokens, end = max_new_tokens, STOP_MAX_NEW_TOKENS
    if max_new_tokens > room:
        if not truncate:
            raise InputError(
                f"the prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} tokens exceeds "
                f"the {lim.max_len} tokens this artifact holds (prompt + new); lower max_new_tokens to {room}, "
                f"pass truncate=True (--truncate) to stop at the limit, or "
                f"{_recompile_hint(lim, T + max_new_tokens)}" if room > 0 else
                f"the prompt ({T} tokens) already fills the {lim.max_len} tokens this artifact holds (prompt + new), "
                f"so no token can be added; shorten the prompt, pass truncate=True (--truncate) to get it back "
                f"unchanged, or {_recompile_hint(lim, T + max_new_tokens)}")
        new_tokens, end = room, STOP_LENGTH
    g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return Request(seq, mask, new_tokens, end, float(temperature), None if top_k is None else int(top_k), eos, g, lim)


def _recompile_hint(lim: Limits, need: int) -> str:
    if lim.kind == "kv-cache" and lim.static:
        return f"recompile with a larger cache, e.g. kv-cache(static=true,max_len={need})"
    return f"recompile with a larger sequence range, e.g. --dynamic {lim.ids}:1={lim.prompt[0]}..{need}"


def mark(seq: torch.Tensor, finished: torch.Tensor, end: str | None) -> torch.Tensor:
    """Attach why decoding stopped to a yielded sequence.

    ``seq.stop_reasons`` has one entry per row: ``"eos"`` for rows that produced an eos token, else
    ``end`` (``None`` while decoding goes on). ``seq.stop_reason`` is ``"eos"`` when every row did,
    else ``end``.
    """
    rows = finished.tolist()
    seq.stop_reasons = [STOP_EOS if f else end for f in rows]
    seq.stop_reason = STOP_EOS if rows and all(rows) else end
    return seq


def _advance(req: Request, logits: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """Pick each row's next token; rows that already ended keep emitting eos (updates ``finished``)."""
    nxt = pick_next(logits, req.temperature, req.top_k, req.generator)
    if req.eos is not None:
        nxt = torch.where(finished, req.eos[0], nxt)
        finished |= torch.isin(nxt, req.eos)
    return nxt[:, None].long()


def stream_full_prefix(engine: Engine, req: Request) -> Iterator[torch.Tensor]:
    """Rerun the whole sequence every step."""
    lim = req.limits
    seq, mask = req.ids, req.attention_mask
    out_index = engine.output_names.index(lim.logits)
    finished = torch.zeros(seq.shape[0], dtype=torch.bool)
    for step in range(req.new_tokens):
        feed = {lim.ids: seq}
        if lim.mask is not None:
            feed[lim.mask] = mask
        logits = engine.run_flat(engine.bind(**feed))[out_index]
        seq = torch.cat([seq, _advance(req, torch.as_tensor(logits)[:, -1, :].cpu(), finished)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        done = step == req.new_tokens - 1 or bool(finished.all())
        yield mark(seq, finished, req.end if done else None)
        if done:
            return


# -- artifacts with a KV cache (compiled with the kv-cache pass) -------------------------------
def empty_cache_input(spec: TensorSpec, batch: int) -> torch.Tensor:
    """A cache input before the first token: zeros, of the fixed length of a static cache, else of
    the shortest past the artifact takes (0; 1 where its program refuses an empty past, as
    torch.export programs may: one zero slot, masked as padding, changes nothing)."""
    from graphopt.ir.graph_ir import dtype_from_name

    shape = [batch if i == 0 else (spec.dynamic.get(i, (0, 0))[0] if isinstance(s, str) else int(s))
             for i, s in enumerate(spec.shape)]
    return torch.zeros(shape, dtype=dtype_from_name(spec.dtype))



class _TensorStepper:
    """Any runner: flat inputs in manifest order, outputs by name (torch tensors)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def empty(self, spec: Any, batch: int) -> Any:
        return empty_cache_input(spec, batch)

    def step(self, feed: dict[str, Any]) -> dict[str, Any]:
        outs = self.engine.runner.run([feed[n] for n in self.engine.input_names])
        return dict(zip(self.engine.output_names, outs))

    def to_torch(self, value: Any) -> torch.Tensor:
        return torch.as_tensor(value)


class _OrtStepper(_TensorStepper):
    """ONNX Runtime with IOBinding: the cache stays in OrtValues that the session wrote, bound as
    the next step's inputs without a round trip through numpy. Static caches (fixed length) are
    pre-allocated twice and the session writes each step into the other set (ping-pong), so
    decoding allocates nothing per token."""

    def __init__(self, engine: Engine, static: bool, cache_outputs: list[str], batch: int):
        super().__init__(engine)
        import onnxruntime as ort

        self.ort = ort
        self.sess = engine.runner.session
        self.device = "cuda" if engine.runner.device == "cuda" else "cpu"
        self.static = static
        self.cache_outputs = cache_outputs
        self.buffers: list[dict[str, Any]] = []
        if static:
            specs = {s.name: s for s in engine.outputs}
            for _ in range(2):
                self.buffers.append({name: ort.OrtValue.ortvalue_from_numpy(
                    self.empty(specs[name], batch).numpy(), self.device) for name in cache_outputs})
        self.turn = 0

    def empty(self, spec: Any, batch: int) -> Any:
        return super().empty(spec, batch)

    def step(self, feed: dict[str, Any]) -> dict[str, Any]:
        binding = self.sess.io_binding()
        for name in self.engine.input_names:
            v = feed[name]
            if isinstance(v, self.ort.OrtValue):
                binding.bind_ortvalue_input(name, v)
            else:
                if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16:
                    v = v.float()  # a bf16 graph computed in fp32 (numpy and ORT CPU have no bf16)
                arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self.device))
        target = self.buffers[self.turn] if self.static else None
        for name in self.engine.output_names:
            if target is not None and name in target:
                binding.bind_ortvalue_output(name, target[name])
            else:
                binding.bind_output(name, self.device)
        self.sess.run_with_iobinding(binding)
        outs = dict(zip(self.engine.output_names, binding.get_outputs()))
        if target is not None:
            outs.update(target)
            self.turn ^= 1
        return outs

    def to_torch(self, value: Any) -> torch.Tensor:
        return torch.from_numpy(value.numpy()) if isinstance(value, self.ort.OrtValue) else torch.as_tensor(value)


def stream_cached(engine: Engine, req: Request) -> Iterator[torch.Tensor]:
    """Prefill the prompt, then one token per step, feeding the returned cache back in."""
    gen = engine.manifest["generation"]
    seq, mask = req.ids, req.attention_mask
    B = seq.shape[0]
    engine.bind(**{gen["ids"]: seq, gen["attention_mask"]: mask,
                   **{s.name: _TensorStepper(engine).empty(s, B) for s in engine.inputs
                      if s.name in gen["cache_inputs"]},
                   **({gen["cache_position"]: torch.zeros(1, dtype=torch.int64)} if gen.get("cache_position") else {})})
    static = bool(gen.get("static"))
    use_ort = hasattr(engine.runner, "session") and engine.target == "onnx"
    stepper = _OrtStepper(engine, static, gen["cache_outputs"], B) if use_ort else _TensorStepper(engine)
    specs = {s.name: s for s in engine.inputs}
    if use_ort and static:
        # zeros; the first step writes into buffers[0]
        state = {cin: stepper.buffers[1][cout] for cin, cout in zip(gen["cache_inputs"], gen["cache_outputs"])}
    else:
        state = {name: stepper.empty(specs[name], B) for name in gen["cache_inputs"]}
    finished = torch.zeros(B, dtype=torch.bool)
    cur, cur_mask, pos = seq, mask, 0
    for step in range(req.new_tokens):  # prepare() checked that prompt + new tokens fit the cache
        feed = dict(state)
        feed[gen["ids"]], feed[gen["attention_mask"]] = cur, cur_mask
        if gen.get("cache_position"):
            feed[gen["cache_position"]] = torch.tensor([pos], dtype=torch.int64)
        out = stepper.step(feed)
        nxt = _advance(req, stepper.to_torch(out[gen["logits"]])[:, -1, :].cpu(), finished)
        pos += cur.shape[1]
        state = {cin: out[cout] for cin, cout in zip(gen["cache_inputs"], gen["cache_outputs"])}
        seq = torch.cat([seq, nxt], dim=1)
        cur, cur_mask = nxt, torch.ones(B, 1, dtype=torch.int64)
        done = step == req.new_tokens - 1 or bool(finished.all())
        yield mark(seq, finished, req.end if done else None)
        if done:
            return
