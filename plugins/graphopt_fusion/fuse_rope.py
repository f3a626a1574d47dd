"""fuse-rope: rotate-half rotary position embedding becomes one ``graphopt::rotary_embedding`` node.

Why: Llama-family models apply RoPE to every query and key as eight nodes (two slices, a negation,
a concat, two multiplies, an add, plus the cache broadcast). ATen has no RoPE op, so the pass
inserts the custom op :func:`graphopt_fusion.ops.rotary_embedding`, whose semantics are those of
the ONNX opset-23 ``RotaryEmbedding`` op: the onnx backend emits that one op (which ONNX Runtime
and TensorRT run as one kernel), the torch backend keeps the custom op in the ``.pt2``::

    %cos4 = aten.unsqueeze(%cos, 1)                 # %cos: [1, S, D] = cos(cat(f, f))
    %a    = aten.mul(%q, %cos4)                     # %q: [B, H, S, D]
    %lo   = aten.slice(%q, 3, 0, D/2)
    %hi   = aten.slice(%q, 3, D/2, max)
    %r    = aten.cat([aten.neg(%hi), %lo], -1)      # rotate_half(q)
    %b    = aten.mul(%r, aten.unsqueeze(%sin, 1))
    %y    = aten.add(%a, %b)                   →    %ch = aten.slice(%cos, -1, 0, D/2)
                                                    %sh = aten.slice(%sin, -1, 0, D/2)
                                                    %y  = graphopt.rotary_embedding(%q, %ch, %sh)

Hugging Face computes ``q * cos + rotate_half(q) * sin`` with full-width caches
``cos = cat(cos(f), cos(f))``; the ONNX op takes the half-width cache ``cos(f)``. The two agree only
because the cache's two halves are equal, so the pass rewrites only where it can prove that: the
cache is built by ``cat([a, a], -1)`` followed by ops that act elementwise or on leading dims only
(``cos``, ``sin``, casts, scaling by a number, unsqueeze, expand, indexing positions, ...), or it is a
constant whose halves compare equal. Anything else is counted in ``not_fused`` and left alone.

Matched (any operand order of the ``add`` and ``mul``s): ``q`` 4-D ``[B, H, S, D]`` with ``D`` even and
static; ``rotate_half(q) = cat([-q[..., D/2:], q[..., :D/2]], -1)`` with the halves taken by
``slice``, ``split`` or ``chunk``; the caches broadcasting over heads only (``[b, 1, S, D]`` with
``b`` 1 or ``B``, or ``[1, S, D]`` / ``[S, D]``); one dtype throughout. Left alone: a rotate-half with
the wrong split point, the halves swapped or the wrong half negated, partial rotary (``D`` of the
cache smaller than the head), interleaved (GPT-J) rotation.

Stats: ``rope`` counts rewritten applications (query and key separately: 2 per layer).
Verification: ``reference()`` (the fp64 rule, README "Verification"); the reference implementation is bit-identical on CPU
(the report then says so), a backend's rotary kernel may round differently.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.fx import arg, copy_source_meta, dims, packet, tensor_val
from graphopt.ir import GraphIR
from graphopt.verify import reference

from . import ops  # noqa: F401  (registers torch.ops.graphopt.rotary_embedding with torch)
from .patterns import aten, constant_scalar, constant_tensor, erased_by, operands

log = logging.getLogger(__name__)

Node = torch.fx.Node
MAX_DEPTH = 24   # nodes walked back from a cache to the cat that duplicates its halves


def is_last(x: Node, dim: Any) -> bool:
    """``dim`` names the last dim of ``x``."""
    t = tensor_val(x)
    return t is not None and type(dim) is int and dim % max(t.dim(), 1) == t.dim() - 1


# -- rotate_half(q) ------------------------------------------------------------------------------
SPLITS = (aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split)


def _half(x: Any) -> tuple[Node, int] | None:
    """``(q, 0)`` for ``q[..., :D/2]``, ``(q, 1)`` for ``q[..., D/2:]`` (slice, split or chunk)."""
    if packet(x) is aten.slice:
        q = x.args[0]
        t = tensor_val(q)
        if t is None or not is_last(q, arg(x, 1, "dim", 0)) or arg(x, 4, "step", 1) != 1:
            return None
        d = t.shape[-1]
        start, end = arg(x, 2, "start"), arg(x, 3, "end")
        if type(d) is not int or d % 2:
            return None
        if start in (None, 0) and end == d // 2:
            return q, 0
        if start == d // 2 and (end is None or (type(end) is int and end >= d)):
            return q, 1
        return None
    if isinstance(x, Node) and x.target is operator.getitem and packet(x.args[0]) in SPLITS:
        split, index = x.args
        q = split.args[0]
        t = tensor_val(q)
        if t is None or type(t.shape[-1]) is not int or t.shape[-1] % 2 or not is_last(q, arg(split, 2, "dim", 0)):
            return None
        d, size = t.shape[-1], arg(split, 1, "split_size")
        if packet(split) is aten.split_with_sizes:
            whole = isinstance(size, (list, tuple)) and list(size) == [d // 2, d // 2]
        else:
            whole = size == (2 if packet(split) is aten.chunk else d // 2)   # chunk(2) / split(D/2)
        return (q, index) if whole and index in (0, 1) else None
    return None


def rotate_half_of(r: Any) -> Node | None:
    # cat([-q[..., D/2:], q[..., :D/2]], -1) -> q
    if packet(r) is not aten.cat or len(r.args[0]) != 2 or not is_last(r, arg(r, 1, "dim", 0)):
        return None
    neg, lo = r.args[0]
    if packet(neg) is not aten.neg:
        return None
    hi, lo = _half(neg.args[0]), _half(lo)
    if hi is None or lo is None or hi[1] != 1 or lo[1] != 0 or hi[0] is not lo[0]:
        return None
    return lo[0]


# -- proving that a cache's two halves are equal -------------------------------------------------
def _elementwise(node: Node) -> Node | None:
    # cos(c), sin(c), c.to(dtype), c * 2.0, -c, c.clone() -> c
    op = packet(node)
    if op in (aten.cos, aten.sin, aten.neg, aten.clone, aten.contiguous, aten.alias, aten.detach,
              aten.lift_fresh_copy, aten.to, aten._to_copy):
        return node.args[0]
    if op in (aten.mul, aten.div) and len(node.args) == 2 and constant_scalar(node.args[1]) is not None \
            and node.kwargs.get("rounding_mode") is None:
        return node.args[0]
    if op is aten.mul and len(node.args) == 2 and constant_scalar(node.args[0]) is not None:
        return node.args[1]
    return None


def _leading(node: Node) -> Node | None:
    # unsqueeze / squeeze / slice / select / index_select / transpose / permute / expand / view on
    # leading dims -> the input (every row of the last dim is some row of the input)
    op, args = packet(node), node.args
    src = args[0] if args and isinstance(args[0], Node) else None
    if src is None or tensor_val(src) is None or tensor_val(node) is None or not tensor_val(src).dim():
        return None
    if tensor_val(src).shape[-1] != tensor_val(node).shape[-1]:
        return None
    rank_in, rank_out = tensor_val(src).dim(), tensor_val(node).dim()
    if op is aten.unsqueeze:
        return src if args[1] % (rank_out) != rank_out - 1 else None
    if op in (aten.squeeze, aten.slice, aten.select, aten.index_select):
        d = arg(node, 1, "dim", 0)
        return src if type(d) is int and d % rank_in != rank_in - 1 else None
    if op is aten.transpose:
        return src if all(d % rank_in != rank_in - 1 for d in args[1:3]) else None
    if op is aten.permute:
        return src if args[1][-1] % rank_in == rank_in - 1 else None
    if op in (aten.expand, aten.view, aten.reshape, aten._unsafe_view):
        return src  # last dim unchanged (checked above): rows stay rows
    if op is aten.index:
        return src if len(args[1]) < rank_in else None
    return None


def halves_equal(c: Any, depth: int = MAX_DEPTH) -> bool:
    """True if ``c[..., :D/2] == c[..., D/2:]`` for every value ``c`` can take."""
    t = tensor_val(c)
    if t is None or depth == 0 or type(t.shape[-1]) is not int or t.shape[-1] % 2:
        return False
    h = t.shape[-1] // 2
    const = constant_tensor(c)
    if const is not None:
        return bool(torch.equal(const[..., :h], const[..., h:]))
    if packet(c) is aten.cat and is_last(c, arg(c, 1, "dim", 0)) and len(c.args[0]) == 2:
        a, b = c.args[0]
        return a is b  # cat([f, f], -1)
    if packet(c) is aten.embedding:
        return halves_equal(c.args[0], depth - 1)  # rows of the table
    for step in (_elementwise, _leading):
        src = step(c)
        if src is not None:
            return halves_equal(src, depth - 1)
    return False


# -- the match -----------------------------------------------------------------------------------
@dataclass
class Rope:
    q: Node
    cos: Node
    sin: Node
    root: Node
    inner: list[Node] = field(default_factory=list)


def _broadcasts_over_heads(c: Any, q: Node) -> bool:
    """``c`` is ``[b, 1, S, D]``, ``[1, S, D]`` or ``[S, D]`` against ``q``'s ``[B, H, S, D]``."""
    cd, qd = dims(c), dims(q)
    if cd is None or qd is None or not 2 <= len(cd) <= 4 or tensor_val(c).dtype != tensor_val(q).dtype:
        return False
    if cd[-2:] != qd[-2:]:
        return False
    if len(cd) >= 3 and cd[-3] != "1":
        return False
    return len(cd) < 4 or cd[0] in ("1", qd[0])


