"""fuse-norms: decomposed RMSNorm and LayerNorm become one ``aten.rms_norm`` / ``aten.layer_norm``.

Why: most model code writes its norms out by hand (Hugging Face ``LlamaRMSNorm``, T5, TF-style
BERT LayerNorm), so a captured graph holds five to nine elementwise nodes and two reductions per
norm. As one canonical node the onnx backend emits ``RMSNormalization`` / ``LayerNormalization``
(opset 23 / 17), which ONNX Runtime and TensorRT run as single kernels, and later passes
(quantization, residual fusion) have one node to look for::

    %xf = aten.to(%x, float32)                       # optional up-cast ...
    %sq = aten.pow(%xf, 2)
    %ms = aten.mean(%sq, [-1], True)
    %v  = aten.add(%ms, 1e-06)
    %r  = aten.rsqrt(%v)
    %n  = aten.mul(%xf, %r)
    %nc = aten.to(%n, bfloat16)                      # ... and down-cast (Llama)
    %y  = aten.mul(%w, %nc)                     →    %y = aten.rms_norm(%x, [64], %w, 1e-06)

    %u  = aten.mean(%x, [-1], True)
    %d  = aten.sub(%x, %u)
    %v  = aten.mean(aten.pow(%d, 2), [-1], True)     # or aten.var(%x, [-1], correction=0)
    %n  = aten.div(%d, aten.sqrt(aten.add(%v, 1e-12)))
    %y  = aten.add(aten.mul(%w, %n), %b)        →    %y = aten.layer_norm(%x, [384], %w, %b, 1e-12)

A match is read from the data flow, one rule table per step (any operand order of ``mul``/``add``):

1. SCALE: the normalized value ``n`` is ``a * rsqrt(v + eps)`` or ``a / sqrt(v + eps)``;
2. VARIANCE: ``v`` is ``mean(a²)`` over trailing dims with ``keepdim`` (an RMS norm of ``a``), and
   when ``a = x - mean(x)`` over the same dims (or ``v = var(x, correction=0)``) a layer norm of ``x``;
3. AFFINE: then, while each value has one user: a cast back to the input dtype (only when ``a``
   is an up-cast of ``x``: the fused op computes in float32 itself), ``* weight`` and, for layer
   norms, ``+ bias``, where weight and bias have exactly the normalized shape.

Left alone (near misses): ``eps`` that is not a constant scalar (a Python number or a one-element
constant tensor is; a graph input or a computed tensor is not), reductions over leading or
non-trailing dims, ``keepdim=False``, symbolic normalized sizes, an ``eps`` tensor that promotes the
dtype or broadcasts to a higher rank. A weight or bias that does not have exactly the normalized
shape stays a separate ``mul`` / ``add`` after the fused norm. A "layer norm" whose centering mean
runs over other dims than its variance is an RMS norm of the centered value, and fuses as one.

Existing ``aten.layer_norm`` / ``aten.rms_norm`` nodes are counted as ``canonical``. A norm whose
input is a residual ``add`` of two same-shape tensors is counted in ``residual_norm``: ONNX
Runtime fuses ``Add`` + ``LayerNormalization`` into its ``SkipLayerNormalization`` kernel (12 of
MiniLM's 13 norms), so the pass leaves the ``add`` as it is, right in front of the norm. (ONNX
Runtime 1.31 has no such fusion for the opset-23 ``RMSNormalization``.)

Verification: ``reference()`` (the fp64 rule, README "Verification"): exact in real arithmetic, but the fused kernels sum in
another order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.ir import GraphIR
from graphopt.verify import reference

from .patterns import (
    CAST_OPS,
    arg,
    aten,
    constant_scalar,
    copy_source_meta,
    dims,
    erased_by,
    only_user,
    operands,
    packet,
    same_value,
    tensor_val,
)

log = logging.getLogger(__name__)

Node = torch.fx.Node


def cast_source(node: Any) -> Node | None:
    """The input of a cast (``aten.to(x, dtype)``, ``_to_copy``, ``type_as``) that keeps shape and device."""
    if packet(node) not in CAST_OPS or not node.args or not isinstance(node.args[0], Node):
        return None
    into, out = tensor_val(node.args[0]), tensor_val(node)
    if into is None or out is None or into.device != out.device or dims(node.args[0]) != dims(node):
        return None
    return node.args[0]


# -- the match ---------------------------------------------------------------------------------
@dataclass
class Norm:
    """A matched norm: ``root`` computes ``kind(x, shape, weight, bias, eps)``; ``inner`` are the
    nodes that become dead once ``root`` is replaced (if nothing else reads them)."""

    kind: str                    # "rms_norm" | "layer_norm"
    x: Node
    shape: list[int]
    eps: float
    root: Node
    weight: Node | None = None
    bias: Node | None = None
    inner: list[Node] = field(default_factory=list)


def _trailing_shape(x: Node, reduced: Any, keepdim: Any) -> list[int] | None:
    """The normalized shape if the ``reduced`` dims are the trailing dims of ``x`` (static sizes,
    keepdim)."""
    t = tensor_val(x)
    if t is None or not t.is_floating_point() or keepdim is not True or not isinstance(reduced, (list, tuple)):
        return None
    rank = t.dim()
    if not reduced or not all(type(d) is int for d in reduced):
        return None
    if sorted(d % rank for d in reduced) != list(range(rank - len(reduced), rank)):
        return None  # mean over a leading or non-contiguous dim: not a norm over features
    shape = list(t.shape[rank - len(reduced):])
    return [int(s) for s in shape] if all(type(s) is int for s in shape) else None


def _mean(node: Any) -> tuple[Node, list[int]] | None:
    # mean(x, dims, keepdim=True) -> (x, normalized shape)
    if packet(node) is not aten.mean or node.kwargs.get("dtype") is not None:
        return None
    x = node.args[0]
    shape = _trailing_shape(x, arg(node, 1, "dim"), arg(node, 2, "keepdim", False))
    return (x, shape) if shape is not None else None


def _square_of(node: Any) -> Node | None:
    # pow(a, 2) -> a ; mul(a, a) -> a
    if packet(node) is aten.pow and constant_scalar(arg(node, 1, "exponent")) == 2.0:
        return node.args[0]
    if packet(node) is aten.mul and len(node.args) == 2 and same_value(*node.args):
        return node.args[0]
    return None


def _centered(a: Any, shape: list[int]) -> Node | None:
    # a = x - mean(x) over the normalized dims -> x
    if packet(a) is not aten.sub or len(a.args) != 2 or a.kwargs.get("alpha", 1) != 1:
        return None
    x, m = a.args
    mean = _mean(m)
    return x if mean is not None and mean[0] is x and mean[1] == shape else None


# VARIANCE rules: (v, a) -> (kind, x, shape, nodes) where a is the tensor the scale step divides.
def _mean_of_squares(v: Any, a: Node) -> tuple[str, Node, list[int], list[Node]] | None:
    # mean(a^2) -> rms of a ; mean((x - mean(x))^2) -> variance of x
    mean = _mean(v)
    if mean is None:
        return None
    sq, shape = mean
    s = _square_of(sq)
    if s is None or not same_value(s, a):
        return None
    x = _centered(a, shape)
    if x is not None:
        return "layer_norm", x, shape, [v, sq, s, a, a.args[1]]
    return "rms_norm", a, shape, [v, sq]


def _variance(v: Any, a: Node) -> tuple[str, Node, list[int], list[Node]] | None:
    # var(x, dims, correction=0, keepdim=True) with a = x - mean(x) -> variance of x
    if packet(v) is not aten.var:
        return None
    if v.target is aten.var.correction:
        biased = constant_scalar(v.kwargs.get("correction", 1)) == 0.0
    elif v.target is aten.var.dim:
        biased = arg(v, 2, "unbiased", True) is False
    else:
        return None
    x = v.args[0]
    shape = _trailing_shape(x, arg(v, 1, "dim"), arg(v, 3, "keepdim", v.kwargs.get("keepdim", False)))
    if not biased or shape is None or _centered(a, shape) is not x:
        return None
    return "layer_norm", x, shape, [v, a, a.args[1]]


VARIANCE: list[Callable[[Any, Node], tuple[str, Node, list[int], list[Node]] | None]] = [
    _mean_of_squares,   # mean(x^2) / mean((x - mean x)^2)
    _variance,          # var(x, correction=0)
]


def _plus_eps(node: Any) -> tuple[Node, float] | None:
    # v + eps -> (v, eps) ; eps a Python number or a one-element constant tensor
    for v, eps in operands(node, aten.add):
        if isinstance(v, Node) and constant_scalar(eps) is not None:
            return v, constant_scalar(eps)
    return None


# SCALE rules: n -> (a, v, eps, nodes): n normalizes a by the variance v.
def _times_rsqrt(n: Any) -> tuple[Node, Node, float, list[Node]] | None:
    # a * rsqrt(v + eps)
    for a, r in operands(n, aten.mul):
        if packet(r) is aten.rsqrt and isinstance(a, Node):
            ve = _plus_eps(r.args[0])
            if ve is not None:
                return a, ve[0], ve[1], [n, r, r.args[0]]
    return None


def _over_sqrt(n: Any) -> tuple[Node, Node, float, list[Node]] | None:
    # a / sqrt(v + eps)
    if packet(n) is not aten.div or len(n.args) != 2 or n.kwargs.get("rounding_mode") is not None:
        return None
    a, s = n.args
    if packet(s) is not aten.sqrt or not isinstance(a, Node):
        return None
    ve = _plus_eps(s.args[0])
    return (a, ve[0], ve[1], [n, s, s.args[0]]) if ve is not None else None


SCALE: list[Callable[[Any], tuple[Node, Node, float, list[Node]] | None]] = [
    _times_rsqrt,       # a * rsqrt(v + eps)
    _over_sqrt,         # a / sqrt(v + eps)
]


def match_norm(n: Node) -> Norm | None:
    """The norm whose normalizing step is ``n``, extended over its cast/weight/bias users."""
    for scale in SCALE:
        found = scale(n)
        if found is None:
            continue
        a, v, eps, nodes = found
        for variance in VARIANCE:
            got = variance(v, a)
            if got is not None:
                kind, x, shape, more = got
                norm = Norm(kind, x, shape, eps, root=n, inner=nodes + more)
                _extend(norm)
                out, into = tensor_val(norm.root), tensor_val(norm.x)
                if out is None or into is None or out.dtype != into.dtype or dims(norm.root) != dims(norm.x):
                    return None  # an eps tensor that promotes the dtype or broadcasts to a higher rank
                return norm
    return None


def _has_shape(x: Any, shape: list[int]) -> bool:
    t = tensor_val(x)
    return t is not None and [str(s) for s in t.shape] == [str(s) for s in shape]


def _extend(norm: Norm) -> None:
    """AFFINE: absorb a round-trip cast, ``* weight`` and (layer norms) ``+ bias`` above the root."""
    src = cast_source(norm.x)
    user = only_user(norm.root)
    if src is not None and user is not None and cast_source(user) is norm.root:
        out, into = tensor_val(user), tensor_val(src)
        if out is not None and into is not None and out.dtype == into.dtype:
            # x.to(f32) ... .to(x.dtype): the fused op upcasts internally; one rounding at the end
            norm.inner.append(norm.x)
            norm.x, norm.root = src, user
            norm.inner.append(user)
    dtype = tensor_val(norm.root).dtype if tensor_val(norm.root) is not None else None
    _absorb(norm, aten.mul, "weight", dtype)
    if norm.kind == "layer_norm":
        _absorb(norm, aten.add, "bias", dtype)


def _absorb(norm: Norm, op: Any, field: str, dtype: Any) -> None:
    """When the norm's only user is ``root <op> t`` with ``t`` of the normalized shape and the
    norm's dtype, take ``t`` as the norm's ``field`` (weight or bias) and the user as its root."""
    user = only_user(norm.root)
    for y, t in operands(user, op):
        if y is norm.root and _has_shape(t, norm.shape) and tensor_val(t).dtype == dtype and tensor_val(norm.x).dtype == dtype:
            setattr(norm, field, t)
            norm.root = user
            norm.inner.append(user)
            return


def _replacement(graph: torch.fx.Graph, norm: Norm) -> Node:
    with graph.inserting_before(norm.root):
        if norm.kind == "rms_norm":
            new = graph.call_function(aten.rms_norm.default, (norm.x, norm.shape, norm.weight, norm.eps))
        else:
            new = graph.call_function(aten.layer_norm.default,
                                      (norm.x, norm.shape, norm.weight, norm.bias, norm.eps))
    new.meta["val"] = norm.root.meta.get("val")
    copy_source_meta(norm.root, new)
    return new


def _is_residual(x: Any) -> bool:
    """``x = a + b`` of two tensors of ``x``'s shape: a residual stream entering a norm."""
    if tensor_val(x) is None or not operands(x, aten.add):
        return False
    shape = list(tensor_val(x).shape)
    return all(_has_shape(t, shape) for t in x.args)


