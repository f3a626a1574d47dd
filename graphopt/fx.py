"""The plugin author's API: what a pass needs to read and rewrite a captured graph.

Every name in ``__all__`` is public and stable (changes are additive); the built-in plugins and
the sample plugin use these, so a third-party pass needs nothing else from graphopt's modules.

========================================  ==========================================================
Reading nodes
``packet(n)`` / ``is_op(n, *ops)``        the op a call node runs, overload-independent
``arg(n, i, name)``                       argument ``name`` (positional index ``i`` or keyword)
``tensor_val(x)``, ``dims``, ``rank``,    the FakeTensor capture left on ``x``, its shape as
``dtype``                                 strings (symbolic dims compare by name), rank, dtype
``ASSERT_OPS``                            checks that only read their input (never keep it alive)
``real_users(n)`` / ``only_user(n)``      users that consume the value (not assertions)
Weights and constants
``constant(node)``                        the tensor a ``get_attr`` node reads, else ``None``
``attribute(gm, target)``                 the object at a dotted attribute path, else ``None``
``constant_value(x)``                     the value of ``x`` if computed from constants only through
                                          ``CONSTANT_OPS`` (``W.t()``, views, lifted scalars), a copy
``constant_scalar(x)``                    a Python number or a one-element constant, as ``float``
``add_constant(gm, hint, t)``             register ``t`` under a fresh name made from ``hint``;
                                          returns the name (``graph.get_attr(name)`` reads it)
``replace_attribute(gm, target, t)``      put ``t`` behind an existing name (copy-on-write: never
                                          write into the old tensor, other graphs share it)
Rewriting
``copy_source_meta(src, dst)``            carry the model's source location to a new node
``erase_dead(graph, nodes)``              erase nodes nothing reads any more, and what only they read
``live_nodes(ir)``                        names of the nodes the outputs depend on
Capture
``decoder_requirements(...)``             batch and sequence dynamic on token ids and mask: what a
                                          decoder pass returns from ``capture_requirements``
Graph metadata
``register_meta_key(name, type, ...)``    declare a ``GraphIR.meta`` key a pass hands on (checked
                                          after every pass; graphopt.ir.meta lists the built-in ones)
Verification and calibration
``make_verification_inputs(ir)``          the example plus fresh random input sets (never zeros)
``record_values(ir, inputs)``             every node's value on ``inputs`` (activation statistics)
``load_calibration(source, ir)``          calibration sets from text, ``.npz`` or an iterable
``max_abs_error``, ``zero_padding``       comparing outputs; padded positions zeroed
========================================  ==========================================================

Custom ops a pass inserts are lowered by the plugin's ``graphopt_register_onnx_translations``
hook (README: Writing a pass).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from graphopt.calibration import CalibrationError, fingerprint, load_calibration
from graphopt.capture import decoder_requirements
from graphopt.ir.analysis import live_nodes
from graphopt.ir.meta import register_key as register_meta_key
from graphopt.ir.nodes import arg, dims, dtype, is_op, packet, rank, tensor_val
from graphopt.verify.policies import max_abs_error, zero_padding
from graphopt.verify.verifier import make_verification_inputs, record_values

__all__ = [
    "ASSERT_OPS", "CONSTANT_OPS", "CalibrationError", "add_constant", "arg", "attribute", "constant",
    "constant_scalar", "constant_value", "copy_source_meta", "decoder_requirements",
    "dims", "dtype", "erase_dead", "fingerprint", "is_op", "live_nodes", "load_calibration",
    "make_verification_inputs", "max_abs_error", "only_user", "packet", "rank", "real_users",
    "record_values", "register_meta_key", "replace_attribute", "tensor_val", "zero_padding",
]

_aten = torch.ops.aten

#: Checks that return nothing and only read their input; they never keep a value alive.
ASSERT_OPS = frozenset({
    _aten._assert_tensor_metadata,
    _aten._assert_scalar,
    _aten._assert_async,
    _aten.sym_constrain_range_for_size,
    _aten.sym_constrain_range,
})


def real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that consume the value (assertions only read its metadata)."""
    return [u for u in node.users if packet(u) not in ASSERT_OPS]


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The single real user of ``node``, or ``None``."""
    users = real_users(node)
    return users[0] if len(users) == 1 else None


def attribute(gm: torch.nn.Module, target: str) -> Any:
    """The object at the dotted attribute path ``target`` of ``gm`` (``"model.layers.0.weight"``),
    or ``None`` when a part is missing."""
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def constant(node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (a parameter, buffer or folded constant), else ``None``.
    Read it, never write into it: the original graph and other snapshots share it."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = attribute(node.graph.owning_module, str(node.target))
    return value if isinstance(value, torch.Tensor) else None


#: Ops whose result is a constant when their inputs are (how torch.export spells ``W.T``, lifted
#: scalar tensors, views and copies): :func:`constant_value` evaluates them. Overload packets.
CONSTANT_OPS = frozenset({
    _aten.t, _aten.numpy_T, _aten.transpose, _aten.permute, _aten.view, _aten.reshape, _aten._unsafe_view,
    _aten.contiguous, _aten.clone, _aten.alias, _aten.detach, _aten.lift_fresh_copy,
})


def constant_value(x: Any, *, depth: int = 8) -> torch.Tensor | None:
    """The value of ``x`` when it is computed from weights and constants only, through
    :data:`CONSTANT_OPS` (at most ``depth`` of them): a new tensor, never a view of a weight (write
    into it freely). ``None`` for anything that reads an input."""
    if not isinstance(x, torch.fx.Node) or depth < 0:
        return None
    if x.op == "get_attr":
        value = constant(x)
        return None if value is None else value.detach().clone()
    if x.op != "call_function" or packet(x) not in CONSTANT_OPS:
        return None
    env = {}
    for inp in x.all_input_nodes:
        env[inp] = constant_value(inp, depth=depth - 1)
        if env[inp] is None:
            return None
    with torch.no_grad():
        out = x.target(*torch.fx.node.map_arg(x.args, env.__getitem__),
                       **torch.fx.node.map_arg(x.kwargs, env.__getitem__))
    return out.clone() if isinstance(out, torch.Tensor) else None


def constant_scalar(x: Any) -> float | None:
    """``x`` as a float when it is a compile-time scalar: a Python number (not a bool), or a
    one-element real constant tensor (:func:`constant_value`); else ``None``."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    t = constant_value(x)
    if t is None or t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        return None
    return float(t.reshape(()).double().item())


