"""Token generation on an Engine: sampling helpers and the full-prefix decoding loop.

Without a KV cache every step reruns the whole sequence (what HF does with use_cache=False).
That is correct for any decoder artifact that maps token ids (and optionally an attention mask)
to logits for every position; the kv-cache pass gives the fast path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

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
        nxt = pick_next(torch.as_tensor(logits)[:, -1, :], temperature, top_k, gen)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        seq = torch.cat([seq, nxt[:, None].long()], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        yield seq
        if eos_token_id is not None and bool(finished.all()):
            break
