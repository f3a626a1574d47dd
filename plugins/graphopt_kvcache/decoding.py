"""Greedy decoding on GraphIRs: the full-recompute reference and the cached graph, and the
``equivalence`` check of the kv-cache pass built from them."""

from __future__ import annotations

from typing import Any

import torch

from graphopt.ir import GraphIR, dtype_from_name


def _feed(ir: GraphIR, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return ir.run([values[name] for name in ir.input_names])


def teacher_forced_full(original: GraphIR, ids: torch.Tensor, mask: torch.Tensor | None, continuation: torch.Tensor,
                        ids_name: str, logits_index: int = 0) -> list[torch.Tensor]:
    """Reference logits without a cache, in one forward per batch: the prompt followed by
    ``continuation`` (the tokens the cached graph will be fed); entry ``k`` is the next-token
    logits after the prompt and the first ``k`` continuation tokens (``len(continuation) + 1``
    entries). A left-padded row is run alone without its padding: each row's prompt is what it
    means (the cached graph numbers a row's positions from its first real token, as Hugging Face's
    ``generate`` does; the model's own forward would number them from the first column)."""
    whole = list(range(ids.shape[0])) if mask is None else [r for r in range(ids.shape[0]) if bool(mask[r].all())]
    batches = [(whole, ids[whole])] if whole else []
    for r in range(ids.shape[0]):
        if r not in whole:
            batches.append(([r], ids[r:r + 1, mask[r].bool()]))
    steps = continuation.shape[1] + 1
    rows: dict[int, list[torch.Tensor]] = {}
    for which, prompt in batches:
        feed = {ids_name: torch.cat([prompt, continuation[which]], 1)}
        if mask is not None:
            feed["attention_mask"] = torch.ones_like(feed[ids_name])
        out = _feed(original, feed)[logits_index]
        start = prompt.shape[1] - 1
        for i, r in enumerate(which):
            rows[r] = [out[i, start + k, :] for k in range(steps)]
    return [torch.stack([rows[r][k] for r in range(ids.shape[0])]) for k in range(steps)]


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


def greedy_cached(candidate: GraphIR, ids: torch.Tensor, mask: torch.Tensor | None, n_new: int,
                  forced: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill the prompt, then feed one token per step with the cache: the graph's own greedy
    choice, or ``forced[:, step]`` (teacher forcing: the reference's tokens, so that one near tie
    does not send the two decodings down different continuations)."""
    gen = candidate.meta["generation"]
    names = candidate.output_names
    state = empty_cache(candidate, ids.shape[0])
    cur, cur_mask = ids, (mask if mask is not None else torch.ones_like(ids))
    pos = 0
    tokens, logits = [], []
    for step in range(n_new):
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
        if step == n_new - 1:
            break
        for cin, cout in zip(gen["cache_inputs"], gen["cache_outputs"]):
            state[cin] = out[cout]
        feed_tok = forced[:, step] if forced is not None else nxt
        cur, cur_mask = feed_tok[:, None], torch.ones_like(feed_tok[:, None])
    return torch.stack(tokens, 1), logits


#: parameters above which the check decodes fewer tokens (its cost grows with the model and the
#: tokens: a full-prefix recompute per token); see :func:`verification_tokens`
_LARGE_MODEL = 50_000_000


def verification_tokens(ir: GraphIR, max_new: int) -> int:
    """How many tokens the check decodes: 32 for small models, fewer for large ones (8 from about
    0.2B parameters on, 4 from 1B: every cached step reads all the weights, about 1 s on a 1B
    fp32 model on 2 CPU cores), so that verification stays a fraction of a compile. Four steps
    still grow the cache three times past the prompt, on a left-padded row too."""
    params = ir.param_count()
    n = 32 if params <= _LARGE_MODEL else max(4 if params >= 1_000_000_000 else 8,
                                               int(32 * (_LARGE_MODEL / params) ** 0.75))
    return max(1, min(n, max_new))


def logit_tolerance(ir: GraphIR) -> tuple[float, str]:
    """Relative logit tolerance of the cached graph vs the graph it rewrote, from that graph's
    own precision: 1e-3 for fp32 graphs, 16 ulps of the lowest float dtype its weights or casts
    use (fp16: 1.6e-2, bf16: 6.3e-2), 2e-2 when activations are quantized (integer rounding of
    activations may land on the neighbouring level when the reduction order differs; weight-only
    schemes keep fp32's tolerance)."""
    dtypes = {p.dtype for p in ir.graph_module.parameters()} | {b.dtype for b in ir.graph_module.buffers()}
    for n in ir.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            dtypes.add(val.dtype)
    floats = [d for d in dtypes if d.is_floating_point and d != torch.float64]
    tol, why = 1e-3, "fp32"
    low = [d for d in floats if torch.finfo(d).eps > torch.finfo(torch.float32).eps]
    if low:
        worst = max(low, key=lambda d: torch.finfo(d).eps)
        tol, why = max(tol, 16 * torch.finfo(worst).eps), str(worst).replace("torch.", "")
    def quantizes_activations(n: torch.fx.Node) -> bool:  # weight-only schemes dequantize constants only
        name = str(n.target)
        return ("quantize" in name and "dequantize" not in name
                and any(a.op != "get_attr" for a in n.all_input_nodes[:1]))

    if any(quantizes_activations(n) for n in ir.graph.nodes if n.op == "call_function"):
        if tol < 2e-2:
            tol, why = 2e-2, "activations quantized"
    return tol, why


def decoding_equivalence(original: GraphIR, candidate: GraphIR, inputs: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Decoding with the cache must give the logits and greedy choices of ``original`` (the graph
    the kv-cache pass rewrote: after a lossy pass such as quantize, prune or precision, that graph,
    not the captured one) recomputing the full prefix, within a tolerance that follows that graph's
    precision, for the example prompts (when the model takes an attention_mask and the batch has
    two rows or more, the second row left-padded by 3 tokens: rows of different lengths).

    Both graphs see the same tokens (teacher forcing): the prompt, then a continuation of fresh
    random tokens fed one per step to the cached graph and, for the reference, appended to the
    prompt in a single forward (one full recompute instead of one per token; the cache path is
    exercised the same whatever the tokens are). A step whose cached argmax differs from the
    reference's fails unless the reference's top-2 logit margin there is within the tolerance (a
    near tie that rounding may flip; counted as ``near_ties``)."""
    gen = candidate.meta["generation"]
    ids_name = gen["ids"]
    spec = next(s for s in original.inputs if s.name == ids_name)
    ids = original.example_inputs[original.input_names.index(ids_name)]
    has_mask = "attention_mask" in original.input_names
    max_len = spec.dynamic.get(1, (0, ids.shape[1]))[1]
    if gen.get("static"):
        max_len = min(max_len, gen["max_len"])
    n_new = verification_tokens(original, max_len - ids.shape[1])
    if has_mask and ids.shape[0] >= 2 and ids.shape[1] > 4:
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # second prompt is 3 tokens shorter, left-padded; the first is whole
        cases = [("example prompts (row 1 left-padded)", ids, mask)]
    else:
        cases = [("example prompts", ids, torch.ones_like(ids) if has_mask else None)]
    logits_index = original.output_names.index(gen["logits"]) if gen["logits"] in original.output_names else 0
    rel_tol, precision = logit_tolerance(original)
    g = torch.Generator().manual_seed(1234)
    lo, hi = int(ids.min()), int(ids.max())
    worst, compared, ties, scale = 0.0, 0, 0, 1.0
    for label, prompt, mask in cases:
        continuation = torch.randint(lo, hi + 1, (prompt.shape[0], n_new - 1), generator=g, dtype=prompt.dtype)
        ref_logits = teacher_forced_full(original, prompt, mask, continuation, ids_name, logits_index)
        ref_tokens = torch.stack([x.argmax(-1) for x in ref_logits], 1)
        got_tokens, got_logits = greedy_cached(candidate, prompt, mask, n_new, forced=continuation)
        scale = max(scale, float(max(t.abs().max() for t in ref_logits)))
        tol = rel_tol * scale
        for step, (a, b) in enumerate(zip(ref_logits, got_logits)):
            worst = max(worst, float((a.double() - b.double()).abs().max()))
            for row in (ref_tokens[:, step] != got_tokens[:, step]).nonzero().flatten().tolist():
                top2 = torch.topk(a[row].double(), 2).values
                margin = float(top2[0] - top2[1])
                if margin > tol:
                    return {"passed": False, "message": f"{label}: cached decoding diverges: its greedy choice differs at new token "
                                                         f"{step} of row {row} ({int(got_tokens[row, step])} instead of "
                                                         f"{int(ref_tokens[row, step])}; the reference's margin there "
                                                         f"is {margin:.3g} > tolerance {tol:.3g})",
                            "tokens_compared": compared, "max_logit_error": worst}
                ties += 1
        compared += ref_tokens.numel()
    tol = rel_tol * scale
    ok = worst <= tol
    return {"passed": ok, "message": f"{compared} next-token predictions checked over {len(cases)} prompt batch"
                                     f"{'es' if len(cases) > 1 else ''} ({n_new} decoding steps each, teacher-forced, "
                                     f"vs the graph before kv-cache recomputing the full prefix"
                                     f"{'; ' + str(ties) + ' near ties' if ties else ''}); max logit error {worst:.2e}"
                                     + (" within" if ok else " exceeds") + f" {tol:.2e} ({precision}: {rel_tol:g} x "
                                     f"max |logit| {scale:.3g})",
            "tokens_compared": compared, "new_tokens": n_new, "max_logit_error": worst, "logit_tolerance": tol,
            "near_ties": ties}