def add_constant(gm: torch.fx.GraphModule, hint: str, value: torch.Tensor, *, parameter: bool = False) -> str:
    """Register ``value`` on ``gm`` under a fresh top-level name made from ``hint`` (dots become
    underscores; ``_1``, ``_2``... when taken) and return the name. A parameter (without grad)
    when ``parameter`` is true, else a buffer."""
    stem = str(hint).replace(".", "_").strip("_") or "constant"
    name, k = stem, 1
    while hasattr(gm, name):
        name, k = f"{stem}_{k}", k + 1
    if parameter:
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    else:
        gm.register_buffer(name, value)
    return name


def replace_attribute(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Put ``value`` behind the existing attribute ``target``, of the same kind (parameter without
    grad, buffer, plain tensor). The old tensor is left as it was: graphs that share it keep it."""
    *parents, leaf = str(target).split(".")
    owner: Any = gm
    for p in parents:
        owner = getattr(owner, p)
    old = getattr(owner, leaf)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))
    elif isinstance(owner, torch.nn.Module) and leaf in owner._buffers:  # noqa: SLF001 - nn.Module's own table
        owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)  # noqa: SLF001
    else:
        setattr(owner, leaf, value)


def copy_source_meta(src: torch.fx.Node, dst: torch.fx.Node) -> None:
    """Carry the model source location over, so errors and reports point at the model's code."""
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def erase_dead(graph: torch.fx.Graph, nodes: Any) -> int:
    """Erase ``nodes`` that nothing reads any more (assertions on them included), then whatever only
    they read, up the graph. Placeholders, impure nodes and nodes still in use stay. Returns how many
    nodes were erased."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    work = {n for n in nodes if n in order}
    erased = 0
    while work:
        node = max(work, key=order.__getitem__)  # users before what they read
        work.discard(node)
        if node.op in ("placeholder", "output") or node not in order:
            continue
        for user in list(node.users):
            if packet(user) in ASSERT_OPS and not user.users:
                graph.erase_node(user)
                order.pop(user, None)
        if node.users or (node.op == "call_function" and node.is_impure(impure_random=False)):
            continue  # still read, or has side effects (a dead random op such as dropout may go)
        inputs = node.all_input_nodes
        graph.erase_node(node)
        order.pop(node, None)
        erased += 1
        work.update(n for n in inputs if n in order)
    return erased
