"""merge-gemms: linears that read the same input become one linear and a split.

Why: attention computes Q, K and V from the same hidden states, and gated MLPs (SwiGLU) compute
gate and up from the same input: two or three skinny GEMMs that each read the whole input. One
GEMM with the weights stacked reads the input once, gives the kernel a wider N to tile, and costs
one launch instead of three (the QKV and gate-up fusions vLLM and TensorRT-LLM build by hand)::

    %q = aten.linear(%h, %wq, %bq)                       %w  = get_attr[_merged_0_weight]  # cat(wq, wk, wv)
    %k = aten.linear(%h, %wk, %bk)                       %b  = get_attr[_merged_0_bias]    # cat(bq, bk, bv)
    %v = aten.linear(%h, %wv, %bv)               →       %y  = aten.linear(%h, %w, %b)
                                                         %s  = aten.split_with_sizes(%y, [64, 32, 32], -1)
                                                         %q = getitem(%s, 0) ...

A group is every ``aten.linear`` reading the same input node whose weight is a constant (a
``get_attr`` parameter or buffer, 2-D) with the group's dtype, device and in-features, and whose
bias is absent or a constant 1-D tensor of the same dtype. Linears in a group that mix bias and no
bias get zero biases for the missing ones (adding 0.0 changes no value). Left alone: linears whose
weight is computed (dequantized, transposed at run time) or a graph input, weights of another
dtype or device than the rest of the group, and groups of one.

The merged weights are new parameters (``_merged_<i>_weight`` / ``_bias``); the originals are dropped
by ``ir.recompile()`` unless something else still reads them (tied weights), so the weight memory
stays the same. The merged linear is placed where the first linear of the group was.

Verification: ``reference()`` (the fp64 rule, README "Verification"): a wider GEMM may block its reduction differently.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.ir import GraphIR
from graphopt.verify import reference

from .patterns import aten, constant_tensor, copy_source_meta

log = logging.getLogger(__name__)

Node = torch.fx.Node
PREFIX = "_merged_"


def _linear(gm: torch.fx.GraphModule, node: Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a mergeable linear: constant 2-D weight, constant 1-D bias or none."""
    if node.target is not aten.linear.default or set(node.kwargs) - {"bias"} or len(node.args) < 2:
        return None
    weight = constant_tensor(node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias = constant_tensor(bias_node) if bias_node is not None else None
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        return None
    if bias_node is not None and (bias is None or bias.shape != weight.shape[:1] or bias.dtype != weight.dtype
                                  or bias.device != weight.device):
        return None
    return weight, bias


def _key(weight: torch.Tensor) -> tuple:
    """Linears merge only with linears whose weights agree in this."""
    return (weight.dtype, weight.device, weight.shape[1])


def groups(gm: torch.fx.GraphModule) -> list[list[tuple[Node, torch.Tensor, torch.Tensor | None]]]:
    """Groups of >= 2 mergeable linears, by input node and weight kind, in graph order."""
    by_input: dict[tuple, list[tuple[Node, torch.Tensor, torch.Tensor | None]]] = {}
    for node in gm.graph.nodes:
        found = _linear(gm, node)
        if found is not None:
            by_input.setdefault((node.args[0], *_key(found[0])), []).append((node, *found))
    return [g for g in by_input.values() if len(g) >= 2]


def _unique(gm: torch.fx.GraphModule) -> str:
    i = 0
    while hasattr(gm, f"{PREFIX}{i}_weight"):
        i += 1
    return f"{PREFIX}{i}"


def merge(gm: torch.fx.GraphModule, group: list[tuple[Node, torch.Tensor, torch.Tensor | None]]) -> Node:
    """Replace the group's linears by one linear + split_with_sizes; returns the new linear."""
    graph = gm.graph
    first = group[0][0]
    weight = torch.cat([w.detach() for _, w, _ in group], dim=0)
    bias = None
    if any(b is not None for _, _, b in group):
        bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for _, w, b in group])
    name = _unique(gm)
    gm.register_parameter(f"{name}_weight", torch.nn.Parameter(weight, requires_grad=False))
    if bias is not None:
        gm.register_parameter(f"{name}_bias", torch.nn.Parameter(bias, requires_grad=False))
    sizes = [int(w.shape[0]) for _, w, _ in group]
    x = first.args[0]
    with graph.inserting_before(first):
        w_node = graph.get_attr(f"{name}_weight")
        b_node = graph.get_attr(f"{name}_bias") if bias is not None else None
        args = (x, w_node, b_node) if b_node is not None else (x, w_node)
        linear = graph.call_function(aten.linear.default, args)
        split = graph.call_function(aten.split_with_sizes.default, (linear, sizes, -1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for (node, _, _), piece in zip(group, pieces):
        piece.meta["val"] = node.meta.get("val")
        copy_source_meta(node, piece)
        node.replace_all_uses_with(piece)
        reads = [a for a in node.args[1:] if isinstance(a, Node)] + [a for a in node.kwargs.values() if isinstance(a, Node)]
        graph.erase_node(node)
        for attr in reads:  # the old weight/bias get_attr: dropped unless another node reads it
            if not attr.users:
                graph.erase_node(attr)
    return linear


class MergeGemms(Pass):
    """Merge linears that share an input (Q/K/V, gate/up) into one linear with stacked weights."""

    name = "merge-gemms"
    weight_memory = 0.7  # stacked Q/K/V and gate/up weights while the originals stay (the original graph)
    verification = reference()

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        gm = ir.graph_module
        merged_groups = linears = 0
        for group in groups(gm):
            names = ", ".join(n.name for n, _, _ in group)
            if not ctx.should_rewrite(f"merge {names}"):
                continue
            new = merge(gm, group)
            merged_groups += 1
            linears += len(group)
            log.debug("merge-gemms: %s -> %s", names, new.name)
        return PassResult.after_rewrites(ir, {"merged_groups": merged_groups, "linears_merged": linears},
                                         changed=merged_groups > 0)
