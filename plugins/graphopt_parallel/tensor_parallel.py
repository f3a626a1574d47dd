"""tensor-parallel: shard attention by KV-head groups and FFNs by channels over N ranks.

Why: when a model's weights do not fit one device, or decoding needs more memory bandwidth than
one device has, each of N devices holds 1/N of every large GEMM (Megatron-LM's tensor parallelism,
what TensorRT-LLM and vLLM run): the GEMMs that produce heads or FFN channels are split by rows
(column-parallel: Q/K/V or merged QKV, gate/up), the GEMMs that consume them by columns
(row-parallel: o_proj, down), and one all-reduce after each row-parallel GEMM sums the ranks'
partial products. Embeddings, norms and the lm_head stay replicated::

    h ─ linear(Wqkv) ─ split ─ view/rope ─ sdpa ─ view ─ linear(Wo) ─ + bias
                                      ↓  N = 2
    h ─ linear(Wqkv[rank 0 rows]) ─ ... sdpa(heads of rank 0) ... ─ linear(Wo[:, rank 0 cols]) ─┐
    h ─ linear(Wqkv[rank 1 rows]) ─ ... sdpa(heads of rank 1) ... ─ linear(Wo[:, rank 1 cols]) ─┤
                                                                     graphopt::tp_reduce(...) ─┴ + bias

What moves together is found by structured pruning's dependency tracer (graphopt_prune.dependency:
the producers' rows, the consumers' columns, every view/expand/split size and per-head constant in
between), so any architecture the pruner understands shards, whatever its module names. A unit is
the smallest block every chain can split: a KV head with its query heads (GQA: a rank holds whole KV
heads), one FFN channel. Each rank takes a contiguous 1/N of the units; a group whose units N does
not divide is refused, naming it.

The result is ONE graph holding every rank's shard side by side (graphopt.parallel: ``tp_reduce``
is the sum of the ranks' parts, ``tp_shard`` a rank's slice of a sharded input, ``tp_gather`` the
ranks' slices of a sharded output), so it computes the original function and is verified by the fp64
rule like any other rewrite (the order of the partial sums changes the rounding). The torch target
cuts each rank's program out of it (graphopt.parallel.rank_ir).

After ``kv-cache`` (the pass runs after it; put in any order, the pipeline reorders): each rank
caches its own KV heads: the cache inputs and outputs are sharded along the head dim. Before
``quantize``: weight-only quantization then computes each shard's own scales.

Left replicated (and reported): groups the tracer blocks (the reason is in the stats), the lm_head
and embeddings unless ``vocab=sharded`` (the lm_head's rows split with its logits all-gathered, the
token table looked up vocab-parallel: masked rows, all-reduced), groups chained to another sharded
group without an all-reduce between them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
import torch.fx
from graphopt_prune.dependency import Blocked, Group, Tracer
from graphopt_prune.sites import Site, get_constant

from graphopt import Pass, PassContext, PassResult
from graphopt.errors import PassError
from graphopt.fx import ASSERT_OPS, add_constant, copy_source_meta, erase_dead, packet
from graphopt.ir import GraphIR
from graphopt.parallel import ALL_GATHER, GATHER, REDUCE, SHARD
from graphopt.verify import reference

log = logging.getLogger(__name__)

aten = torch.ops.aten
Node = torch.fx.Node


class ShardTracer(Tracer):
    """The pruner's tracer with the graph's edges opened: a graph input concatenated with a tracked
    value (the past KV cache) is sharded with it, and a tracked value may be a graph output (the
    present cache), gathered from the ranks. The pruner blocks both (it cannot shrink an input)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.inputs: dict[Node, Node] = {}  # sharded placeholder -> the node that joined it to a chain
        self.outputs: list[Node] = []  # tracked values the graph returns

    def _cat(self, node: Node) -> None:
        tensors = node.args[0]
        tracked = [a for a in tensors if a in self.tags]
        if tracked:
            axis = self.tags[tracked[0]][1]
            for a in tensors:
                if a not in self.tags and isinstance(a, Node) and a.op == "placeholder":
                    self.emit(a, [], axis, heads_hint=True)
                    self.inputs[a] = node
        super()._cat(node)

    def _step(self, node: Node) -> None:
        if node.op == "output":
            self.outputs.extend(a for a in node.all_input_nodes if a in self.tags)
            return
        if packet(node) is aten.index_copy and self._index_copy(node):
            return
        super()._step(node)

    def _index_copy(self, node: Node) -> bool:
        """A static cache: ``index_copy(past, seq dim, positions, new)`` writes the new keys into the
        cache input; the cache is sharded with them (along their tracked axis, not the written dim)."""
        base, dim, index, src = node.args[:4]
        if src not in self.tags or base in self.tags or index in self.tags or not isinstance(base, Node) \
                or base.op != "placeholder":
            return False
        cid, axis = self.tags[src]
        if len(self.shapes.of(base) or []) != len(self.shapes.of(src) or []) or dim % len(self.shapes.of(base)) == axis:
            raise Blocked("writes the cache along the sharded dim")
        self.emit(base, [], axis, heads_hint=True)
        self.inputs[base] = node
        self.emit(node, [self.tags[base][0], cid], axis, heads_hint=True)
        return True

    def run(self) -> list[Group]:
        groups = super().run()
        for p, joined in self.inputs.items():  # read before it was tagged: only its other dims may be read
            cid, axis = self.tags[p]
            for user in p.users:
                if user is joined or packet(user) in ASSERT_OPS or (
                        user in self.tags and self.find(self.tags[user][0]) == self.find(cid)):
                    continue
                if packet(user) is aten.sym_size and len(user.args) > 1 and user.args[1] % len(
                        self.shapes.of(p)) != axis:
                    continue
                self.block([cid], f"{user.name} reads the sharded input {p.name}")
        if self.blocked:  # re-read what blocking decided
            groups = self._groups()
        return groups


