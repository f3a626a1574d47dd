"""Matching helpers shared by the fusion passes: read how values flow through a captured ATen graph.

Every fusion pass asks the same questions of a node: which op is it (whatever the overload), what
are its arguments (positional or keyword), is an argument a constant scalar, does anything else
read this value, and what does it compute once the no-ops around it are looked through. This
module answers them, so each pass reads as a table of small matchers (a matcher returns ``None``
for "no match"), never as hand-walked ``node.args[0].args[1]`` chains.

The API is stable: other passes import from here, and changes are additive only.

========================  ==========================================================================
``packet(n)``             the op a call node runs, overload-independent (``aten.add``)
``is_op(n, *ops)``        ``packet(n) in ops``
``arg(n, i, name)``       argument ``name`` (positional index ``i`` or keyword)
``tensor_val(x)``         the FakeTensor capture left on ``x`` (``None`` if none)
``dims(x)`` / ``rank``    shape as strings (``["s0", "4", "16"]``: symbolic dims compare by name)
``static_int(d)``         a dim as ``int`` when it is not symbolic
``constant_tensor(x)``    the value of a ``get_attr`` (parameter, buffer or folded constant)
``constant_scalar(x)``    a Python number, or a one-element constant tensor, as ``float``
``real_users(n)``         users that are not assertions (``_assert_tensor_metadata`` ...)
``only_user(n)``          the single real user, or ``None``
``is_noop(n)``            ``n`` returns its input unchanged
``skip_noops(x)``         look back through value-preserving ops (eval dropout, clone, same-dtype
                          casts, ...)
``scaled(n)``             ``x * c``, ``c * x``, ``x / c`` with a constant scalar ``c`` → ``(x, factor)``
``peel_scales(x)``        every such factor on the way up → ``(x, product, nodes)``
``permutation(n)``        ``transpose`` / ``permute`` → ``(input, perm)``
``unrepeat_heads(n)``     ``repeat_kv`` (unsqueeze → expand → reshape) or ``repeat_interleave`` on
                          dim 1 → ``(input, n_rep)``
``infer_meta(n)``         fill ``meta["val"]`` of a node a pass created (FakeTensor propagation)
``copy_source_meta``      carry ``stack_trace`` / ``nn_module_stack`` over to a replacement node
``erase_dead(graph, ns)`` erase nodes nothing reads any more, and what only they read
``erased_by(graph, ns)``  the same, returning the erased nodes
``operands(n, op)``       both operand orders of a commutative ``add`` / ``mul``
``same_value(a, b)``      same node, or the same pure op on the same values (un-CSE'd copies)
========================  ==========================================================================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from graphopt.fx import (  # noqa: F401 (re-exported: the fusion passes read them from here)
    ASSERT_OPS,
    arg,
    copy_source_meta,
    dims,
    dtype,
    erase_dead,
    is_op,
    only_user,
    packet,
    rank,
    real_users,
    tensor_val,
)
from graphopt.fx import constant as constant_tensor

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: Casts: value-preserving when the dtype does not change.
CAST_OPS = frozenset({aten.to, aten._to_copy, aten.type_as})

#: Ops that hand their input through unchanged (given the checks in :func:`is_noop`).
_COPY_OPS = frozenset({aten.alias, aten.detach, aten.detach_, aten.clone, aten.contiguous, aten.lift_fresh_copy})
_DROPOUT_OPS = frozenset({aten.dropout, aten.feature_dropout, aten.alpha_dropout})
_RESHAPE_OPS = frozenset({aten.view, aten.reshape, aten._unsafe_view, aten.expand})

#: ``x[..., None, ...]`` and full slices that torch.export records around ``repeat_kv``.
_UNSQUEEZE_OPS = frozenset({aten.unsqueeze})


# -- reading nodes -----------------------------------------------------------------------------
# packet, is_op, arg, tensor_val, dims, rank, dtype: shared with every pass (graphopt.ir.nodes)


def static_int(d: Any) -> int | None:
    """A dim (int, SymInt or its string) as ``int`` when it is a plain number, else ``None``."""
    if isinstance(d, bool):
        return None
    if isinstance(d, int):
        return d
    try:
        return int(str(d))
    except ValueError:
        return None


def constant_scalar(x: Any) -> float | None:
    """``x`` as a float when it is a compile-time scalar: a Python number, or a one-element constant
    tensor (looked up through copies such as ``lift_fresh_copy``). ``None`` otherwise: symbolic
    values and tensors computed from inputs are not constants."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, torch.fx.Node):
        return None
    x = skip_noops(x)
    if is_op(x, aten.scalar_tensor):
        return constant_scalar(x.args[0])
    t = constant_tensor(x)
    if t is None or t.numel() != 1 or t.is_complex():
        return None
    return float(t.detach().reshape(()).double().item())