def match_rope(root: Node) -> Rope | None:
    # q * cos + rotate_half(q) * sin
    for a, b in operands(root, aten.add):
        for q, cos in operands(a, aten.mul):
            t = tensor_val(q)
            if t is None or t.dim() != 4 or not t.is_floating_point() or dims(a) != dims(q):
                continue
            for r, sin in operands(b, aten.mul):
                if rotate_half_of(r) is q and dims(b) == dims(q) and dims(root) == dims(q) \
                        and _broadcasts_over_heads(cos, q) and _broadcasts_over_heads(sin, q):
                    neg, lo = r.args[0]
                    pieces = [neg.args[0], lo] + [x.args[0] for x in (neg.args[0], lo) if x.target is operator.getitem]
                    return Rope(q, cos, sin, root, [root, a, b, r, neg, *pieces, cos, sin])
    return None


def _half_cache(graph: torch.fx.Graph, c: Node, q: Node) -> Node:
    """``c`` as the op's ``[b, S, D/2]`` cache: drop the head dim, keep the first half."""
    rank, d = tensor_val(c).dim(), tensor_val(q).shape[-1]
    if rank == 4 and packet(c) is aten.unsqueeze and c.args[1] % 4 == 1:
        base = c.args[0]                                                  # unsqueeze(c3, 1) -> c3
    elif rank == 4:
        base = graph.call_function(aten.squeeze.dim, (c, 1))              # [b, 1, S, D] -> [b, S, D]
    elif rank == 2:
        base = graph.call_function(aten.unsqueeze.default, (c, 0))        # [S, D] -> [1, S, D]
    else:
        base = c                                                          # [1, S, D]
    return graph.call_function(aten.slice.Tensor, (base, -1, 0, d // 2))


ROTARY = torch.ops.graphopt.rotary_embedding.default

# Rules: the root ``add`` -> Rope or None. GPT-J's interleaved form (rotate_every_two with
# repeat_interleave'd caches, the op's ``interleaved=True``) would be the next row.
RULES: list[Callable[[Node], Rope | None]] = [
    match_rope,     # q * cos + rotate_half(q) * sin
]


class FuseRope(Pass):
    """Fuse rotate-half rotary embeddings (Llama/NeoX RoPE) into graphopt::rotary_embedding."""

    name = "fuse-rope"
    verification = reference()

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        graph = ir.graph
        stats = {"rope": 0, "not_fused": 0}
        halves: dict[Node, Node] = {}   # full cache -> its half cache, shared by q and k
        erased: set[Node] = set()
        for node in list(graph.nodes):
            if node in erased or packet(node) is not aten.add:
                continue
            rope = next((r for r in (rule(node) for rule in RULES) if r is not None), None)
            if rope is None:
                continue
            if not (halves_equal(rope.cos) and halves_equal(rope.sin)):
                stats["not_fused"] += 1
                log.debug("fuse-rope: %s: cannot prove the cos/sin caches repeat their halves", node.name)
                continue
            if not ctx.should_rewrite(f"fuse rope at {node.name} (input {rope.q.name})"):
                continue
            with graph.inserting_before(node):
                for c in (rope.cos, rope.sin):
                    if c not in halves:
                        halves[c] = _half_cache(graph, c, rope.q)
                new = graph.call_function(ROTARY, (rope.q, halves[rope.cos], halves[rope.sin]))
            new.meta["val"] = node.meta.get("val")
            copy_source_meta(node, new)
            node.replace_all_uses_with(new)
            erased |= erased_by(graph, rope.inner)
            stats["rope"] += 1
        return PassResult.after_rewrites(ir, stats, changed=stats["rope"] > 0)
