"""The dependency graph of structured pruning: which weights, shapes and splits move together.

Removing an attention head or an FFN channel touches more than one weight: the rows of the
producers (Q/K/V, gate/up), the columns of the consumer (o_proj, down), and every op in between
that bakes the count into its arguments (``view(b, t, 4, 16)``, ``expand`` in ``repeat_kv``,
``split_with_sizes([64, 32, 32])`` after ``merge-gemms``, the ``view(-1, 256)`` before GPT-2's
``addmm``). Like Torch-Pruning's dependency graph, this module finds them by following how the
pruned dim flows through the fx graph, not by matching module names::

    q = linear(h, Wq)   ─ chain (size 64) ─ view → [B,T,4,16] ─ chain (4 heads) ─ transpose ─┐
    k = linear(h, Wk)   ─ chain (size 32) ─ view → [B,T,2,16] ─ expand/reshape → 4 heads ────┤ union
    v = linear(h, Wv)   ─ ...                                                               ─┤
    o = linear(reshape(attn → [B,T,64]), Wo)   ← sink: the tracked axis is contracted ───────┘

A *chain* is a run of values whose tracked axis has one size; chains meet in elementwise ops,
attention and matmul batch dims, and are joined (union-find) into a *group*. A group's prunable
*unit* is the largest block that every chain can drop contiguously: the gcd of all tracked sizes
(an attention group with 8 query heads over 4 KV heads gets 4 units: a KV head and its 2 query
heads; an FFN gets one unit per channel). Anything the tracer does not understand (a reduction or
norm over the tracked axis, the residual stream, the graph output, slicing the axis) blocks the
whole group, which is then left untouched and reported with the reason.

Every value a pruned unit influences reaches the outputs only through the sinks' contracted
columns, so the shrunk graph must equal the original with those columns zeroed: the pass checks
exactly that (:func:`.rewrite.masked_copy`; the rewrite itself is :func:`.rewrite.apply`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from .sites import Site, as_site, get_constant

aten = torch.ops.aten
Node = torch.fx.Node

_ELEMENTWISE = {
    aten.add,
    aten.sub,
    aten.mul,
    aten.div,
    aten.where,
    aten.pow,
    aten.neg,
    aten.silu,
    aten.gelu,
    aten.tanh,
    aten.sigmoid,
    aten.relu,
    aten.exp,
    aten.erf,
    aten.rsqrt,
    aten.sqrt,
    aten.abs,
    aten.masked_fill,
    aten.clamp,
    aten.minimum,
    aten.maximum,
    aten.to,
    aten._to_copy,
    aten.type_as,
    aten.contiguous,
    aten.clone,
    aten.alias,
    aten.detach,
    aten.dropout,
    aten.lift_fresh_copy,
    aten.square,
    aten.reciprocal,
    aten.log,
    aten.sin,
    aten.cos,
    aten.gelu_,
    aten.silu_,
}
_VIEWS = {aten.view, aten.reshape, aten._unsafe_view}
_NORMS = {aten.layer_norm, aten.rms_norm, aten.native_layer_norm}
_SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
_REDUCE = {aten.mean, aten.sum, aten.amax, aten.amin}
_ASSERTS = {aten._assert_tensor_metadata, aten._assert_scalar, aten._assert_async}


def _rope_op():
    ns = getattr(torch.ops, "graphopt", None)
    try:
        return ns.rotary_embedding if ns is not None else None
    except AttributeError:
        return None


class Blocked(Exception):  # noqa: N818 - control flow inside the tracer
    pass


@dataclass
class Chain:
    id: int
    size: int
    segments: list[int] | None = None  # set when a split along the axis cuts this chain
    producer: Site | None = None
    sinks: list[Site] = field(default_factory=list)
    shape_args: list[tuple[Node, int]] = field(default_factory=list)  # (view/expand node, position)
    splits: list[Node] = field(default_factory=list)
    slices: list[tuple[Node, int]] = field(default_factory=list)  # (slice node, segment) of a tiling set
    consts: list[tuple[Node, Node, int]] = field(default_factory=list)  # (user, get_attr, dim)
    resized_children: bool = False  # a view changed the axis size below this chain
    heads: bool = False  # the axis is not the last dim somewhere (attention)

    def sizes(self) -> list[int]:
        return list(self.segments) if self.segments else [self.size]


@dataclass
class Group:
    """Chains joined into one prunable dimension."""

    chains: list[Chain]
    units: int = 0
    kind: str = "channels"  # "heads" or "channels"
    blocked: str | None = None
    label: str = ""

    @property
    def producers(self) -> list[tuple[Chain, Site]]:
        return [(c, c.producer) for c in self.chains if c.producer is not None]

    @property
    def sinks(self) -> list[tuple[Chain, Site]]:
        return [(c, s) for c in self.chains for s in c.sinks]

    def index(self, chain: Chain, keep: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Kept positions on ``chain``'s axis for the kept units, and its new segment sizes."""
        idx, new, off = [], [], 0
        for s in chain.sizes():
            b = s // self.units
            for u in keep:
                idx.extend(range(off + u * b, off + (u + 1) * b))
            new.append(len(keep) * b)
            off += s
        return torch.tensor(idx, dtype=torch.long), new

    def unit_slices(self, chain: Chain) -> list[list[int]]:
        """Positions on ``chain``'s axis that belong to each unit."""
        out = []
        for u in range(self.units):
            idx, off = [], 0
            for s in chain.sizes():
                b = s // self.units
                idx.extend(range(off + u * b, off + (u + 1) * b))
                off += s
            out.append(idx)
        return out