# -- looking through no-ops ------------------------------------------------------------------
def _same_tensor_type(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is not None and b is not None and a.dtype == b.dtype and a.device == b.device
            and [str(d) for d in a.shape] == [str(d) for d in b.shape])


def is_noop(node: Any) -> bool:
    """``node`` returns its first input unchanged: same values, dtype, shape and device (``clone``,
    eval ``dropout``, a cast or view to what the input already is)."""
    p = packet(node)
    if p is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if not _same_tensor_type(tensor_val(node.args[0]), tensor_val(node)):
        return False
    if p in _COPY_OPS or p in CAST_OPS or p in _RESHAPE_OPS:
        return True
    if p in _DROPOUT_OPS:  # dropout(x, p, train): identity in inference or with p == 0
        return arg(node, 2, "train") is False or arg(node, 1, "p") == 0
    return False


def skip_noops(x: Any) -> Any:
    """Follow ``x`` back through value-preserving ops (``clone``, eval ``dropout``, casts to the same
    dtype, views to the same shape) to the node that computed the value."""
    while isinstance(x, torch.fx.Node) and is_noop(x):
        x = x.args[0]
    return x


def noop_chain(x: torch.fx.Node) -> list[torch.fx.Node]:
    """The value-preserving nodes :func:`skip_noops` would walk through from ``x``, ``x`` first."""
    out = []
    while isinstance(x, torch.fx.Node) and is_noop(x):
        out.append(x)
        x = x.args[0]
    return out


# -- scalar factors --------------------------------------------------------------------------
def scaled(node: Any) -> tuple[torch.fx.Node, float] | None:
    """``x * c`` / ``c * x`` → ``(x, c)``; ``x / c`` → ``(x, 1/c)``, for a constant scalar ``c`` and
    no broadcast or type change (the result has ``x``'s shape and dtype)."""
    if not is_op(node, aten.mul, aten.div) or len(node.args) < 2:
        return None
    if node.kwargs.get("rounding_mode") is not None or len(node.args) > 2:
        return None
    a, b = node.args[0], node.args[1]
    if is_op(node, aten.mul) and constant_scalar(a) is not None and isinstance(b, torch.fx.Node):
        a, b = b, a
    c = constant_scalar(b)
    if c is None or not isinstance(a, torch.fx.Node) or not _same_tensor_type(tensor_val(a), tensor_val(node)):
        return None
    if is_op(node, aten.div):
        if c == 0:
            return None
        return a, 1.0 / c
    return a, c


def peel_scales(x: Any, *, single_use: bool = True) -> tuple[Any, float, list[torch.fx.Node]]:
    """Walk up through constant scalar factors (and no-ops) from ``x``.

    Returns ``(base, product of the factors, the nodes walked through)``. With ``single_use`` a
    factor is only peeled off while its node has no other reader (otherwise the scaled value is
    needed anyway, and ``x`` stays the base)."""
    factor, nodes = 1.0, []
    while isinstance(x, torch.fx.Node):
        inner = skip_noops(x)
        chain = noop_chain(x)
        hit = scaled(inner)
        if hit is None or (single_use and any(len(real_users(n)) != 1 for n in [*chain, inner])):
            break
        nodes += [*chain, inner]
        x, f = hit
        factor *= f
    return x, factor, nodes


