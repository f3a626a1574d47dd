"""fold-constants: compute once, at compile time, what does not depend on the inputs.

Why: a captured model recomputes on every call whatever its Python code computes on every call:
``weight.t()`` of layers that store their weight the other way round, scale-and-cast chains on
small constants, and for static shapes the whole causal mask and the rotary cos/sin tables of a
Llama (``arange`` → ``unsqueeze`` → ``mul inv_freq`` → ``cat`` → ``cos``). Folding evaluates such
subgraphs once and stores the result as a buffer::

    %w   = get_attr[weight]
    %wt  = aten.t(%w)
    %y   = aten.mm(%x, %wt)             →   %c = get_attr[_folded_0]     # = weight.t()
                                            %y = aten.mm(%x, %c)
    %pos = aten.arange(8)
    %p2  = aten.unsqueeze(%pos, 0)
    %m   = aten.le(%p2, %q)             →   %m = aten.le(%_folded_1, %q)  # [[0..7]]

A node folds when every input is a constant (a parameter, buffer or folded node, so it has no
placeholder ancestor), it is pure and not random, none of its arguments is symbolic, and its value
is a tensor (a tuple works as an intermediate, e.g. ``split`` read through ``getitem``). Only the
frontier of each constant subgraph (constant nodes read by something that is not constant) becomes
a new ``get_attr``; the rest of the subgraph is then erased, and parameters nothing reads any more
are dropped by ``ir.recompile()``.

Folding must not turn a small weight into a large one: a node whose value is more than twice the
bytes of its constant inputs is left alone unless it is under 64 KiB, so broadcasts
(``expand``, ``full``) stay lazy, and so does the dequantization of a large int8 weight (folding it
would undo the compression weight-only quantization is for), while the Llama mask and rotary tables
fold. Equal folded values share one buffer. Values are computed by the same ATen kernels the graph
would run, and stored with the same strides, so outputs are normally bit-identical (the report then
says so). Verification is the fp64 rule (``reference()``) all the same: a folded buffer is a new
allocation that the next kernel may read along another code path, and the pass is checked against
the original, which an earlier pass (remove-noops) may already differ from in the last bits.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.fx import ASSERT_OPS, attribute, packet
from graphopt.ir import GraphIR, op_name
from graphopt.verify import reference

from .remove_noops import OpOverload

log = logging.getLogger(__name__)

SMALL_BYTES = 64 * 1024   # results under this always fold
GROWTH_LIMIT = 2          # larger results fold only if at most this many times their inputs' bytes
PREFIX = "_folded_"

aten = torch.ops.aten
# Uninitialized memory: folding would store arbitrary bytes in the artifact (and break
# reproducible builds); such tensors are always overwritten later anyway.
UNINITIALIZED = frozenset({aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided,
                           aten.new_empty_strided, aten.empty_permuted})


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _symbolic(x: Any) -> bool:
    """True for SymInts and for tensors whose shape has a symbolic dim."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(x, torch.Tensor):
        return any(isinstance(s, torch.SymInt) for s in x.shape)
    if isinstance(x, (tuple, list)):
        return any(_symbolic(v) for v in x)
    return False


def _mutated(node: torch.fx.Node) -> bool:
    """A user with side effects (an in-place op, ``.out=``) may write into this value; asserts only
    read it."""
    return any(packet(u) not in ASSERT_OPS and u.is_impure(impure_random=False) for u in node.users)


def _foldable(node: torch.fx.Node, values: dict[torch.fx.Node, Any]) -> bool:
    if node.op != "call_function":
        return False
    if not (isinstance(node.target, OpOverload) or node.target is operator.getitem):
        return False  # higher-order ops (cond, while_loop) and Python callables stay
    if packet(node) in UNINITIALIZED:
        return False
    if node.is_impure() or _mutated(node):
        return False  # random ops, side effects, values written in place
    if not all(n in values for n in node.all_input_nodes):
        return False  # reads a placeholder (directly or through a non-constant node)
    return not _symbolic(node.args) and not _symbolic(node.kwargs) and not _symbolic(node.meta.get("val"))


def _evaluate(node: torch.fx.Node, values: dict[torch.fx.Node, Any]) -> Any:
    args = torch.fx.node.map_arg(node.args, values.__getitem__)
    kwargs = torch.fx.node.map_arg(node.kwargs, values.__getitem__)
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _fingerprint(value: torch.Tensor) -> tuple | None:
    """Identity of a value's bits, so equal folded values share one buffer (a Llama builds the
    same rotary cos/sin table in every layer)."""
    try:
        raw = value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):  # sparse, quantized: never shared
        return None
    return (value.dtype, str(value.device), tuple(value.shape), value.stride(),
            hashlib.blake2b(raw.data).hexdigest())


def _unique_name(gm: torch.fx.GraphModule) -> str:
    i = 0
    while hasattr(gm, f"{PREFIX}{i}"):
        i += 1
    return f"{PREFIX}{i}"


class FoldConstants(Pass):
    """Evaluate nodes that depend only on parameters and constants once; store them as buffers."""

    name = "fold-constants"
    weight_memory = 0.1  # folded constants (transposed weights, tables)
    verification = reference()

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        gm, graph = ir.graph_module, ir.graph
        values: dict[torch.fx.Node, Any] = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                value = attribute(gm, node.target)
                if isinstance(value, torch.Tensor):
                    values[node] = value
            elif _foldable(node, values):
                try:
                    value = _evaluate(node, values)
                except Exception as e:  # an op that cannot run here (another device): leave it
                    log.debug("fold-constants: cannot evaluate %s: %s", node.format_node(), e)
                    continue
                if isinstance(value, torch.Tensor) and value.device.type == "meta":
                    continue  # weights not loaded (a meta-device model): nothing to compute
                inputs = sum(_nbytes(values[n]) for n in node.all_input_nodes)
                size = _nbytes(value)
                if size >= SMALL_BYTES and size > GROWTH_LIMIT * inputs:
                    continue  # materializing a broadcast: keep it lazy
                values[node] = value

        used_before = {n for n in values if n.users}
        buffers: dict[tuple, torch.fx.Node] = {}  # fingerprint -> get_attr of a folded buffer
        folded, bytes_added = 0, 0
        for node in list(values):
            value = values[node]
            if node.op == "get_attr" or not isinstance(value, torch.Tensor):
                continue
            if all(u in values for u in node.users):
                continue  # inside a constant subgraph: its frontier replaces it
            if not ctx.should_rewrite(f"fold {node.name} ({op_name(node)})"):
                continue
            key = _fingerprint(value)
            const = buffers.get(key) if key is not None else None
            if const is None:
                name = _unique_name(gm)
                # clone(): own storage (never alias a parameter), same strides as computed
                gm.register_buffer(name, value.detach().clone())
                with graph.inserting_before(node):
                    const = graph.get_attr(name)
                if "val" in node.meta:
                    const.meta["val"] = node.meta["val"]
                values[const] = getattr(gm, name)
                bytes_added += _nbytes(value)
                if key is not None:
                    buffers[key] = const
            node.replace_all_uses_with(const)
            folded += 1

        # Erase what the new buffers replaced: constant nodes (and weights) nobody reads any more.
        for node in reversed(list(values)):
            if node in used_before and not node.users:
                graph.erase_node(node)
        return PassResult.after_rewrites(ir, {"folded": folded, "bytes_added": bytes_added}, changed=folded > 0)
