"""Structured pruning's rewrite: shrink the weights, shape arguments and splits of a traced group
(:mod:`.dependency` finds them), and the masked copy of the graph the shrunk one must equal."""

from __future__ import annotations

import torch
import torch.fx

from .dependency import Group
from .sites import get_constant

aten = torch.ops.aten
Node = torch.fx.Node


def replace_constant(gm: torch.fx.GraphModule, user: Node, attr: Node, value: torch.Tensor) -> None:
    """Make ``user`` read ``value`` where it read the ``get_attr`` ``attr``: in place when nothing else
    reads that tensor, else through a new parameter and ``get_attr`` for this user alone."""
    target = str(attr.target)
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    old = get_constant(gm, attr)
    value = value.detach().contiguous()
    if len(readers) == 1 and set(attr.users) == {user}:
        *parents, leaf = target.split(".")
        mod = gm
        for p in parents:
            mod = getattr(mod, p)
        if isinstance(old, torch.nn.Parameter):
            mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)  # noqa: SLF001 - keep the name
        elif leaf in getattr(mod, "_buffers", {}):
            mod._buffers[leaf] = value  # noqa: SLF001
        else:
            setattr(mod, leaf, value)
        return
    base = target.replace(".", "_") + "_pruned"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(user):
        new = gm.graph.get_attr(name)
    new.meta = dict(attr.meta)
    user.replace_input_with(attr, new)


def apply(gm: torch.fx.GraphModule, group: Group, keep: list[int]) -> None:
    """Shrink every weight, shape argument and split of ``group`` to the ``keep`` units."""
    for chain in group.chains:
        idx, segments = group.index(chain, keep)
        new_size = sum(segments)
        if chain.producer is not None:
            site = chain.producer
            w = get_constant(gm, site.weight)
            replace_constant(gm, site.node, site.weight, w.index_select(site.out_dim, idx))
            if site.bias is not None:
                replace_constant(gm, site.node, site.bias, get_constant(gm, site.bias).index_select(0, idx))
        for site in chain.sinks:
            w = get_constant(gm, site.weight)
            replace_constant(gm, site.node, site.weight, w.index_select(site.in_dim, idx))
        for node, pos in chain.shape_args:
            sizes = list(node.args[1])
            sizes[pos] = new_size
            node.args = (node.args[0], sizes, *node.args[2:])
        for node, i in chain.slices:
            node.args = (node.args[0], node.args[1], sum(segments[:i]), sum(segments[: i + 1]), *node.args[4:])
        for node in chain.splits:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], list(segments), dim), {}
        for user, attr, dim in chain.consts:
            c = get_constant(gm, attr)
            replace_constant(gm, user, attr, c.index_select(dim, idx))


def masked_copy(gm: torch.fx.GraphModule, plan: list[tuple[Group, list[int]]]) -> torch.fx.GraphModule:
    """A copy of ``gm`` with the sinks' columns of every removed unit zeroed: what the shrunk graph
    must compute exactly."""
    from graphopt.ir import copy_graph_module

    masked = copy_graph_module(gm)  # weights shared; the masked sinks get new tensors below
    names = {n.name: n for n in masked.graph.nodes}
    for group, keep in plan:
        dropped = [u for u in range(group.units) if u not in set(keep)]
        if not dropped:
            continue
        for chain, site in group.sinks:
            node = names[site.weight.name]
            w = get_constant(masked, node).detach().clone()
            cols = [i for u in dropped for i in group.unit_slices(chain)[u]]
            w.index_fill_(site.in_dim, torch.tensor(cols, dtype=torch.long), 0.0)
            replace_constant(masked, names[site.node.name], node, w)
    masked.recompile()
    return masked
