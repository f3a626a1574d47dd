"""Token generation on an Engine: sampling helpers and the full-prefix decoding loop.

Without a KV cache every step reruns the whole sequence (what HF does with use_cache=False).
That is correct for any decoder artifact that maps token ids (and optionally an attention mask)
to logits for every position; the kv-cache pass gives the fast path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graphopt.errors import InputError

if TYPE_CHECKING:
    from graphopt.runtime.engine import Engine


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]: argmax at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=gen).squeeze(-1)


def _roles(engine: Engine) -> tuple[str, str | None, str]:
    ids = next((s.name for s in engine.inputs if s.dtype.startswith("int") and s.name != "attention_mask"), None)
    if ids is None:
        raise InputError("this artifact has no integer token-id input; generate() needs a decoder LM artifact")
    mask = "attention_mask" if "attention_mask" in engine.input_names else None
    others = [n for n in engine.input_names if n not in (ids, mask)]
    if others:
        raise InputError(f"generate() cannot fill the inputs {others}; it drives token ids and attention_mask only")
    logits = next((s.name for s in engine.outputs if s.name == "logits"), None) or \
        next((s.name for s in engine.outputs if len(s.shape) == 3), None)
    if logits is None:
        raise InputError("this artifact has no [batch, seq, vocab] logits output; generate() needs a decoder LM")
    return ids, mask, logits


def stream_full_prefix(engine: Engine, ids: Any, max_new_tokens: int, *, temperature: float = 0.0,
                       top_k: int | None = None, eos_token_id: int | None = None, attention_mask: Any = None,
                       seed: int | None = None) -> Iterator[torch.Tensor]:
    ids_name, mask_name, logits_name = _roles(engine)
    seq = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    if seq.dim() == 1:
        seq = seq.unsqueeze(0)
    mask = None
    if mask_name is not None:
        mask = (torch.as_tensor(np.asarray(attention_mask)).long() if attention_mask is not None
                else torch.ones_like(seq))
    spec = next(s for s in engine.inputs if s.name == ids_name)
    max_len = spec.dynamic.get(1, (0, seq.shape[1]))[1]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out_index = engine.output_names.index(logits_name)
    finished = torch.zeros(seq.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        if seq.shape[1] >= max_len:
            break
        feed = {ids_name: seq}
        if mask is not None:
            feed[mask_name] = mask
        logits = engine.run_flat(engine.bind(**feed))[out_index]
        nxt = pick_next(torch.as_tensor(logits)[:, -1, :].cpu(), temperature, top_k, gen)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        seq = torch.cat([seq, nxt[:, None].long()], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        yield seq
        if eos_token_id is not None and bool(finished.all()):
            break


# -- artifacts with a KV cache (compiled with the kv-cache pass) -------------------------------
class _TensorStepper:
    """Any runner: flat inputs in manifest order, outputs by name (torch tensors)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def empty(self, spec: Any, batch: int) -> Any:
        from graphopt.ir.graph_ir import dtype_from_name

        shape = [batch if i == 0 else (0 if isinstance(s, str) else int(s)) for i, s in enumerate(spec.shape)]
        return torch.zeros(shape, dtype=dtype_from_name(spec.dtype))

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


def stream_cached(engine: Engine, ids: Any, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int | None = None, eos_token_id: int | None = None, attention_mask: Any = None,
                  seed: int | None = None) -> Iterator[torch.Tensor]:
    """Prefill the prompt, then one token per step, feeding the returned cache back in."""
    gen = engine.manifest["generation"]
    seq = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    if seq.dim() == 1:
        seq = seq.unsqueeze(0)
    B = seq.shape[0]
    mask = (torch.as_tensor(np.asarray(attention_mask)).long() if attention_mask is not None
            else torch.ones_like(seq))
    if mask.shape != seq.shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)} but the prompt ids have {tuple(seq.shape)}")
    engine.bind(**{gen["ids"]: seq, gen["attention_mask"]: mask,
                   **{s.name: _TensorStepper(engine).empty(s, B) for s in engine.inputs
                      if s.name in gen["cache_inputs"]},
                   **({gen["cache_position"]: torch.zeros(1, dtype=torch.int64)} if gen.get("cache_position") else {})})
    ids_spec = next(s for s in engine.inputs if s.name == gen["ids"])
    if 1 in ids_spec.dynamic and ids_spec.dynamic[1][0] > 1:
        raise InputError(f"this artifact's program rejects single-token steps ({gen['ids']} dim 1 starts at "
                         f"{ids_spec.dynamic[1][0]}; see the lowering notes in report.json), so it cannot decode "
                         "with its cache; compile it for the onnx target")
    static = bool(gen.get("static"))
    use_ort = hasattr(engine.runner, "session") and engine.target == "onnx"
    stepper = _OrtStepper(engine, static, gen["cache_outputs"], B) if use_ort else _TensorStepper(engine)
    specs = {s.name: s for s in engine.inputs}
    if use_ort and static:
        # zeros; the first step writes into buffers[0]
        state = {cin: stepper.buffers[1][cout] for cin, cout in zip(gen["cache_inputs"], gen["cache_outputs"])}
    else:
        state = {name: stepper.empty(specs[name], B) for name in gen["cache_inputs"]}
    limit = gen["max_len"]
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    finished = torch.zeros(B, dtype=torch.bool)
    cur, cur_mask, pos = seq, mask, 0
    for _ in range(max_new_tokens):
        if pos + cur.shape[1] > limit:
            break
        feed = dict(state)
        feed[gen["ids"]], feed[gen["attention_mask"]] = cur, cur_mask
        if gen.get("cache_position"):
            feed[gen["cache_position"]] = torch.tensor([pos], dtype=torch.int64)
        out = stepper.step(feed)
        logits = stepper.to_torch(out[gen["logits"]])[:, -1, :].cpu()
        nxt = pick_next(logits, temperature, top_k, g)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        pos += cur.shape[1]
        state = {cin: out[cout] for cin, cout in zip(gen["cache_inputs"], gen["cache_outputs"])}
        seq = torch.cat([seq, nxt[:, None].long()], dim=1)
        cur, cur_mask = nxt[:, None].long(), torch.ones(B, 1, dtype=torch.int64)
        yield seq
        if eos_token_id is not None and bool(finished.all()):
            break
