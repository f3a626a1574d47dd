"""fuse-attention: every common way of writing attention becomes one ``scaled_dot_product_attention``.

Why: a hand-written attention is five to ten ATen nodes (matmul, scale, mask, softmax, dropout,
matmul) that materialise the ``[B, H, T, T]`` score matrix several times over. Backends have one
fast kernel for the whole thing (flash attention in torch, the ONNX ``Attention`` op in ONNX
Runtime and TensorRT), but only if the graph says "attention" in one node. This pass finds the
pattern by how values flow, whatever the model's code looked like, and rewrites it into the one
canonical node that the onnx backend lowers to the standard opset-23 ``Attention`` op::

    %kt  = aten.transpose(%k, -2, -1)                %k0 = (K before repeat_kv, [B, Hkv, T, D])
    %s   = aten.matmul(%q, %kt)                      %y  = aten.scaled_dot_product_attention(
    %s2  = aten.mul(%s, 0.125)                   →         %q, %k0, %v0, %mask, dropout_p=0.0,
    %s3  = aten.add(%s2, %mask)                            is_causal=False, scale=0.125,
    %p   = aten.softmax(%s3, -1)                           enable_gqa=True)
    %p2  = aten.dropout(%p, 0.1, False)
    %y   = aten.matmul(%p2, %v)

What is recognised (each a row of a table below; a matcher returns ``None`` for "no match"):

- scores ``q @ k^T`` (``matmul``; ``k^T`` as ``transpose(-2, -1)``, or any ``permute`` that ends
  in it, e.g. GPT-2's old ``k.permute(0, 2, 3, 1)``), rank-4 ``q``/``k``/``v`` (``[B, H, T, D]``;
  the transposes and reshapes that produce them stay outside the fused node);
- a constant scale, anywhere on the way: ``scores * c``, ``scores / c``, ``q * c``, ``k * c``
  (a Python number or a one-element constant tensor); the fused scale is their product, exactly
  what the original computes (``/ c`` gives ``scale = 1/c``); no scale at all gives ``scale=1.0``;
- masks between the scale and the softmax, any number, in any order: an additive float mask
  ``scores + m`` (padding, ALiBi, Hugging Face's mask utilities), and boolean fills
  ``masked_fill(c, v)`` / ``where(c, v, scores)`` / ``where(c, scores, v)`` with ``v`` = ``-inf``
  or ``finfo.min``;
- ``softmax(dim=-1)`` (``softmax`` / ``_softmax``), possibly computed in a wider dtype
  (``softmax(x.float()).to(x.dtype)``, ``softmax(x, dtype=float32)``), then eval ``dropout``;
- ``p @ v``; and GQA: ``k``/``v`` expanded by Hugging Face's ``repeat_kv``
  (``unsqueeze → expand → reshape``) or ``repeat_interleave(n, dim=1)``, or broadcast from one head.

Existing ``scaled_dot_product_attention`` nodes (``attn_implementation="sdpa"``) are put in the same
canonical form, and counted as ``attention_canonical``, not as fused.

The canonical node: ``aten.scaled_dot_product_attention.default(q, k, v, attn_mask,
dropout_p=0.0, is_causal=..., scale=<float>, enable_gqa=...)``:

- ``scale`` always explicit (``1/sqrt(D)`` written out when the original left it implicit);
- ``enable_gqa=True`` with ``k``/``v`` at the KV-head count (the ``repeat_kv`` copies are dropped;
  the KV cache later stores the small tensors) exactly when KV heads < query heads. torch runs it
  (``h`` reads KV head ``h // n_rep``, as ``repeat_kv`` does) and the ONNX ``Attention`` op takes
  ``kv_num_heads < q_num_heads`` natively. Option ``gqa=false`` keeps the expanded ``k``/``v``;
- ``is_causal=True`` and no mask when the mask is provably the top-left causal triangle with equal
  query and key lengths: a constant buffer sliced ``[:T, :T]`` (nanoGPT's ``bias``), or
  ``tril(ones(T, T))`` / ``arange`` comparisons built on the fly. Proof: the mask subgraph (slices
  from 0, elementwise ops, ``tril``/``triu``, factories) is evaluated on the buffer itself or on a
  stand-in size, and compared with ``tril``. Option ``causal=false`` keeps such masks as masks;
- ``attn_mask``: a single boolean fill with ``-inf`` becomes a boolean mask (``True`` = attend:
  ``~c`` for ``masked_fill(c, -inf)``, with ``eq`` flipped to ``ne``); everything else becomes one
  additive float mask in the scores' dtype, built from the original masks in their original order
  (``where(c, v, acc)`` / ``acc + m``), so the fused node adds to the scores what the original did.

Numerics, fully-masked rows included (a row whose every key is masked):

- additive masks and ``finfo.min`` fills: identical semantics. ``s + finfo.min`` rounds to
  ``finfo.min`` in float32 (the value "absorbs" any |s| < 2**103), so where the original *replaced*
  a score by ``finfo.min``, adding ``finfo.min`` gives the same number; a fully-masked row is
  uniform over all keys in both graphs (what Hugging Face intends). A fill value that does not
  absorb the scores (``-1e9``, ``-10000``, ``finfo(float16).min``) makes fully-masked rows differ
  (uniform in the original, ``softmax(scores)`` when added), so such patterns are left alone;
- ``-inf`` fills: rows with at least one visible key are identical; a fully-masked row is NaN in
  the original (softmax of all ``-inf``) and 0 after fusion (torch's SDPA and ONNX Runtime's
  ``Attention`` both return zeros there). Causal masks never mask a whole row;
- everything else differs by float rounding only (the order of scale, mask add and softmax inside
  the kernel), hence the fp64 rule ``reference()``: the fused graph's error against an fp64 run
  of the original stays within 3x the original's own (observed: at most 1.4x on MiniLM with real
  text, while a scale off by 1e-3 is 20x-1000x and a dropped padding mask 1e5x). Lowered to ONNX, the onnx backend keeps these semantics in
  ONNX Runtime, whose ``Attention`` kernel reads ``finfo.min`` as "masked out" and refuses masks
  that broadcast over the query length (see ``prepare_attention_masks`` in graphopt.backends.onnx_fixups).

Left alone on purpose (near misses): attention without a softmax, softmax over another dim, a
scale that is a tensor not provably a constant scalar (computed from inputs, or per-head), a scale
applied after an additive mask, a mask applied after the softmax, dropout in training mode,
intermediate values read elsewhere (``output_attentions=True`` returns the probabilities), ranks
other than 4 (``[B*H, T, D]`` written with ``bmm``), ``einsum``-written attention. And
``k.repeat(1, n, 1, 1)`` is not taken for GQA (head ``h`` reads ``h % H``, not ``h // n``): that
attention is fused with the repeated ``k``/``v``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.ir import GraphIR
from graphopt.verify import reference

from .patterns import (
    CAST_OPS,
    arg,
    aten,
    constant_scalar,
    constant_tensor,
    copy_source_meta,
    dims,
    dtype,
    erased_by,
    infer_meta,
    is_absorbing,
    is_noop,
    is_op,
    noop_chain,
    packet,
    peel_scales,
    real_users,
    skip_noops,
    static_int,
    swapped_last_two,
    tensor_val,
    unrepeat_heads,
)

log = logging.getLogger(__name__)

SDPA = aten.scaled_dot_product_attention.default
MATMUL_OPS = (aten.matmul,)  # bmm is rank 3: [B*H, T, D] attention is left alone
SOFTMAX_OPS = (aten.softmax, aten._softmax)
MAX_MASK_STEPS = 8
NEG_INF = -math.inf


# -- what a match is -----------------------------------------------------------------------------
@dataclass
class MaskStep:
    """One mask the original applies to the scores, in order: ``add`` (``scores + tensor``) or
    ``fill`` (``where(tensor, value, scores)`` when ``fill_when`` is True, else
    ``where(tensor, scores, value)``)."""

    kind: str
    tensor: torch.fx.Node
    value: float = 0.0
    fill_when: bool = True


@dataclass
class Scores:
    """``q @ k^T * scale``: ``k`` is ``k_src.permute(k_perm)`` (``k_perm`` None: ``k_src`` itself)."""

    q: torch.fx.Node
    k_src: torch.fx.Node
    k_perm: list[int] | None
    scale: float
    chain: list[torch.fx.Node]       # scores-path nodes the fused node replaces
    operands: list[torch.fx.Node]    # q/k-side scale and transpose nodes (dropped if left unused)


@dataclass
class Match:
    """A complete attention: the scores, its masks, the softmax and ``p @ v``."""

    scores: Scores
    steps: list[MaskStep]
    softmax: torch.fx.Node
    v: torch.fx.Node
    output: torch.fx.Node
    chain: list[torch.fx.Node] = field(default_factory=list)


@dataclass
class Canonical:
    """Arguments of the canonical SDPA node (``mask`` is a node, a plan to build one, or None)."""

    q: torch.fx.Node
    k: torch.fx.Node | None
    v: torch.fx.Node
    mask: Any
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    k_permute: tuple[torch.fx.Node, list[int]] | None = None


# -- scores: q @ k^T, scaled -------------------------------------------------------------------
def _scores(x: torch.fx.Node) -> Scores | None:
    # (q * cq) @ (k * ck)^T * c -> q, k, scale = cq * ck * c
    base, factor, scale_nodes = peel_scales(x)
    mm = skip_noops(base)
    if not is_op(mm, *MATMUL_OPS) or len(mm.args) != 2:
        return None
    chain = [*scale_nodes, *noop_chain(base), mm]
    q, fq, q_nodes = peel_scales(mm.args[0])
    kt, fk, k_nodes = peel_scales(mm.args[1])
    swapped = swapped_last_two(skip_noops(kt))
    if swapped is None:  # a k^T computed some other way: transpose it back in the fused graph
        if len(dims(kt) or []) != 4:
            return None
        k_src, k_perm = kt, [0, 1, 3, 2]
    else:
        k_src, k_perm = swapped
        if k_perm == list(range(len(k_perm))):
            k_src, fk2, more = peel_scales(k_src)
            fk *= fk2
            k_nodes += more
            k_perm = None
        k_nodes += [*noop_chain(kt), skip_noops(kt)]
    if not isinstance(q, torch.fx.Node) or not isinstance(k_src, torch.fx.Node):
        return None
    return Scores(q, k_src, k_perm, factor * fq * fk, chain, [*q_nodes, *k_nodes])


# -- masks: rules (node -> [(scores operand, step)]) -------------------------------------------
def _additive(node: torch.fx.Node) -> list[tuple[torch.fx.Node, MaskStep]]:
    # scores + m -> attn_mask m   (either operand order; no alpha, no broadcast of the scores)
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        return []
    out = []
    for s, m in ((a, b), (b, a)):
        if (isinstance(s, torch.fx.Node) and isinstance(m, torch.fx.Node) and dims(s) == dims(node)
                and dtype(m) == dtype(s) == dtype(node)):
            out.append((s, MaskStep("add", m)))
    return out


def _masked_fill(node: torch.fx.Node) -> list[tuple[torch.fx.Node, MaskStep]]:
    # scores.masked_fill(c, v) -> fill where c
    s, c, v = node.args[0], arg(node, 1, "mask"), _fill_value(arg(node, 2, "value"))
    if v is None or not _fills(s, c, node):
        return []
    return [(s, MaskStep("fill", c, v, fill_when=True))]


def _where(node: torch.fx.Node) -> list[tuple[torch.fx.Node, MaskStep]]:
    # where(c, v, scores) -> fill where c ; where(c, scores, v) -> fill where ~c
    if len(node.args) != 3:
        return []
    c, a, b = node.args
    out = []
    for s, value, when in ((b, a, True), (a, b, False)):
        v = _fill_value(value)
        if v is not None and _fills(s, c, node):
            out.append((s, MaskStep("fill", c, v, fill_when=when)))
    return out


def _fill_value(x: Any) -> float | None:
    v = constant_scalar(x)
    return None if v is None or math.isnan(v) else v


def _fills(s: Any, c: Any, node: torch.fx.Node) -> bool:
    return (isinstance(s, torch.fx.Node) and isinstance(c, torch.fx.Node) and dtype(c) == torch.bool
            and dims(s) == dims(node) and dtype(s) == dtype(node))


MASK_RULES: list[tuple[tuple[Any, ...], Callable[[torch.fx.Node], list[tuple[torch.fx.Node, MaskStep]]]]] = [
    ((aten.add,), _additive),                 # s + m            -> attn_mask m
    ((aten.masked_fill,), _masked_fill),      # s.masked_fill(c, -inf) -> attn_mask ~c
    ((aten.where,), _where),                  # where(c, s, -inf) -> attn_mask c
]


def _masked_scores(x: Any, depth: int = 0) -> tuple[Scores, list[MaskStep], list[torch.fx.Node]] | None:
    """``x`` = the scores with masks applied: ``(scores, steps innermost first, mask-path nodes)``."""
    if not isinstance(x, torch.fx.Node) or depth > MAX_MASK_STEPS:
        return None
    hops, node = noop_chain(x), skip_noops(x)
    scores = _scores(node)
    if scores is not None:
        return scores, [], hops
    for ops, rule in MASK_RULES:
        if is_op(node, *ops):
            for inner, step in rule(node):
                found = _masked_scores(inner, depth + 1)
                if found is not None:
                    sc, steps, path = found
                    return sc, [*steps, step], [*path, node, *hops]
    return None


# -- softmax and what follows ----------------------------------------------------------------
def _softmax_last_dim(node: torch.fx.Node) -> bool:
    d, r = arg(node, 1, "dim"), len(dims(node) or [])
    return isinstance(d, int) and r > 0 and d % r == r - 1


def _widened(x: Any) -> tuple[Any, list[torch.fx.Node]]:
    """Look back through the widening casts in front of a softmax (``x.float()``)."""
    path = []
    while is_noop(x) or (is_op(x, *CAST_OPS) and _float_cast(x) and _widening(dtype(x.args[0]), dtype(x))):
        path.append(x)
        x = x.args[0]
    return x, path


def _widening(a: torch.dtype | None, b: torch.dtype | None) -> bool:
    """Casting ``a`` to ``b`` loses nothing (float16 → float32 yes, float16 → bfloat16 no): the
    softmax is computed at least as precisely as SDPA computes it."""
    if a is None or b is None or not a.is_floating_point or not b.is_floating_point:
        return False
    fa, fb = torch.finfo(a), torch.finfo(b)
    return fb.eps <= fa.eps and fb.max >= fa.max


def _float_cast(node: torch.fx.Node) -> bool:
    a, b = tensor_val(node.args[0]) if node.args else None, tensor_val(node)
    return (a is not None and b is not None and a.dtype.is_floating_point and b.dtype.is_floating_point
            and [str(d) for d in a.shape] == [str(d) for d in b.shape])


def _probs_to_output(sm: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node, torch.fx.Node] | None:
    """From the softmax forward through casts and eval dropout to ``p @ v``:
    ``(nodes after the softmax, the matmul, v)``."""
    node, path = sm, []
    while True:
        users = real_users(node)
        if len(users) != 1:
            return None
        user = users[0]
        if is_op(user, *MATMUL_OPS) and len(user.args) == 2 and user.args[0] is node and user.args[1] is not node:
            v = user.args[1]
            return (path, user, v) if isinstance(v, torch.fx.Node) else None
        if (is_noop(user) or (is_op(user, *CAST_OPS) and _float_cast(user))) and user.args[0] is node:
            path.append(user)
            node = user
            continue
        return None


def match_attention(sm: torch.fx.Node) -> Match | None:
    """The attention around softmax ``sm``, or ``None``."""
    if not is_op(sm, *SOFTMAX_OPS) or not _softmax_last_dim(sm) or not isinstance(sm.args[0], torch.fx.Node):
        return None
    if not _widening(dtype(sm.args[0]), dtype(sm)):
        return None  # softmax(x, dtype=float16) of float32 scores rounds: not what SDPA computes
    after = _probs_to_output(sm)
    if after is None:
        return None
    post, output, v = after
    pre_input, pre = _widened(sm.args[0])
    found = _masked_scores(pre_input)
    if found is None:
        return None
    scores, steps, mask_path = found
    chain = [*scores.chain, *mask_path, *pre, sm, *post]
    inside = set(chain) | {output}
    if any(u not in inside for n in chain for u in real_users(n)):
        return None  # an intermediate value is read elsewhere (e.g. returned attention weights)
    return Match(scores, steps, sm, v, output, chain)


# -- causal masks ------------------------------------------------------------------------------
_ELEMENTWISE = frozenset({aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not,
                          aten.bitwise_not, aten.logical_and, aten.bitwise_and, aten.__and__,
                          aten.to, aten._to_copy, aten.type_as, aten.mul, aten.add, aten.sub, aten.neg,
                          aten.masked_fill, aten.where, aten.tril, aten.triu, aten.unsqueeze,
                          aten.scalar_tensor, aten.alias, aten.detach, aten.clone, aten.contiguous,
                          aten.lift_fresh_copy})
_FACTORIES = frozenset({aten.ones, aten.zeros, aten.full, aten.arange})
_STAND_IN = 7  # size that stands in for a symbolic dim when a mask is built on the fly


class _NotConstant(Exception):
    pass


def _stand_in_value(node: torch.fx.Node) -> torch.Tensor:
    """The mask ``node`` computes, with slices that start at 0 skipped (they take the top-left
    corner, which the checks below account for) and symbolic factory sizes replaced by a stand-in.
    Raises :class:`_NotConstant` if the mask depends on anything but constants and sizes."""
    memo: dict[torch.fx.Node, Any] = {}

    def ev(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(ev(i) for i in x)
        if not isinstance(x, torch.fx.Node):
            return x
        if x in memo:
            return memo[x]
        p = packet(x)
        if x.op == "get_attr":
            val = constant_tensor(x)
            if val is None:
                raise _NotConstant(x.name)
        elif p is aten.slice:
            if arg(x, 2, "start") not in (None, 0) or arg(x, 4, "step", 1) not in (None, 1):
                raise _NotConstant(x.name)
            val = ev(x.args[0])
        elif p is aten.arange:  # arange(T) / arange(0, T): positions; an offset start is not causal
            if len(x.args) > 2 or (len(x.args) == 2 and x.args[0] != 0):
                raise _NotConstant(x.name)
            end = x.args[-1]
            val = x.target(end if isinstance(end, int) else _STAND_IN, **x.kwargs)
        elif p in _FACTORIES:  # ones / zeros / full of the (symbolic) sequence length
            sizes = [a if isinstance(a, int) else _STAND_IN for a in x.args[0]]
            val = x.target(sizes, *x.args[1:], **x.kwargs)
        elif p in _ELEMENTWISE:
            val = x.target(*ev(list(x.args)), **{k: ev(v) for k, v in x.kwargs.items()})
        else:
            raise _NotConstant(x.name)
        memo[x] = val
        return val

    with torch.no_grad():
        out = ev(node)
    if not isinstance(out, torch.Tensor):
        raise _NotConstant(node.name)
    return out


def _is_causal(mask: torch.fx.Node, q_len: str, k_len: str, *, negate: bool = False) -> bool:
    """True if ``mask`` (boolean, True = attend; ``negate``: True = masked out; or additive float)
    is the top-left causal triangle over equal query and key lengths."""
    d = dims(mask)
    if d is None or len(d) < 2 or d[-2:] != [q_len, k_len] or q_len != k_len:
        return False
    try:
        val = _stand_in_value(mask)
    except Exception as e:  # noqa: BLE001 - any failure means "not provably causal"
        log.debug("mask %s is not a constant causal mask: %s", mask.name, e)
        return False
    if val.dim() < 2:
        return False
    n, m = val.shape[-2:]
    if n < 2 or m < 2:
        return False
    flat = val.reshape(-1, n, m)
    if not all(torch.equal(flat[0], f) for f in flat[1:]):
        return False
    tri = torch.ones(n, m, dtype=torch.bool).tril()
    grid = flat[0]
    if grid.dtype == torch.bool:
        return torch.equal(~grid if negate else grid, tri)
    if not grid.dtype.is_floating_point:
        return False
    # additive: 0 where attended, an absorbing value (-inf, finfo.min) elsewhere
    return bool((grid[tri] == 0).all()) and all(is_absorbing(float(x), grid.dtype) for x in grid[~tri].unique())


# -- the canonical form ----------------------------------------------------------------------
def _heads_and_gqa(q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node, gqa: bool
                   ) -> tuple[torch.fx.Node, torch.fx.Node, bool] | None:
    """``(k, v, enable_gqa)`` with k/v at the KV-head count when ``gqa``; ``None`` if the heads do
    not line up."""
    if gqa:
        rk, rv = unrepeat_heads(k), unrepeat_heads(v)
        if rk is not None and rv is not None and rk[1] == rv[1] and dims(rk[0])[1] == dims(rv[0])[1]:
            k, v = rk[0], rv[0]
    hq, hk, hv = (static_int(dims(x)[1]) for x in (q, k, v))
    if dims(q)[1] == dims(k)[1] == dims(v)[1]:
        return k, v, False
    if hq is None or hk is None or hk != hv or hk >= hq or hq % hk:
        return None
    if hk != 1 and not gqa:
        return None
    return k, v, True


def _shapes_line_up(q: Any, k: Any, v: Any, out: Any) -> bool:
    dq, dk, dv, do = dims(q), dims(k), dims(v), dims(out)
    if any(d is None or len(d) != 4 for d in (dq, dk, dv, do)):
        return False
    types = {dtype(q), dtype(k), dtype(v), dtype(out)}
    if len(types) != 1 or not next(iter(types)).is_floating_point:
        return False
    return (dq[0] == dk[0] == dv[0] and dq[3] == dk[3] and dk[2] == dv[2]
            and do == [dq[0], dq[1], dq[2], dv[3]])


def _mask_plan(steps: list[MaskStep], scores_dtype: torch.dtype, q_len: str, k_len: str, causal: bool
               ) -> tuple[Any, bool] | None:
    """``(mask, is_causal)`` for the masks of a match, ``None`` if they cannot be kept exactly. The
    mask: ``None``, one additive mask node used as it is, ``("bool", cond, negate)`` (a ``-inf``
    fill: attend where ``cond``, or where ``~cond`` with ``negate``) or ``("float", steps)`` (one
    additive mask built from all steps, see :func:`_build_mask`)."""
    if not steps:
        return None, False
    if causal and len(steps) == 1:  # the whole mask is one causal triangle: is_causal, exactly
        step = steps[0]
        if step.kind == "add" and _is_causal(step.tensor, q_len, k_len):
            return None, True
        if (step.kind == "fill" and is_absorbing(step.value, scores_dtype)
                and _is_causal(step.tensor, q_len, k_len, negate=step.fill_when)):
            return None, True
    if len(steps) == 1 and steps[0].kind == "fill" and steps[0].value == NEG_INF:
        return ("bool", steps[0].tensor, steps[0].fill_when), False
    if any(s.kind == "fill" and not is_absorbing(s.value, scores_dtype) for s in steps):
        return None  # a finite fill that does not absorb the scores: fully-masked rows would change
    if len(steps) == 1 and steps[0].kind == "add":
        return steps[0].tensor, False
    return ("float", steps), False


_NEGATE = {aten.eq: aten.ne, aten.ne: aten.eq}


def _build_mask(graph: torch.fx.Graph, plan: Any, scores_dtype: torch.dtype, new: list[torch.fx.Node]) -> Any:
    """Emit the nodes of a mask plan (before the graph's insertion point)."""
    if plan is None or isinstance(plan, torch.fx.Node):
        return plan

    def emit(target: Any, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
        n = graph.call_function(target, args, kwargs or {})
        new.append(n)
        return n

    if plan[0] == "bool":
        _, cond, negate = plan
        if not negate:
            return cond
        flipped = _NEGATE.get(packet(cond))
        if flipped is not None:  # masked_fill(x == 0, -inf) -> attend where x != 0
            overload = getattr(flipped, cond.target._overloadname)
            return emit(overload, cond.args, dict(cond.kwargs))
        return emit(aten.logical_not.default, (cond,))
    acc = None
    for step in plan[1]:
        if step.kind == "add":
            acc = step.tensor if acc is None else emit(aten.add.Tensor, (acc, step.tensor))
            continue
        fill = emit(aten.scalar_tensor.default, (step.value,), {"dtype": scores_dtype})
        keep = acc if acc is not None else emit(aten.scalar_tensor.default, (0.0,), {"dtype": scores_dtype})
        a, b = (fill, keep) if step.fill_when else (keep, fill)
        acc = emit(aten.where.self, (step.tensor, a, b))
    return acc


def _canonical_from_match(m: Match, opts: FuseAttention.Options) -> Canonical | None:
    sc = m.scores
    q, v = sc.q, m.v
    k = sc.k_src if sc.k_perm is None else None
    if k is not None:
        heads = _heads_and_gqa(q, k, v, opts.gqa)
        if heads is None:
            return None
        k, v, gqa = heads
        if not _shapes_line_up(q, k, v, m.output):
            return None
    else:  # k^T from a permute that is not a plain transpose: k = k_src.permute(k_perm)
        kd = dims(sc.k_src)
        if kd is None or len(kd) != 4:
            return None
        k_dims = [kd[i] for i in sc.k_perm]
        if not (_shapes_line_up(q, v, v, m.output) and k_dims[0] == dims(q)[0] and k_dims[1] == dims(q)[1]
                and k_dims[3] == dims(q)[3] and k_dims[2] == dims(v)[2] and dims(v)[1] == dims(q)[1]
                and dtype(sc.k_src) == dtype(q)):
            return None
        gqa = False
    plan = _mask_plan(m.steps, dtype(q), dims(q)[2], dims(v)[2], opts.causal)
    if plan is None:
        return None
    mask, is_causal = plan
    return Canonical(q, k, v, mask, is_causal, sc.scale, gqa,
                     k_permute=None if k is not None else (sc.k_src, sc.k_perm))


def _canonical_from_sdpa(node: torch.fx.Node, opts: FuseAttention.Options) -> Canonical | None:
    """The canonical form of an existing SDPA node, or ``None`` if it cannot be canonical
    (dropout in training, ranks other than 4)."""
    if len(node.args) < 3:
        return None
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    p, causal = arg(node, 4, "dropout_p", 0.0), arg(node, 5, "is_causal", False)
    scale, gqa = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    if p not in (0, 0.0) or not isinstance(causal, bool) or not all(isinstance(x, torch.fx.Node) for x in (q, k, v)):
        return None
    if any(len(dims(x) or []) != 4 for x in (q, k, v)):
        return None
    if scale is None:
        e = static_int(dims(q)[3])
        scale = 1.0 / math.sqrt(e) if e else None  # what SDPA computes when scale is left out
    if not (scale is None or isinstance(scale, float | int)):
        return None
    heads = _heads_and_gqa(q, k, v, opts.gqa or bool(gqa))
    if heads is None:
        return None
    k, v, gqa = heads
    if isinstance(mask, torch.fx.Node) and opts.causal and not causal:
        if _is_causal(mask, dims(q)[2], dims(k)[2]):
            mask, causal = None, True
    return Canonical(q, k, v, mask, causal, None if scale is None else float(scale), bool(gqa))


def _sdpa_call(c: Canonical, k: torch.fx.Node, mask: Any) -> tuple[tuple, dict]:
    return ((c.q, k, c.v, mask),
            {"dropout_p": 0.0, "is_causal": c.is_causal, "scale": c.scale, "enable_gqa": c.enable_gqa})


# -- the pass --------------------------------------------------------------------------------
class FuseAttention(Pass):
    """Rewrite every attention (matmul, scale, mask, softmax, matmul) into one canonical SDPA node."""

    name = "fuse-attention"
    verification = reference()

    @dataclasses.dataclass
    class Options:
        gqa: bool = True      # keep k/v at the KV-head count (enable_gqa) instead of repeat_kv copies
        causal: bool = True   # turn provably causal masks into is_causal=True

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        graph = ir.graph
        stats = {"attention_fused": 0, "attention_canonical": 0, "gqa": 0}
        changed = False
        erased: set[torch.fx.Node] = set()
        for node in [n for n in graph.nodes if n.op == "call_function"]:
            if node in erased:  # part of an attention rewritten before
                continue
            if node.target is SDPA:  # already attention: put it in canonical form
                c = _canonical_from_sdpa(node, self.options)
                if c is None:
                    continue
                args, kwargs = _sdpa_call(c, c.k, c.mask)
                if (args, kwargs) != (tuple(node.args), dict(node.kwargs)):
                    if not ctx.should_rewrite(f"canonicalize {node.name} (sdpa)"):
                        continue
                    old = node.all_input_nodes
                    node.args, node.kwargs = args, kwargs
                    erased |= erased_by(graph, old)  # repeat_kv copies, a causal mask now implied
                    changed = True
                stats["attention_canonical"] += 1
            elif is_op(node, *SOFTMAX_OPS):  # the anchor of a hand-written attention
                m = match_attention(node)
                c = _canonical_from_match(m, self.options) if m is not None else None
                if c is None or not ctx.should_rewrite(f"fuse attention at {node.name} -> sdpa"):
                    continue
                erased |= self._rewrite(graph, m, c)
                stats["attention_fused"] += 1
                changed = True
            else:
                continue
            stats["gqa"] += c.enable_gqa
        return PassResult.after_rewrites(ir, stats, changed)

    @staticmethod
    def _rewrite(graph: torch.fx.Graph, m: Match, c: Canonical) -> set[torch.fx.Node]:
        """Insert the canonical node before ``p @ v``, hand it ``p @ v``'s users, and erase the
        pattern (and whatever only the pattern read). Returns the erased nodes."""
        new: list[torch.fx.Node] = []
        with graph.inserting_before(m.output):
            k = c.k
            if c.k_permute is not None:
                k = graph.call_function(aten.permute.default, c.k_permute)
                new.append(k)
            mask = _build_mask(graph, c.mask, dtype(c.q), new)
            args, kwargs = _sdpa_call(c, k, mask)
            sdpa = graph.call_function(SDPA, args, kwargs)
        for n in [*new, sdpa]:
            copy_source_meta(m.softmax, n)
            infer_meta(n)
        m.output.replace_all_uses_with(sdpa)
        return erased_by(graph, [m.output, *m.chain, *m.scores.operands])


__all__ = ["FuseAttention", "Match", "MaskStep", "match_attention"]