# -- layout ----------------------------------------------------------------------------------
def permutation(node: Any) -> tuple[torch.fx.Node, list[int]] | None:
    """``transpose(x, a, b)`` / ``permute(x, perm)`` / ``t(x)`` → ``(x, perm)`` (perm normalised to
    non-negative dims)."""
    r = rank(node)
    if r is None or not isinstance(node, torch.fx.Node) or not node.args:
        return None
    src = node.args[0]
    if not isinstance(src, torch.fx.Node):
        return None
    if is_op(node, aten.transpose):
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not isinstance(a, int) or not isinstance(b, int):
            return None
        perm = list(range(r))
        perm[a % r], perm[b % r] = perm[b % r], perm[a % r]
        return src, perm
    if is_op(node, aten.permute):
        perm = arg(node, 1, "dims")
        if not isinstance(perm, (list, tuple)) or not all(isinstance(d, int) for d in perm):
            return None
        return src, [d % r for d in perm]
    if is_op(node, aten.t) and r == 2:
        return src, [1, 0]
    return None


def swapped_last_two(node: Any) -> tuple[torch.fx.Node, list[int]] | None:
    """For ``node`` = ``x`` with its last two dims swapped (``k.transpose(-2, -1)``), ``(x', perm)``
    such that ``node == x'.permute(perm)`` swapped back: when ``perm`` is the identity ``x'`` is the
    un-transposed tensor itself; otherwise ``x'.permute(perm)`` is (e.g. ``k.permute(0, 2, 3, 1)``
    of a ``[B, T, H, D]`` key gives ``x'`` = that key and ``perm`` = ``[0, 2, 1, 3]``)."""
    hit = permutation(node)
    if hit is None:
        return None
    src, perm = hit
    r = len(perm)
    swap = list(range(r))
    swap[-2], swap[-1] = swap[-1], swap[-2]
    # node = src.permute(perm); node.transpose(-2, -1) = src.permute([perm[i] for i in swap])
    return src, [perm[i] for i in swap]


# -- grouped-query attention ------------------------------------------------------------------
def unrepeat_heads(node: Any) -> tuple[torch.fx.Node, int] | None:
    """``repeat_kv(x, n)`` → ``(x, n)`` for ``x`` of shape ``[B, H, T, D]`` repeated to ``[B, H*n, T, D]``
    with head ``h`` reading ``x[:, h // n]`` (what ``enable_gqa=True`` means to
    ``scaled_dot_product_attention``). Recognises Hugging Face's ``repeat_kv``
    (``x[:, :, None].expand(B, H, n, T, D).reshape(B, H*n, T, D)``) and
    ``x.repeat_interleave(n, dim=1)``; ``x.repeat(1, n, 1, 1)`` (head ``h`` reads ``h % H``) is not
    the same thing and is not recognised."""
    out = tensor_val(node)
    if out is None or out.dim() != 4:
        return None
    node = skip_noops(node)
    if is_op(node, aten.repeat_interleave):
        src, reps, dim = node.args[0], arg(node, 1, "repeats"), arg(node, 2, "dim")
        if not isinstance(src, torch.fx.Node) or not isinstance(reps, int) or dim is None or dim % 4 != 1:
            return None
        return _checked_unrepeat(src, reps, out)
    if not is_op(node, aten.reshape, aten.view, aten._unsafe_view):
        return None
    expanded = skip_noops(node.args[0])
    if not is_op(expanded, aten.expand):
        return None
    e = dims(expanded)
    unsq = _skip_full_slices(expanded.args[0])
    if e is None or len(e) != 5 or not is_op(unsq, *_UNSQUEEZE_OPS):
        return None
    if arg(unsq, 1, "dim") not in (2, -3):
        return None
    src = _skip_full_slices(unsq.args[0])
    s = dims(src)
    n = static_int(e[2])
    if s is None or len(s) != 4 or n is None or [e[0], e[1], e[3], e[4]] != s:
        return None
    return _checked_unrepeat(src, n, out)


def _checked_unrepeat(src: torch.fx.Node, n: int, out: torch.Tensor) -> tuple[torch.fx.Node, int] | None:
    s = dims(src)
    heads = static_int(s[1]) if s is not None and len(s) == 4 else None
    o = [str(d) for d in out.shape]
    if heads is None or n < 1 or o[1] != str(heads * n) or [o[0], o[2], o[3]] != [s[0], s[2], s[3]]:
        return None
    return src, n


def _skip_full_slices(x: Any) -> Any:
    """``x[:, :]`` → ``x``: slices that keep every element (torch.export records one per ``:``)."""
    while is_op(x, aten.slice) and _full_slice(x):
        x = x.args[0]
    return skip_noops(x)