@dataclasses.dataclass
class Options:
    world_size: int = 2
    vocab: Literal["replicated", "sharded"] = "replicated"

    def __post_init__(self):
        if self.world_size < 2:
            raise ValueError(f"world_size={self.world_size}: tensor parallelism needs at least 2 ranks")


class TensorParallel(Pass):
    """Shard attention (by KV-head groups) and FFNs (by channels) over world_size ranks."""

    name = "tensor-parallel"
    Options = Options
    verification = reference()
    runs_after = ("fuse-attention", "fuse-norms", "fuse-rope", "merge-gemms", "fuse-activations", "kv-cache",
                  "remove-padding", "prune")
    runs_before = ("quantize",)
    requires_passes = ("fuse-attention",)
    targets = ("torch",)
    weight_memory = 1.0  # the shards are new tensors until the originals are dropped

    def requires(self, ir: GraphIR) -> None:
        if ir.meta.get("tensor_parallel"):
            raise PassError("the graph is already tensor-parallel; run tensor-parallel once")

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        n = self.options.world_size
        gm = ir.graph_module
        tracer = ShardTracer(gm)
        groups = tracer.run()
        sharded, replicated, chosen = {}, {}, []
        sink_nodes: set[Node] = set()
        producer_nodes: set[Node] = set()
        for g in groups:
            if g.blocked:
                if g.sinks or g.kind == "heads":
                    replicated[g.label] = g.blocked
                continue
            prods = {s.node for _, s in g.producers}
            sinks = {s.node for _, s in g.sinks}
            if prods & sink_nodes or sinks & producer_nodes:
                replicated[g.label] = "chained to another sharded group with no all-reduce between them"
                continue
            if g.units % n:
                what = "KV-head groups (a KV head with its query heads)" if g.kind == "heads" else "channels"
                raise PassError(f"tensor-parallel(world_size={n}): {g.label} has {g.units} {what}, which {n} ranks "
                                f"do not divide; choose a world size that divides {g.units}")
            if not ctx.should_rewrite(f"tensor-parallel {g.label}: {g.units} {g.kind} over {n} ranks"):
                continue
            chosen.append(g)
            sink_nodes |= sinks
            producer_nodes |= prods
        if not chosen:
            raise PassError(f"tensor-parallel found nothing to shard (no attention or FFN whose heads/channels a "
                            f"consumer GEMM contracts){': ' + '; '.join(f'{k}: {v}' for k, v in replicated.items()) if replicated else ''}")
        heads = [g for g in groups if _is_vocab_head(g, tracer)]
        if self.options.vocab == "sharded":
            if not heads:
                raise PassError("tensor-parallel(vocab=sharded) found no lm_head (a GEMM whose output features reach "
                                "the graph output); leave vocab=replicated")
            for g in heads:
                if g.units % n:
                    raise PassError(f"tensor-parallel(vocab=sharded): {g.label} has a vocabulary of {g.units}, which "
                                    f"{n} ranks do not divide; leave vocab=replicated")
                replicated.pop(g.label, None)
        else:
            for g in heads:
                replicated[g.label] = "the lm_head (vocab=replicated)"
        in_index = {p: i for i, p in enumerate(ir.placeholders())}
        sharded_inputs: dict[str, int] = {}
        names = {p: ir.inputs[i].name for p, i in in_index.items()}
        shards: dict[tuple, str] = {}  # one tensor per (weight, rows, rank): a tied table is sliced once
        for g in chosen:
            _shard(gm, tracer, g, n, sharded_inputs, names, shards)
            sharded[g.label] = f"{g.kind} {g.units} -> {g.units // n} per rank"
        if self.options.vocab == "sharded":
            for g in heads:
                vocab = g.units
                _shard(gm, tracer, g, n, sharded_inputs, names, shards, gather=ALL_GATHER)
                sharded[g.label] = f"vocabulary {vocab} -> {vocab // n} per rank (logits all-gathered)"
                for node in [x for x in gm.graph.nodes if _embedding_table(gm, x, vocab, g) is not None]:
                    sharded[f"{node.name} ({node.args[0].target})"] = (f"embedding rows {vocab} -> {vocab // n} "
                                                                       "per rank (masked lookup, all-reduced)")
                    _shard_embedding(gm, node, n, shards)
        sharded_outputs = {s.name: v.args[1] for s, v in zip(ir.outputs, ir.output_values())
                           if isinstance(v, Node) and v.target is GATHER}
        ir.meta["tensor_parallel"] = {"world_size": n, "sharded_inputs": sharded_inputs,
                                      "sharded_outputs": sharded_outputs, "sharded": sharded,
                                      "replicated": replicated}
        params_before = ir.param_count()
        ir.recompile()
        ir.propagate_shapes()
        stats = {"world_size": n, "groups_sharded": len(chosen), "sharded": sharded, "replicated": replicated,
                 "sharded_inputs": sharded_inputs, "sharded_outputs": sharded_outputs,
                 "params": params_before}
        return PassResult(ir, True, stats)


