"""Reading fx nodes: the small helpers every pass needs, in one place.

Passes match on how values flow (STYLE habit 2); these read what a node computes (its overload
packet), its arguments whether positional or keyword, and the FakeTensor that capture and shape
propagation leave on it. Shapes compare as strings, so a symbolic dim equals only the same
expression and comparing never adds a guard on a dynamic dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx


def packet(node: Any) -> Any:
    """The op a call node runs, independent of its overload (``aten.add`` for ``aten.add.Tensor``)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", None)


def is_op(node: Any, *ops: Any) -> bool:
    """``True`` if ``node`` calls one of ``ops`` (overload packets such as ``aten.matmul``)."""
    p = packet(node)
    return p is not None and p in ops


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node``, whether it was passed positionally (at ``index``) or by keyword."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_val(x: Any) -> torch.Tensor | None:
    """The FakeTensor capture left on ``x`` (``None`` for non-nodes and non-tensor values)."""
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def dims(x: Any) -> list[str] | None:
    """The shape of ``x`` as strings (symbolic dims as their expressions)."""
    val = tensor_val(x)
    return None if val is None else [str(d) for d in val.shape]


def rank(x: Any) -> int | None:
    val = tensor_val(x)
    return None if val is None else val.dim()


def dtype(x: Any) -> torch.dtype | None:
    val = tensor_val(x)
    return None if val is None else val.dtype
