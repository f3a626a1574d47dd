"""Greedy decoding on GraphIRs: the full-recompute reference and the cached graph, and the
``equivalence`` check of the kv-cache pass built from them."""

from __future__ import annotations

from typing import Any

import torch

from graphopt.ir.graph_ir import GraphIR, dtype_from_name


def _feed(ir: GraphIR, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return ir.run([values[name] for name in ir.input_names])


def greedy_full(original: GraphIR, ids: torch.Tensor, mask: torch.Tensor | None, n_new: int,
                ids_name: str, logits_index: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference decoding: rerun the whole sequence every step."""
    seq, m = ids, mask
    tokens, logits = [], []
    for _ in range(n_new):
        feed = {ids_name: seq}
        if m is not None:
            feed["attention_mask"] = m
        out = _feed(original, feed)[logits_index][:, -1, :]
        nxt = out.argmax(-1)
        tokens.append(nxt)
        logits.append(out)
        seq = torch.cat([seq, nxt[:, None]], 1)
        if m is not None:
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return torch.stack(tokens, 1), logits


def empty_cache(ir: GraphIR, batch: int) -> dict[str, torch.Tensor]:
    """Zero-length (dynamic) or zeroed fixed-length (static) cache inputs for a prefill."""
    gen = ir.meta["generation"]
    values: dict[str, torch.Tensor] = {}
    for spec in ir.inputs:
        if spec.name not in gen["cache_inputs"]:
            continue
        shape = [batch if i == 0 else (0 if isinstance(s, str) else int(s)) for i, s in enumerate(spec.shape)]
        values[spec.name] = torch.zeros(shape, dtype=dtype_from_name(spec.dtype))
    if gen.get("cache_position"):
        values[gen["cache_position"]] = torch.zeros(1, dtype=torch.int64)
    return values


def greedy_cached(candidate: GraphIR, ids: torch.Tensor, mask: torch.Tensor | None, n_new: int
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill the prompt, then feed one token per step with the cache."""
    gen = candidate.meta["generation"]
    names = candidate.output_names
    state = empty_cache(candidate, ids.shape[0])
    cur, cur_mask = ids, (mask if mask is not None else torch.ones_like(ids))
    pos = 0
    tokens, logits = [], []
    for _ in range(n_new):
        feed = dict(state)
        feed[gen["ids"]] = cur
        feed[gen["attention_mask"]] = cur_mask
        if gen.get("cache_position"):
            feed[gen["cache_position"]] = torch.tensor([pos], dtype=torch.int64)
        out = dict(zip(names, _feed(candidate, feed)))
        last = out[gen["logits"]][:, -1, :]
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        pos += cur.shape[1]
        for cin, cout in zip(gen["cache_inputs"], gen["cache_outputs"]):
            state[cin] = out[cout]
        cur, cur_mask = nxt[:, None], torch.ones_like(nxt[:, None])
    return torch.stack(tokens, 1), logits


def decoding_equivalence(original: GraphIR, candidate: GraphIR, inputs: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Greedy decoding with the cache must give exactly the tokens of the original graph
    recomputing the full prefix, with logits within tolerance, for the example prompts and (when
    the model takes an attention_mask) a batch whose rows have different lengths (left padding)."""
    gen = candidate.meta["generation"]
    ids_name = gen["ids"]
    spec = next(s for s in original.inputs if s.name == ids_name)
    ids = original.example_inputs[original.input_names.index(ids_name)]
    has_mask = "attention_mask" in original.input_names
    max_len = spec.dynamic.get(1, (0, ids.shape[1]))[1]
    if gen.get("static"):
        max_len = min(max_len, gen["max_len"])
    n_new = max(1, min(32, max_len - ids.shape[1]))
    cases = [("example prompts", ids, torch.ones_like(ids) if has_mask else None)]
    if has_mask and ids.shape[0] >= 2 and ids.shape[1] > 4:
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # second prompt is 3 tokens shorter, left-padded
        cases.append(("left-padded batch", ids, mask))
    logits_index = original.output_names.index(gen["logits"]) if gen["logits"] in original.output_names else 0
    worst, compared = 0.0, 0
    for label, prompt, mask in cases:
        ref_tokens, ref_logits = greedy_full(original, prompt, mask, n_new, ids_name, logits_index)
        got_tokens, got_logits = greedy_cached(candidate, prompt, mask, n_new)
        if not torch.equal(ref_tokens, got_tokens):
            row, col = (ref_tokens != got_tokens).nonzero()[0].tolist()
            return {"passed": False, "message": f"{label}: cached greedy decoding diverges at new token {col} of row "
                                                 f"{row} ({int(got_tokens[row, col])} instead of {int(ref_tokens[row, col])})"}
        for a, b in zip(ref_logits, got_logits):
            worst = max(worst, float((a.double() - b.double()).abs().max()))
        compared += ref_tokens.numel()
    scale = max(float(max(t.abs().max() for t in ref_logits)), 1.0)
    ok = worst <= 1e-3 * scale
    return {"passed": ok, "message": f"{compared} greedy tokens identical over {len(cases)} prompt batches "
                                     f"({n_new} new tokens each); max logit error {worst:.2e}" +
                                     ("" if ok else f" exceeds {1e-3 * scale:.2e}"),
            "tokens_compared": compared, "max_logit_error": worst}