NORM_OPS = (aten.rms_norm, aten.layer_norm)


class FuseNorms(Pass):
    """Fuse decomposed RMSNorm / LayerNorm into aten.rms_norm / aten.layer_norm."""

    name = "fuse-norms"
    verification = reference()

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        graph = ir.graph
        stats = {"rms_norm": 0, "layer_norm": 0,
                 "canonical": sum(1 for n in graph.nodes if packet(n) in NORM_OPS), "residual_norm": 0}
        erased: set[Node] = set()
        for node in list(graph.nodes):
            if node in erased or packet(node) not in (aten.mul, aten.div):
                continue
            norm = match_norm(node)
            if norm is None:
                continue
            if not ctx.should_rewrite(f"fuse {norm.kind} at {norm.root.name} (input {norm.x.name})"):
                continue
            new = _replacement(graph, norm)
            norm.root.replace_all_uses_with(new)
            erased |= erased_by(graph, norm.inner)
            stats[norm.kind] += 1
            log.debug("fuse-norms: %s %s eps=%g at %s", norm.kind, norm.shape, norm.eps, new.name)
        stats["residual_norm"] = sum(1 for n in graph.nodes if packet(n) in NORM_OPS and _is_residual(n.args[0]))
        changed = stats["rms_norm"] + stats["layer_norm"] > 0
        return PassResult.after_rewrites(ir, stats, changed)
