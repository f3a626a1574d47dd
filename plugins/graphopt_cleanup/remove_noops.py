"""remove-noops: drop nodes that hand their input through unchanged.

Why: ``torch.export`` records what the Python code did, not what it needed. A captured Hugging Face
decoder is full of nodes that compute nothing in an inference graph: ``.to(float32)`` on float32
tensors, ``_assert_tensor_metadata`` checks in front of every cast, ``dropout(p, train=False)``,
``cos * attention_scaling`` with a scaling of 1, ``arange + 0``, views to the shape the tensor
already has. Each one costs a kernel launch in a torch program, a node in ONNX, and a pattern that
fusion passes must learn to look through. Removing them first keeps every later pass simpler::

    %to   = aten.to(%x, float32)            # %x: f32[2,8,64]
    %mul  = aten.mul(%to, 1)
    %view = aten.view(%mul, [2, 8, 64])
    %y    = aten.linear(%view, %w)          →   %y = aten.linear(%x, %w)

Every rule is exact: the replacement has the same values, dtype, shape and device, and the same
strides wherever a user could notice them (``view`` needs its input's strides, so ``contiguous``
is kept in front of a ``view`` of a transposed tensor). Shapes are compared on the FakeTensor
``meta["val"]`` that capture leaves on every node; a symbolic dim equals another only when both
print as the same expression, so nothing here adds a guard on a dynamic dim.

Verification is nevertheless the fp64 rule (``reference()``), not ``exact()``: a no-op that goes
changes which tensor (strides in size-1 dims, another buffer) the next kernel reads, and a GEMM or
reduction may then take another code path that sums in another order (seen: 4.5e-8 on MiniLM at
batch 1). Bit-identical results, the usual case, pass as such and the report says so.

Two caveats, both accepted by the fp64 rule and by every inference compiler (inductor's
``remove_no_ops`` does the same): ``x + 0`` turns ``-0.0`` into ``+0.0`` and dropping it gives back
``-0.0`` (the two compare equal); and dropping ``clone`` hands users an alias of the input instead of
a copy, which is only safe because captured inference graphs are functional (no in-place ops;
nodes that mutate their inputs are never touched).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.fx import ASSERT_OPS, arg, packet, tensor_val
from graphopt.ir import GraphIR, op_name
from graphopt.verify import reference

log = logging.getLogger(__name__)

aten = torch.ops.aten
OpOverload = torch._ops.OpOverload  # the public type of ``aten.add.Tensor``; no public module has it

# ASSERT_OPS (graphopt.fx): nodes that only check something and return nothing (no users), erased
# outright. Dead-code elimination keeps them (they count as side effects); removing them is this
# pass's decision.

ERASE = object()
"""A rule's answer for nodes with no value to forward (assertions): erase the node."""