NO_CONSUMER = "no consumer weight contracts it"  # graphopt_prune.dependency's reason for a group with no sink


def _is_vocab_head(g: Group, tr: ShardTracer) -> bool:
    """The lm_head: one GEMM's output features reaching the graph output, nothing else in the way."""
    if g.blocked != NO_CONSUMER or len(g.producers) != 1:
        return False
    cids = {c.id for c in g.chains}
    return any(tr.tags[o][0] in cids for o in tr.outputs)


def _embedding_table(gm: torch.fx.GraphModule, node: Node, vocab: int, head: Group) -> torch.Tensor | None:
    """The token-embedding table ``node`` looks up: the lm_head's own (tied), or a table of the vocabulary's
    rows indexed by a graph input (the token ids; a position table is indexed by computed positions)."""
    if node.op != "call_function" or node.target is not aten.embedding.default:
        return None
    table, ids = node.args[0], node.args[1]
    t = get_constant(gm, table)
    if t is None or t.dim() != 2 or t.shape[0] != vocab:
        return None
    tied = any(str(site.weight.target) == str(table.target) for _, site in head.producers)
    return t if tied or (isinstance(ids, Node) and ids.op == "placeholder") else None


def _sliced(gm: torch.fx.GraphModule, attr: Node, dim: int, idx: torch.Tensor, r: int, before: Node,
            shards: dict[tuple, str]) -> Node:
    """A ``get_attr`` of rank ``r``'s slice ``idx`` of ``attr``'s tensor along ``dim`` (made once per
    weight, slice and rank: a table tied to the lm_head is one tensor in the rank's program)."""
    key = (str(attr.target), dim, r, tuple(idx.tolist()))
    name = shards.get(key)
    if name is None:
        t = get_constant(gm, attr)
        name = shards[key] = add_constant(gm, f"{attr.target}_tp{r}", t.index_select(dim, idx).contiguous(),
                                          parameter=True)
    with gm.graph.inserting_before(before):
        new = gm.graph.get_attr(name)
    new.meta = dict(attr.meta)
    return new


