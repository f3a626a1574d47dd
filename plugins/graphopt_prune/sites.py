"""GEMM sites: the nodes that hold prunable weights, whatever op the model's export used.

A site is a matrix product of a computed activation with a constant 2-D weight (a ``get_attr``):

==============================  ===================  ==========  =========
op                              weight layout        in-dim      out-dim
==============================  ===================  ==========  =========
``aten.linear(x, W, b)``        ``W[out, in]``       1           0
``aten.addmm(b, x, W)``         ``W[in, out]``       0           1          (HF Conv1D: GPT-2)
``aten.mm(x, W)`` / ``matmul``  ``W[in, out]``       0           1
==============================  ===================  ==========  =========

``x`` is contracted over its last dim; the output's last dim holds the output features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from graphopt.fx import attribute

aten = torch.ops.aten
Node = torch.fx.Node


@dataclass
class Site:
    node: Node
    x: Node  # the activation input
    weight: Node  # get_attr of the 2-D weight
    bias: Node | None  # get_attr of the 1-D bias (or None)
    in_dim: int  # the weight dim contracted with x's last dim
    out_dim: int  # the weight dim giving the output features

    @property
    def name(self) -> str:
        return str(self.weight.target)


def get_constant(gm: torch.fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (``None`` for anything else)."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    obj = attribute(gm, str(node.target))
    return obj if isinstance(obj, torch.Tensor) else None


def as_site(gm: torch.fx.GraphModule, node: Node) -> Site | None:
    """The :class:`Site` of a GEMM with a constant 2-D floating weight, else ``None``."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is aten.linear.default and len(node.args) >= 2:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        in_dim, out_dim = 1, 0
    elif t is aten.addmm.default and len(node.args) >= 3 and not node.kwargs:
        b, x, w = node.args[0], node.args[1], node.args[2]
        in_dim, out_dim = 0, 1
    elif t in (aten.mm.default, aten.matmul.default) and len(node.args) == 2:
        x, w = node.args
        b = None
        in_dim, out_dim = 0, 1
    else:
        return None
    weight = get_constant(gm, w)
    if not isinstance(x, Node) or weight is None or weight.dim() != 2 or not weight.is_floating_point():
        return None
    bias = None
    if b is not None:
        bt = get_constant(gm, b)
        if bt is None or bt.dim() != 1 or bt.shape[0] != weight.shape[out_dim]:
            return None
        bias = b
    return Site(node, x, w, bias, in_dim, out_dim)


def sites(gm: torch.fx.GraphModule) -> list[Site]:
    return [s for n in gm.graph.nodes if (s := as_site(gm, n)) is not None]