# -- concrete shapes ---------------------------------------------------------------------------
_PRIMES = [10007, 10009, 10037, 10039, 10061, 10067, 10069, 10079, 10091, 10093, 10099, 10103]


class _Shapes:
    """Node shapes with every symbolic dim replaced by its own large prime, so products of dims
    compare exactly (``s0*s1`` vs ``s0``, ``s1``) and never collide with model sizes."""

    def __init__(self):
        self.symbols: dict[str, int] = {}

    def of(self, x: object) -> list[int] | None:
        val = x.meta.get("val") if isinstance(x, Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        return [self.dim(d) for d in val.shape]

    def dim(self, d: object) -> int:
        if isinstance(d, int):
            return d
        expr = d.node.expr
        subs = {}
        for s in expr.free_symbols:
            if str(s) not in self.symbols:
                self.symbols[str(s)] = _PRIMES[len(self.symbols) % len(_PRIMES)] + 1000 * (
                    len(self.symbols) // len(_PRIMES)
                )
            subs[s] = self.symbols[str(s)]
        return int(expr.subs(subs))


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _view_groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair dims of ``a`` and ``b`` into groups of equal products (size-1 dims join a neighbour)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(a):
            gi.append(i)
            pi *= a[i]
            i += 1  # noqa: E702
        if j < len(b):
            gj.append(j)
            pj *= b[j]
            j += 1  # noqa: E702
        while pi != pj:
            if pi < pj and i < len(a):
                gi.append(i)
                pi *= a[i]
                i += 1  # noqa: E702
            elif pj < pi and j < len(b):
                gj.append(j)
                pj *= b[j]
                j += 1  # noqa: E702
            else:
                return None
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            gi.append(i)
            i += 1  # noqa: E702
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            gj.append(j)
            j += 1  # noqa: E702
        groups.append((gi, gj))
    return groups


# -- the tracer --------------------------------------------------------------------------------
class Tracer:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.shapes = _Shapes()
        self.chains: list[Chain] = []
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}
        self.tags: dict[Node, tuple[int, int]] = {}
        self.split_tags: dict[Node, tuple[int, int, list[int] | None]] = {}

    # union-find
    def find(self, c: int) -> int:
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.blocked and ra not in self.blocked:
                self.blocked[ra] = self.blocked[rb]

    def new_chain(self, size: int) -> Chain:
        c = Chain(len(self.chains), size)
        self.chains.append(c)
        self.parent.append(c.id)
        return c

    def block(self, chain_ids: list[int], reason: str) -> None:
        for c in chain_ids:
            r = self.find(c)
            self.blocked.setdefault(r, reason)

    # tagging
    def emit(self, node: Node, parents: list[int], axis: int, *, heads_hint: bool = False) -> None:
        shape = self.shapes.of(node)
        if shape is None or not 0 <= axis < len(shape):
            raise Blocked(f"no shape for {node.name}")
        size = shape[axis]
        same = [p for p in parents if self.chains[p].size == size]
        if same:
            cid = same[0]
        else:
            chain = self.new_chain(size)
            cid = chain.id
            for p in parents:
                self.chains[p].resized_children = True
        for p in parents:
            self.union(cid, p)
        if axis != len(shape) - 1 or heads_hint:
            self.chains[cid].heads = True
        self.tags[node] = (cid, axis)

    def run(self) -> list[Group]:
        for node in self.gm.graph.nodes:
            tracked = [a for a in node.all_input_nodes if a in self.tags or a in self.split_tags]
            site = as_site(self.gm, node)
            try:
                if site is not None:
                    self._site(site)
                    continue
                if not tracked:
                    continue
                self._step(node)
            except Blocked as e:
                ids = [self.tags[a][0] if a in self.tags else self.split_tags[a][0] for a in tracked]
                self.block(ids, f"{node.name}: {e}")
        return self._groups()

    def _site(self, site: Site) -> None:
        x = site.x
        other = [
            a for a in site.node.all_input_nodes if a is not x and (a in self.tags or a in self.split_tags)
        ]
        if other:
            raise Blocked("a tracked value reaches a weight")
        if x in self.split_tags:
            raise Blocked("reads a split tuple")
        if x in self.tags:
            cid, axis = self.tags[x]
            rank = len(self.shapes.of(x) or [])
            if axis != rank - 1:
                self.block([cid], f"{site.node.name} contracts another dim")
            else:
                self.chains[cid].sinks.append(site)
        out = self.shapes.of(site.node)
        if out is None:
            return
        chain = self.new_chain(out[-1])
        chain.producer = site
        self.tags[site.node] = (chain.id, len(out) - 1)

    def _tag(self, a: object) -> tuple[int, int] | None:
        return self.tags.get(a) if isinstance(a, Node) else None

    def _step(self, node: Node) -> None:
        """Follow the tracked axis through ``node``: the cases every op shares here, then its rule in
        :data:`RULES`."""
        if node.op == "output":
            raise Blocked("reaches the graph output")
        if node.op != "call_function":
            raise Blocked(f"{node.op} {node.target}")
        t = node.target
        pk = getattr(t, "overloadpacket", None)
        shapes = self.shapes
        x = node.args[0] if node.args else None
        xt = self._tag(x)

        if t is operator.getitem:
            src, i = node.args
            cid, axis, sizes = self.split_tags[src]
            if sizes is None:  # split along another dim: same chain
                self.emit(node, [cid], axis)
                return
            chain = self.chains[cid]
            if chain.segments is not None and chain.segments != sizes:
                raise Blocked("split twice along the pruned dim")
            chain.segments = list(sizes)
            piece = self.new_chain(sizes[i])
            self.union(piece.id, cid)
            piece.heads = chain.heads
            out = shapes.of(node)
            if out is not None and axis != len(out) - 1:
                piece.heads = True
            self.tags[node] = (piece.id, axis)
            return
        if pk in _ASSERTS:
            if any(k in node.kwargs and node.kwargs[k] is not None for k in ("size", "stride")):
                raise Blocked("an assertion pins the shape")
            return
        if pk is aten.sym_size:
            if xt is not None and _norm(node.args[1], len(shapes.of(x))) == xt[1]:
                raise Blocked("its size is read as a number")
            return
        if (
            xt is None
            and pk not in _ELEMENTWISE
            and pk not in (aten.cat, aten.matmul, aten.bmm, aten.scaled_dot_product_attention)
        ):
            raise Blocked(f"{pk} reads it as a secondary input")
        rope = _rope_op()
        if pk in _ELEMENTWISE or (rope is not None and pk is rope):
            self._elementwise(node, rope_like=rope is not None and pk is rope)
            return
        cid, axis = xt if xt is not None else (None, None)
        rule = RULES.get(pk)
        if rule is None:
            raise Blocked(f"{pk} is not understood by the pruner")
        rule(self, node, cid, axis, shapes.of(x))

    def _elementwise(self, node: Node, rope_like: bool) -> None:
        out = self.shapes.of(node)
        if out is None:
            raise Blocked("no shape")
        args = [(i, a) for i, a in enumerate(node.args) if isinstance(a, Node)]
        if rope_like:
            args = args[:1]
            if any(a in self.tags for a in node.args[1:] if isinstance(a, Node)):
                raise Blocked("rotary tables depend on the pruned dim")
        out_axis, parents = None, []
        for _, a in args:
            if a in self.tags:
                cid, axis = self.tags[a]
                shape = self.shapes.of(a)
                oa = axis + len(out) - len(shape)
                if shape[axis] != out[oa] or (out_axis is not None and oa != out_axis):
                    raise Blocked("operands disagree on the pruned dim")
                out_axis = oa
                parents.append(cid)
        if out_axis is None:
            raise Blocked("no tracked operand")
        for _, a in args:
            if a in self.tags:
                continue
            shape = self.shapes.of(a)
            if shape is None:
                continue
            ia = out_axis - (len(out) - len(shape))
            if ia < 0 or shape[ia] == 1:
                continue
            if get_constant(self.gm, a) is not None:
                self.chains[parents[0]].consts.append((node, a, ia))
                continue
            raise Blocked(f"operand {a.name} is computed elsewhere with the full dim")
        self.emit(node, parents, out_axis)

    def _view(self, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
        out = self.shapes.of(node)
        groups = _view_groups(in_shape, out)
        if groups is None:
            raise Blocked("a view the pruner cannot map")
        gi, go = next((gi, go) for gi, go in groups if axis in gi)
        big_i = [d for d in gi if in_shape[d] != 1]
        big_o = [d for d in go if out[d] != 1]
        if not big_o or (big_i and big_i[0] != axis):
            raise Blocked("the pruned dim is not the leading dim of a merged view")
        oa = big_o[0]
        sizes = node.args[1]
        if isinstance(sizes[oa], Node):
            raise Blocked("a symbolic size on the pruned dim")
        self.emit(node, [cid], oa, heads_hint=len(big_o) > 1)
        if sizes[oa] != -1:
            self.chains[self.tags[node][0]].shape_args.append((node, oa))

    def _cat(self, node: Node) -> None:
        tensors, d = node.args[0], node.args[1] if len(node.args) > 1 else 0
        out = self.shapes.of(node)
        d = _norm(d, len(out))
        axes, parents = set(), []
        for a in tensors:
            if a not in self.tags:
                raise Blocked("concatenated with an untracked value")
            cid, axis = self.tags[a]
            axes.add(axis)
            parents.append(cid)
        if len(axes) != 1 or d in axes:
            raise Blocked("concatenates along the pruned dim")
        self.emit(node, parents, axes.pop())

    def _matmul(self, node: Node) -> None:
        a, b = node.args[:2]
        out = self.shapes.of(node)
        sa, sb = self.shapes.of(a), self.shapes.of(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            raise Blocked("matmul of vectors")
        axes, parents = set(), []
        for val, shape in ((a, sa), (b, sb)):
            if val not in self.tags:
                continue
            cid, axis = self.tags[val]
            r = len(shape)
            is_a = val is a
            if axis < r - 2:
                axes.add(axis + len(out) - r)
            elif is_a and axis == r - 2:
                axes.add(len(out) - 2)
            elif not is_a and axis == r - 1:
                axes.add(len(out) - 1)
            else:
                raise Blocked("matmul contracts the pruned dim")
            parents.append(cid)
        if len(axes) != 1:
            raise Blocked("matmul operands disagree on the pruned dim")
        oa = axes.pop()
        if oa < len(out) - 2:  # batch dim: the other operand must carry the same units or broadcast
            for val, shape in ((a, sa), (b, sb)):
                ia = oa - (len(out) - len(shape))
                if val not in self.tags and ia >= 0 and shape[ia] != 1:
                    raise Blocked("matmul with an untracked full batch dim")
        self.emit(node, parents, oa, heads_hint=True)

    def _sdpa(self, node: Node) -> None:
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        parents = []
        for val in (q, k, v):
            if val not in self.tags or self.tags[val][1] != 1:
                raise Blocked("attention with heads of only some of q/k/v tracked")
            parents.append(self.tags[val][0])
        if isinstance(mask, Node):
            if mask in self.tags:
                raise Blocked("attention mask depends on the pruned heads")
            ms = self.shapes.of(mask)
            if ms is not None and len(ms) == 4 and ms[1] != 1:
                raise Blocked("per-head attention mask")
        self.emit(node, parents, 1, heads_hint=True)

    def _groups(self) -> list[Group]:
        by_root: dict[int, list[Chain]] = {}
        for c in self.chains:
            by_root.setdefault(self.find(c.id), []).append(c)
        groups = []
        for root, chains in by_root.items():
            g = Group(chains)
            g.blocked = self.blocked.get(root)
            g.kind = "heads" if any(c.heads for c in chains) else "channels"
            sinks = [s for c in chains for s in c.sinks]
            producers = [c.producer for c in chains if c.producer is not None]
            if g.blocked is None and not sinks:
                g.blocked = "no consumer weight contracts it"
            if g.blocked is None and any(c.segments and c.resized_children for c in chains):
                g.blocked = "a view reshapes a concatenation of pruned dims"
            sizes = [s for c in chains for s in c.sizes()]
            g.units = math.gcd(*sizes) if sizes else 0
            names = [s.name for s in sinks] or [p.name for p in producers]
            g.label = _label(names[0]) if names else f"group{root}"
            if producers or sinks:
                groups.append(g)
        return groups


def _kept_dims(in_shape: list[int], out: list[int]) -> list[int]:
    kept, j = [], 0
    for i, s in enumerate(in_shape):
        if j < len(out) and out[j] == s and (s != 1 or len(in_shape) - i == len(out) - j):
            kept.append(i)
            j += 1
    return kept


# -- the rules: how the tracked axis goes through each op family ----------------------------------
# rule(tracer, node, chain id, axis of the input, the input's shape); each emits the axis of the
# output (Tracer.emit) or raises Blocked with the reason

def _transpose(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    d0, d1 = _norm(node.args[1], len(in_shape)), _norm(node.args[2], len(in_shape))
    tr.emit(node, [cid], d1 if axis == d0 else d0 if axis == d1 else axis)


def _permute(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    tr.emit(node, [cid], [_norm(d, len(in_shape)) for d in node.args[1]].index(axis))


def _unsqueeze(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    d = _norm(node.args[1], len(in_shape) + 1)
    tr.emit(node, [cid], axis + (1 if d <= axis else 0))


def _squeeze(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    dropped = [i for i in range(len(in_shape)) if i not in _kept_dims(in_shape, tr.shapes.of(node))]
    if axis in dropped:
        raise Blocked("squeezes the pruned dim")
    tr.emit(node, [cid], axis - sum(1 for d in dropped if d < axis))


def _expand(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    out = tr.shapes.of(node)
    oa = axis + len(out) - len(in_shape)
    if out[oa] != in_shape[axis]:
        raise Blocked("expands the pruned dim")
    tr.emit(node, [cid], oa)
    sizes = node.args[1]
    if isinstance(sizes[oa], int) and sizes[oa] != -1:
        tr.chains[cid].shape_args.append((node, oa))
    elif isinstance(sizes[oa], Node):
        raise Blocked("a symbolic size on the pruned dim")


def _softmax(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    if _norm(node.args[1], len(in_shape)) == axis:
        raise Blocked("softmax over the pruned dim")
    tr.emit(node, [cid], axis)


def _norm_layer(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    if axis >= len(in_shape) - len(node.args[1]):
        raise Blocked("normalizes over the pruned dim")
    tr.emit(node, [cid], axis)


def _reduce(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        raise Blocked("reduces every dim")
    dims = [_norm(d, len(in_shape)) for d in ([dims] if isinstance(dims, int) else dims)]
    if axis in dims:
        raise Blocked("reduces over the pruned dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    tr.emit(node, [cid], axis if keep else axis - sum(1 for d in dims if d < axis))


def _static_range(node: Node, size: int) -> tuple[int, int] | None:
    """(start, end) of ``aten.slice(x, dim, start, end[, 1])`` with constant bounds, clamped to ``size``."""
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2] if args[2] is not None else 0, args[3], args[4] if args[4] is not None else 1
    if end is None:
        end = size
    if not all(isinstance(v, int) for v in (start, end, step)) or step != 1:
        return None
    start, end = (v + size if v < 0 else v for v in (start, end))
    return max(0, min(start, size)), max(0, min(end, size))


def _slice(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    d = _norm(node.args[1] if len(node.args) > 1 else 0, len(in_shape))
    if d != axis or tr.shapes.of(node)[axis] == in_shape[axis]:
        tr.emit(node, [cid], axis)
        return
    # slices with constant bounds that tile the dim (Phi-3's qkv[..., :q], [q:q+k], [q+k:]) are a
    # split: the pieces become the chain's segments, each slice one of them
    size, src = in_shape[axis], node.args[0]
    siblings = [u for u in src.users if u.op == "call_function" and getattr(u.target, "overloadpacket", None)
                is aten.slice and _norm(u.args[1] if len(u.args) > 1 else 0, len(in_shape)) == axis]
    ranges = sorted((r, u) for u in siblings if (r := _static_range(u, size)) is not None)
    bounds = [r for r, _ in ranges]
    if len(ranges) != len(siblings) or not bounds or bounds[0][0] != 0 or bounds[-1][1] != size or any(
            a[1] != b[0] for a, b in zip(bounds, bounds[1:])) or any(a >= b for a, b in bounds):
        raise Blocked("slices the pruned dim")
    sizes = [b - a for a, b in bounds]
    chain = tr.chains[cid]
    if chain.segments is not None and chain.segments != sizes:
        raise Blocked("split twice along the pruned dim")
    chain.segments = sizes
    i = next(k for k, (_, u) in enumerate(ranges) if u is node)
    piece = tr.new_chain(sizes[i])
    tr.union(piece.id, cid)
    piece.heads = chain.heads
    chain.slices.append((node, i))
    tr.tags[node] = (piece.id, axis)


def _split(tr: Tracer, node: Node, cid: int, axis: int, in_shape: list[int]) -> None:
    d = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(in_shape))
    if d != axis:
        tr.split_tags[node] = (cid, axis, None)
        return
    val = node.meta.get("val")
    sizes = [tr.shapes.dim(v.shape[axis]) for v in val] if isinstance(val, (list, tuple)) else None
    if not sizes:
        raise Blocked("split without shapes")
    tr.split_tags[node] = (cid, axis, sizes)
    tr.chains[cid].splits.append(node)


#: op family -> its rule (ops not here block their group)
RULES = {
    aten.transpose: _transpose,  # the two swapped dims: the axis follows the swap
    aten.t: lambda tr, node, cid, axis, _: tr.emit(node, [cid], 1 - axis),  # 2-D transpose
    aten.permute: _permute,  # the axis goes where the permutation puts it
    aten.unsqueeze: _unsqueeze,  # a new dim at or before the axis shifts it by one
    aten.squeeze: _squeeze,  # dropped size-1 dims before the axis shift it; squeezing the axis blocks
    **dict.fromkeys(_VIEWS, lambda tr, node, cid, axis, shape: tr._view(node, cid, axis, shape)),  # regrouped dims
    aten.expand: _expand,  # broadcast dims in front shift it; expanding the axis itself blocks
    **dict.fromkeys(_SOFTMAX, _softmax),  # over another dim only
    **dict.fromkeys(_NORMS, _norm_layer),  # the normalized trailing dims must not hold the axis
    **dict.fromkeys(_REDUCE, _reduce),  # reduced dims must not hold the axis; keepdim decides the shift
    aten.slice: _slice,  # along another dim transparent; along the axis a split when the slices tile it
    aten.split: _split,  # along the axis: the pieces become the chain's segments (getitem picks one)
    aten.split_with_sizes: _split,
    aten.chunk: _split,  # equal pieces: a split
    aten.cat: lambda tr, node, *_: tr._cat(node),  # chains of the inputs meet, or their sizes add up
    aten.matmul: lambda tr, node, *_: tr._matmul(node),  # batch dims carry it; contracting it makes a sink
    aten.bmm: lambda tr, node, *_: tr._matmul(node),
    aten.scaled_dot_product_attention: lambda tr, node, *_: tr._sdpa(node),  # heads axis of q/k/v/out
}

def _label(weight_name: str) -> str:
    parts = weight_name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def trace(gm: torch.fx.GraphModule) -> list[Group]:
    """Every group of chains in ``gm`` (blocked ones carry the reason)."""
    return Tracer(gm).run()


# -- rewriting ---------------------------------------------------------------------------------