def _shard_embedding(gm: torch.fx.GraphModule, node: Node, n: int, shards: dict[tuple, str]) -> None:
    """Vocab-parallel lookup (Megatron's VocabParallelEmbedding): rank ``r`` holds rows
    ``[r V/N, (r+1) V/N)``, looks up the ids in its range, zeroes the others' rows; the all-reduce
    adds the one real row to zeros (exact)."""
    graph = gm.graph
    table, ids = node.args[0], node.args[1]
    rows = get_constant(gm, table).shape[0] // n
    parts = []
    for r in range(n):
        w = _sliced(gm, table, 0, torch.arange(r * rows, (r + 1) * rows), r, node, shards)
        with graph.inserting_before(node):
            local = graph.call_function(aten.sub.Tensor, (ids, r * rows))
            inside = graph.call_function(aten.bitwise_and.Tensor, (
                graph.call_function(aten.ge.Scalar, (local, 0)), graph.call_function(aten.lt.Scalar, (local, rows))))
            idx = graph.call_function(aten.where.self, (inside, local, graph.call_function(aten.zeros_like.default,
                                                                                            (local,))))
            looked = graph.call_function(aten.embedding.default, (w, idx, *node.args[2:]))
            keep = graph.call_function(aten.unsqueeze.default, (inside, -1))
            parts.append(graph.call_function(aten.mul.Tensor, (looked, keep)))
    with graph.inserting_before(node):
        out = graph.call_function(REDUCE, (parts,))
    copy_source_meta(node, out)
    node.replace_all_uses_with(out)
    erase_dead(graph, [node])