def _full_slice(node: torch.fx.Node) -> bool:
    start, step = arg(node, 2, "start"), arg(node, 4, "step", 1)
    return start in (None, 0) and step in (None, 1) and _same_tensor_type(tensor_val(node.args[0]), tensor_val(node))


# -- building and cleaning up ----------------------------------------------------------------
def infer_meta(node: torch.fx.Node) -> None:
    """Fill ``node.meta["val"]`` by running its op on the FakeTensors of its inputs (best effort: the
    pass manager re-propagates every shape after a pass anyway)."""
    vals = [tensor_val(n) for n in node.all_input_nodes]
    mode = next((getattr(v, "fake_mode", None) for v in vals if getattr(v, "fake_mode", None)), None)
    if mode is None or any(v is None for v in vals if not isinstance(v, torch.SymInt)):
        return

    def value(n: torch.fx.Node) -> Any:
        return n.meta.get("val")

    args = torch.fx.node.map_arg(node.args, value)
    kwargs = torch.fx.node.map_arg(node.kwargs, value)
    try:
        prev = mode.allow_non_fake_inputs
        mode.allow_non_fake_inputs = True
        try:
            with mode:
                node.meta["val"] = node.target(*args, **kwargs)
        finally:
            mode.allow_non_fake_inputs = prev
    except Exception as e:  # noqa: BLE001 - metadata only; the manager re-propagates
        log.debug("could not infer meta of %s: %s", node.format_node(), e)


def is_absorbing(value: float, dtype: torch.dtype = torch.float32) -> bool:
    """``s + value == value`` in ``dtype`` for every score with |s| < 2**30: ``-inf``, or a negative
    value so large that half its ulp exceeds 2**30. ``finfo(float32).min`` and ``finfo(bfloat16).min``
    qualify; ``-1e9``, ``-10000`` and ``finfo(float16).min`` (ulp 32) do not."""
    if value == -math.inf:
        return True
    if not math.isfinite(value) or value >= 0 or not dtype.is_floating_point:
        return False
    info = torch.finfo(dtype)
    if -value > info.max:
        return False
    half_ulp = 2.0 ** math.floor(math.log2(-value)) * info.eps / 2
    return half_ulp >= 2.0 ** 30


__all__ = [
    "ASSERT_OPS", "CAST_OPS", "aten", "arg", "constant_scalar", "constant_tensor", "copy_source_meta",
    "dims", "dtype", "erase_dead", "infer_meta", "is_absorbing", "is_noop", "is_op", "noop_chain", "only_user",
    "packet", "peel_scales", "permutation", "rank", "real_users", "scaled", "skip_noops", "static_int",
    "swapped_last_two", "tensor_val", "unrepeat_heads",
]


# -- added for fuse-norms / fuse-activations / merge-gemms / fuse-rope (additive only) ----------
def operands(node: Any, op: Any) -> list[tuple[Any, Any]]:
    """Both orders of the two operands of a commutative binary ``op`` node (``aten.add`` /
    ``aten.mul``), so a matcher reads ``for x, y in operands(n, aten.mul)``; ``[]`` if ``node`` is
    not such a node (another op, a third argument, ``alpha != 1``)."""
    if not is_op(node, op) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return []
    a, b = node.args
    return [(a, b), (b, a)]


def same_value(a: Any, b: Any, depth: int = 4) -> bool:
    """``a`` and ``b`` hold the same value: the same node, or the same pure op on the same values
    (graphs that were not CSE'd repeat ``x - mean(x)``), compared ``depth`` levels deep."""
    if a is b:
        return True
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or depth == 0:
        return False
    if a.op != "call_function" or a.target is not b.target or a.is_impure() or b.is_impure():
        return False
    if len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    return all(same_value(x, y, depth - 1) if isinstance(x, torch.fx.Node) else x == y
               for x, y in zip(a.args, b.args))


def erased_by(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    """:func:`erase_dead`, returning the erased nodes (a pass walking a snapshot of the graph skips
    them)."""
    before = set(graph.nodes)
    erase_dead(graph, nodes)
    return before - set(graph.nodes)


__all__ += ["erased_by", "operands", "same_value"]
