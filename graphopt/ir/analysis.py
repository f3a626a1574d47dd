"""Graph analyses on the networkx view of a GraphIR.

These are the questions passes and reports ask: which nodes can reach an output (dead-code
elimination), how deep the graph is (critical path), and how many activation bytes are alive at
worst during a run in node order (a memory estimate shown in the report).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx
import torch

from graphopt.ir.graph_ir import node_dtype, node_shape

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR


def live_nodes(ir: GraphIR, *, keep: set[str] | None = None) -> set[str]:
    """Names of the nodes the outputs depend on (plus placeholders and ``keep``)."""
    g = ir.nx()
    out = ir.output_node().name
    live = nx.ancestors(g, out) | {out}
    live |= {n.name for n in ir.placeholders()}
    for name in keep or ():
        live |= nx.ancestors(g, name) | {name}
    return live


def critical_path_length(ir: GraphIR) -> int:
    """Number of compute nodes on the longest input → output chain."""
    g = ir.nx()
    weights = {n: (1 if d["op"] in ("call_function", "call_method", "call_module") else 0)
               for n, d in g.nodes(data=True)}
    best: dict[str, int] = {}
    for n in nx.topological_sort(g):
        best[n] = weights[n] + max((best[p] for p in g.predecessors(n)), default=0)
    return max(best.values(), default=0)


def _nbytes(node: torch.fx.Node) -> int:
    shape = node_shape(node)
    dt = node_dtype(node)
    if shape is None or dt is None or any(isinstance(s, str) for s in shape):
        return 0
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=dt).element_size()


def peak_activation_bytes(ir: GraphIR) -> int:
    """Largest sum of live intermediate tensors while executing in node order (static dims only;
    symbolic dims count as unknown and are skipped)."""
    g = ir.nx()
    order = [n for n in ir.graph.nodes]
    position = {n.name: i for i, n in enumerate(order)}
    last_use = {n.name: max((position[s] for s in g.successors(n.name)), default=position[n.name])
                for n in order}
    live = 0
    peak = 0
    dying: dict[int, int] = {}
    for i, n in enumerate(order):
        if n.op in ("call_function", "call_method", "call_module"):
            size = _nbytes(n)
            live += size
            dying[last_use[n.name]] = dying.get(last_use[n.name], 0) + size
        peak = max(peak, live)
        live -= dying.pop(i, 0)
    return peak