# -- reading nodes -----------------------------------------------------------------------------
def same_sizes(a: Any, b: Any) -> bool:
    """Equal shapes (or strides), where a symbolic dim matches only an identical expression."""
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def same_type(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.device == b.device and a.layout == b.layout


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and same strides (ignoring size-1 dims, whose stride never addresses anything)."""
    if not same_sizes(a.shape, b.shape):
        return False
    if a.layout != torch.strided or b.layout != torch.strided:
        return a.layout == b.layout
    sa = [s for s, n in zip(a.stride(), a.shape) if str(n) != "1"]
    sb = [s for s, n in zip(b.stride(), b.shape) if str(n) != "1"]
    return same_sizes(sa, sb)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, device, shape and strides: ``b`` can stand in for ``a`` in every respect."""
    return same_type(a, b) and same_strides(a, b)


# Users that only move data: the same values from any input layout. When their output layout is
# unchanged too, what feeds them may change its strides without anyone noticing.
_RESHAPES = (aten.reshape, aten.view)


def _users_see_same_layout(node: torch.fx.Node, src: torch.Tensor) -> bool:
    """True if every user of ``node`` would give the same values *and* strides when fed ``src``
    (``node``'s input, other strides) instead of ``node``. Static shapes only."""
    for user in node.users:
        out = tensor_val(user)
        if packet(user) not in _RESHAPES or out is None or user.args[0] is not node:
            return False
        if any(isinstance(s, torch.SymInt) for s in (*src.shape, *src.stride(), *out.shape)):
            return False
        probe = torch.empty_strided(tuple(src.shape), tuple(src.stride()), dtype=src.dtype, device="meta")
        try:  # view() fails where the strides do not allow it; reshape() copies instead
            moved = (probe.view if packet(user) is aten.view else probe.reshape)(tuple(out.shape))
        except RuntimeError:
            return False
        if not same_strides(moved, out):
            return False
    return True


def _scalar(x: Any) -> bool:
    return type(x) in (int, float, bool)


# -- rules: node -> replacement node, ERASE, or None (no match) ---------------------------------
def _input(node: torch.fx.Node) -> torch.fx.Node | None:
    # alias(x) -> x
    src = node.args[0] if node.args else None
    return src if isinstance(src, torch.fx.Node) else None


def _same_type_copy(node: torch.fx.Node) -> torch.fx.Node | None:
    # x.to(x.dtype) -> x ; x.contiguous() -> x when x is contiguous already
    src, into, out = _input(node), tensor_val(_input(node)), tensor_val(node)
    if into is None or out is None:
        return None
    if same_layout(into, out):
        return src
    if same_type(into, out) and same_sizes(into.shape, out.shape) and _users_see_same_layout(node, into):
        return src  # contiguous(transpose(x)) -> transpose(x) when only a reshape reads it
    return None


def _inference_dropout(node: torch.fx.Node) -> torch.fx.Node | None:
    # dropout(x, p, train=False) -> x
    return _input(node) if arg(node, 2, "train") is False and _same_value_type(node) else None


def _same_value_type(node: torch.fx.Node) -> bool:
    into, out = tensor_val(_input(node)), tensor_val(node)
    return into is not None and out is not None and same_layout(into, out)


def _same_shape(node: torch.fx.Node) -> torch.fx.Node | None:
    # x.view(x.shape) -> x ; x.reshape(x.shape) -> x ; x.expand(x.shape) -> x
    return _input(node) if _same_value_type(node) else None


def _full_slice(node: torch.fx.Node) -> torch.fx.Node | None:
    # x[0:] -> x ; x[:, 0:size:1] -> x
    start, step = arg(node, 2, "start"), arg(node, 4, "step", 1)
    if start not in (None, 0) or step not in (None, 1):
        return None
    return _input(node) if _same_value_type(node) else None


def _scalar_identity(neutral: int) -> Callable[[torch.fx.Node], torch.fx.Node | None]:
    def rule(node: torch.fx.Node) -> torch.fx.Node | None:
        other = arg(node, 1, "other", node.kwargs.get("exponent"))
        if not _scalar(other) or other != neutral or node.kwargs.get("rounding_mode") is not None:
            return None
        if packet(node) is aten.div and len(node.args) > 2:
            return None  # div(x, 1, rounding_mode="floor") rounds
        # same dtype and shape: no type promotion (int * 1.0) and no broadcast
        return _input(node) if _same_value_type(node) else None
    return rule


def _double_transpose(node: torch.fx.Node) -> torch.fx.Node | None:
    # x.transpose(a, b).transpose(a, b) -> x ; x.t().t() -> x
    inner = _input(node)
    if inner is None or packet(inner) is not packet(node):
        return None
    src, out = _input(inner), tensor_val(node)
    into = tensor_val(src)
    if into is None or out is None:
        return None
    rank = max(out.dim(), 1)
    if len({frozenset(d % rank for d in n.args[1:3]) for n in (node, inner)}) != 1:
        return None  # transpose(transpose(x, 0, 1), 1, 2) moves dims
    return src if same_layout(into, out) else None


def _assertion(node: torch.fx.Node) -> object | None:
    # _assert_tensor_metadata(x, dtype=...) -> (nothing)
    return ERASE if not node.users else None


RULES: list[tuple[tuple[Any, ...], Callable[[torch.fx.Node], Any]]] = [
    ((aten.alias, aten.detach, aten.lift_fresh_copy), _input),             # alias(x) -> x
    ((aten.clone, aten.contiguous, aten.to, aten._to_copy), _same_type_copy),  # x.to(x.dtype) -> x
    ((aten.dropout, aten.feature_dropout, aten.alpha_dropout), _inference_dropout),  # dropout(x, train=False) -> x
    ((aten.view, aten.reshape, aten.expand, aten._unsafe_view), _same_shape),  # x.view(x.shape) -> x
    ((aten.slice,), _full_slice),                                          # x[0:] -> x
    ((aten.mul, aten.div, aten.pow), _scalar_identity(1)),                 # x*1 -> x ; x/1 -> x ; x**1 -> x
    ((aten.add, aten.sub), _scalar_identity(0)),                           # x+0 -> x ; x-0 -> x
    ((aten.transpose, aten.t), _double_transpose),                         # x.t().t() -> x
    (tuple(ASSERT_OPS), _assertion),                                       # assert(...) -> (nothing)
]

_RULE_BY_OP = {op: rule for ops, rule in RULES for op in ops}


class RemoveNoops(Pass):
    """Remove nodes that return their input unchanged (casts to the same dtype, x*1, asserts, ...)."""

    name = "remove-noops"
    verification = reference()
    fixpoint = True

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        removed: Counter[str] = Counter()
        for node in list(ir.graph.nodes):
            rule = _RULE_BY_OP.get(packet(node))
            if rule is None or (packet(node) not in ASSERT_OPS and node.is_impure(impure_random=False)):
                continue  # .out overloads and in-place forms mutate: never drop them
            replacement = rule(node)
            if replacement is None:
                continue
            op = op_name(node)
            if not ctx.should_rewrite(f"remove {node.name} ({op})"):
                continue
            if replacement is not ERASE:
                node.replace_all_uses_with(replacement)
            ir.graph.erase_node(node)
            removed[op] += 1
        stats: dict[str, Any] = {"removed": sum(removed.values())}
        if removed:
            stats["removed_by_op"] = dict(removed)
            ir.recompile()
            log.debug("remove-noops: %s", dict(removed))
        return PassResult(ir, bool(removed), stats)
