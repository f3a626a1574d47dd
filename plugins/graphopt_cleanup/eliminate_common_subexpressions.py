"""eliminate-common-subexpressions: compute each distinct value once.

Why: model code recomputes what it computed before, and capture keeps every copy. A Hugging Face
Llama builds ``arange(seq) + 0`` three times (positions, mask rows, mask columns) and unsqueezes
each the same way, and rewrites by other passes (no-op removal, fusions) turn nodes that looked
different into identical ones. Two nodes that run the same op on the same inputs with the same
arguments hold the same value, so the later one is dropped and its users read the first::

    %a = aten.arange(8)
    %b = aten.arange(8)                 →   %a = aten.arange(8)
    %m = aten.le(%a, %b)                    %m = aten.le(%a, %a)

The key of a node is (op, arguments, keyword arguments) where node arguments are already their
representatives (the graph is walked in order, and duplicates are replaced as they are found) and
Python scalars keep their type (``x + 1`` and ``x + 1.0`` differ for integer ``x``) and sign
(``-0.0`` is not ``0.0``). ``get_attr`` nodes reading the same tensor merge too.

Never merged: random ops (two ``rand_like`` are two samples), ops with side effects or that
mutate their inputs, values some user writes into in place, assertions, placeholders, Python
callables other than ``operator`` functions and higher-order ops.

Merging computes nothing new, so outputs are bit-identical to the graph before the pass; the check
is the fp64 rule (``reference()``) because it compares with the ORIGINAL, which an earlier pass
(remove-noops, a fusion) may already differ from in the last bits. Bit-identical results pass as
such, without an fp64 run, and the report says so.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.fx import ASSERT_OPS, attribute, packet
from graphopt.ir import GraphIR, op_name
from graphopt.verify import reference

from .remove_noops import OpOverload


class _Unhashable(Exception):
    """An argument with no stable identity (a tensor constant, a SymInt): the node is left alone."""


_ATOMS = (str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _freeze(a: Any) -> Any:
    """A hashable key for an argument that equals another key only for the same value and type."""
    if isinstance(a, torch.fx.Node):
        return a  # hashed by identity: the representative itself
    if isinstance(a, bool | int | float):  # bool first: True == 1 == 1.0 in Python
        return (type(a).__name__, repr(a))
    if isinstance(a, _ATOMS):
        return (type(a).__name__, a)
    if isinstance(a, (tuple, list)):
        return (type(a).__name__, tuple(_freeze(x) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((str(k), _freeze(v)) for k, v in a.items())))
    if isinstance(a, slice):
        return ("slice", _freeze(a.start), _freeze(a.stop), _freeze(a.step))
    raise _Unhashable(type(a).__name__)


def _is_candidate(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    pure_python = getattr(target, "__module__", None) in ("operator", "_operator")
    if not (isinstance(target, OpOverload) or pure_python):
        return False
    if packet(node) in ASSERT_OPS or node.is_impure():
        return False  # random (rand_like, dropout), side effects, in-place and .out forms
    # a user that writes into the value (in-place, .out=) makes two equal nodes two buffers
    return not any(packet(u) not in ASSERT_OPS and u.is_impure(impure_random=False) for u in node.users)


def _key(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Any:
    if node.op == "get_attr":
        value = attribute(gm, str(node.target))
        # the same tensor under two names (tied weights) is one value
        return ("get_attr", id(value)) if isinstance(value, torch.Tensor) else ("get_attr", node.target)
    if not _is_candidate(node):
        return None
    try:
        return (node.target, _freeze(node.args), _freeze(node.kwargs))
    except _Unhashable:
        return None


class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same value (same op, same inputs, same arguments)."""

    name = "eliminate-common-subexpressions"
    verification = reference()

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        seen: dict[Any, torch.fx.Node] = {}
        merged = 0
        for node in list(ir.graph.nodes):
            key = _key(node, ir.graph_module)
            if key is None:
                continue
            rep = seen.setdefault(key, node)
            if rep is node:
                continue
            if not ctx.should_rewrite(f"merge {node.name} into {rep.name} ({op_name(node)})"):
                continue
            node.replace_all_uses_with(rep)
            ir.graph.erase_node(node)
            merged += 1
        return PassResult.after_rewrites(ir, {"merged": merged})