def _shard(gm: torch.fx.GraphModule, tr: ShardTracer, g: Group, n: int, sharded_inputs: dict[str, int],
           input_names: dict[Node, str], shards: dict[tuple, str], gather: object = GATHER) -> None:
    """Replace group ``g``'s region by ``n`` rank shards, its consumers by reduced partial products, the
    graph outputs it reaches by ``gather`` of the ranks' slices (``tp_gather``: each rank returns its
    slice; ``tp_all_gather``: every rank returns the whole, the lm_head's logits)."""
    graph = gm.graph
    cids = {c.id for c in g.chains}
    region = [x for x in graph.nodes if (x in tr.tags and tr.tags[x][0] in cids and x.op != "placeholder")
              or (x in tr.split_tags and tr.split_tags[x][0] in cids)]
    in_region = set(region)
    inputs = [p for p in tr.inputs if tr.tags[p][0] in cids]
    producers = {s.node: (c, s) for c, s in g.producers}
    per = g.units // n
    keeps = [list(range(r * per, (r + 1) * per)) for r in range(n)]
    # shape arguments, splits and per-unit constants of each chain, by node
    shape_args = {(x, pos): c for c in g.chains for x, pos in c.shape_args}
    splits = {x: c for c in g.chains for x in c.splits}
    slices = {x: (c, i) for c in g.chains for x, i in c.slices}
    consts = {(user, attr): (c, dim) for c in g.chains for user, attr, dim in c.consts}
    envs: list[dict[Node, Node]] = [{} for _ in range(n)]

    def sliced(attr: Node, dim: int, idx: torch.Tensor, r: int, before: Node) -> Node:
        return _sliced(gm, attr, dim, idx, r, before, shards)

    for x in region:
        for r in range(n):
            env = envs[r]

            def lookup(a: Node, env=env, r=r, x=x) -> Node:
                if a in env:
                    return env[a]
                if a in inputs:
                    with graph.inserting_before(x):
                        s = graph.call_function(SHARD, (a, tr.tags[a][1], r, n))
                    env[a] = s
                    return s
                return a

            if x in producers:
                c, site = producers[x]
                idx, _ = g.index(c, keeps[r])
                w = sliced(site.weight, site.out_dim, idx, r, x)
                b = sliced(site.bias, 0, idx, r, x) if site.bias is not None else None
                swap = {site.weight: w, **({site.bias: b} if b is not None else {})}
                with graph.inserting_before(x):
                    new = graph.node_copy(x, lambda a, swap=swap, lookup=lookup: swap.get(a) or lookup(a))
            else:
                with graph.inserting_before(x):
                    new = graph.node_copy(x, lookup)
            copy_source_meta(x, new)
            new.meta.pop("val", None)
            for (node, pos), c in shape_args.items():
                if node is x:
                    sizes = list(new.args[1])
                    sizes[pos] = sum(g.index(c, keeps[r])[1])
                    new.args = (new.args[0], sizes, *new.args[2:])
            if x in slices:  # one of a set of slices that tile the dim: its segment of this rank's
                c, i = slices[x]
                _, segments = g.index(c, keeps[r])
                new.args = (new.args[0], new.args[1], sum(segments[:i]), sum(segments[: i + 1]), *new.args[4:])
            if x in splits:
                _, segments = g.index(splits[x], keeps[r])
                dim = new.args[2] if len(new.args) > 2 else new.kwargs.get("dim", 0)
                new.target = aten.split_with_sizes.default
                new.args, new.kwargs = (new.args[0], list(segments), dim), {}
            for (user, attr), (c, dim) in consts.items():
                if user is x:
                    idx, _ = g.index(c, keeps[r])
                    new.replace_input_with(attr, sliced(attr, dim, idx, r, new))
            env[x] = new
    for p in inputs:
        sharded_inputs[input_names[p]] = tr.tags[p][1]
    # consumers: each rank contracts its own columns; one all-reduce sums them; the bias once after
    for c, site in g.sinks:
        _reduce_sink(gm, g, c, site, envs, keeps, shards)
    # what still reads the region: the graph output (gathered), shape reads (rank 0's, same size)
    for x in region:
        for user in list(x.users):
            if user in in_region:
                continue
            if user.op == "output":
                with graph.inserting_before(user):
                    gat = graph.call_function(gather, ([env[x] for env in envs], tr.tags[x][1]))
                user.replace_input_with(x, gat)
            elif packet(user) in ASSERT_OPS:
                graph.erase_node(user)
            elif packet(user) is aten.sym_size:  # a size off another dim (the tracer refused the sharded
                user.replace_input_with(x, envs[0][x])  # one): the same on every rank
            else:
                raise PassError(f"tensor-parallel: {user.name} ({user.target}) reads {x.name}, a value of "
                                f"{g.label}'s shards, in a way the sharding does not follow")
    erase_dead(graph, region)  # and the full weights only they read
    leftover = [x.name for x in region if x in set(graph.nodes)]
    if leftover:
        raise PassError(f"tensor-parallel could not detach {g.label}: {leftover[:5]} still read")


def _reduce_sink(gm: torch.fx.GraphModule, g: Group, c, site: Site, envs: list[dict[Node, Node]],
                 keeps: list[list[int]], shards: dict[tuple, str]) -> None:
    graph = gm.graph
    x, node = site.x, site.node
    parts = []
    for r, env in enumerate(envs):
        idx, _ = g.index(c, keeps[r])
        w = _sliced(gm, site.weight, site.in_dim, idx, r, node, shards)
        with graph.inserting_before(node):
            if node.target is aten.linear.default:
                part = graph.call_function(aten.linear.default, (env[x], w))
            else:  # addmm(b, x, W) / mm(x, W) / matmul(x, W)
                op = aten.mm.default if node.target is aten.addmm.default else node.target
                part = graph.call_function(op, (env[x], w))
        copy_source_meta(node, part)
        parts.append(part)
    with graph.inserting_before(node):
        out = graph.call_function(REDUCE, (parts,))
        if site.bias is not None:
            out = graph.call_function(aten.add.Tensor, (out, site.bias))
    copy_source_meta(node, out)
    node.replace_all_uses_with(out)
    erase_dead(graph, [node])

