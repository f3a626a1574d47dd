"""eliminate-dead-code: erase nodes no output depends on.

Why: every rewrite leaves something behind: a fusion leaves the ops it replaced, constant folding
the weights it pre-transposed, a quantizer the float weights, and captures keep buffers the model
registered but never reads in this configuration (a Llama's ``rotary_emb.original_inv_freq``).
Dead nodes cost nothing to run in eager torch, but they keep parameters alive (the artifact
carries them) and every later pass and backend has to step over them::

    %w  = get_attr[unused_buffer]
    %e  = aten.exp(%x)                  →   %y = aten.relu(%x)
    %y  = aten.relu(%x)                     return (%y,)
    return (%y,)

Liveness is reachability on the networkx view (:func:`graphopt.ir.analysis.live_nodes`): a node is
live if the output node is reachable from it, or it is a placeholder (the calling convention
never changes), or it has side effects, or a node with side effects reads it. Side effects are what
``torch.fx`` calls impure: mutations, random ops (dropping one would shift the random stream seen
by later ones) and assertions (``_assert_tensor_metadata`` and friends are ``remove-noops``' to
drop, not this pass's). Dead nodes are erased users-first (reverse topological order), and
``ir.recompile()`` then drops the parameters only dead ``get_attr`` nodes read.
"""

from __future__ import annotations

import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.fx import live_nodes
from graphopt.ir import GraphIR, op_name
from graphopt.verify import exact


def _has_side_effects(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module") and node.is_impure()


class EliminateDeadCode(Pass):
    """Erase nodes and unused parameters that no graph output depends on."""

    name = "eliminate-dead-code"
    verification = exact()

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        keep = {n.name for n in ir.graph.nodes if _has_side_effects(n)}
        live = live_nodes(ir, keep=keep)
        removed = 0
        for node in reversed(list(ir.graph.nodes)):  # graph order is topological: users go first
            if node.name in live or node.users:
                continue  # node.users: a dead user the rewrite limit kept
            if not ctx.should_rewrite(f"erase {node.name} ({op_name(node)})"):
                continue
            ir.graph.erase_node(node)
            removed += 1
        return PassResult.after_rewrites(ir, {"removed": removed})
