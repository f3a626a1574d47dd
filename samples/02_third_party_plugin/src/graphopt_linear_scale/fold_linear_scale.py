"""fold-linear-scale: fold a constant scale that follows a linear layer into its weights.

Why: OPT, Whisper, XGLM and TrOCR in transformers scale the query after its projection,
``self.q_proj(hidden_states) * self.scaling``: a separate elementwise kernel over a [B, T, H]
activation on every layer and step. Scaled weights remove it and leave a plain linear that later
passes (QKV merging, quantization) and backends recognise.

Rewrites, when the linear/matmul has no other user (else folding would add a second GEMM)::

    mul(linear(x, W, b), c) | mul(c, linear(x, W, b)) | div(linear(x, W, b), c)
        ->  linear(x, W*c, b*c)     (W/c, b/c for a division; matmul(x, W) likewise)

``c`` is a Python number or a 0-dim constant tensor. Scaled weights are computed in float64,
rounded once to the weight's dtype and added as new tensors (``graphopt.fx.add_constant``): a
weight shared with other layers or with the original graph is never written into. nanoGPT and HF
Llama/GPT-2 scale ``(q @ k.T) * c``, two activations: nothing to fold (stats say ``folded: 0``).

Option ``min_abs`` (default 0): leave factors with ``|factor| < min_abs`` alone; folding a tiny
scale into fp16/bf16 weights can flush small weights to zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.fx

import graphopt
from graphopt.fx import add_constant, attribute, constant_scalar, constant_value, copy_source_meta, erase_dead

aten = torch.ops.aten

_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)
_LINEAR = aten.linear.default
_MATMUL = (aten.matmul.default, aten.mm.default)


@dataclass
class _Match:
    scale: torch.fx.Node        # the mul / div node that goes away
    producer: torch.fx.Node     # the linear / matmul whose weights absorb the scale
    factor: float               # what the weights are multiplied by (1/c for a division)
    divide: bool                # the original divided: compute W / c, not W * (1/c)
    c: float
    weight: torch.Tensor        # the producer's current (constant) W and b
    bias: torch.Tensor | None


class FoldLinearScale(graphopt.Pass):
    """Fold mul/div by a constant after a linear (or x @ W) into the weights: linear(x, W*c, b*c)."""

    name = "fold-linear-scale"
    verification = graphopt.verify.allclose(rtol=1e-5, atol=1e-6)

    @dataclass
    class Options:
        min_abs: float = 0.0  # leave |factor| < min_abs alone (tiny scales can underflow fp16 weights)

        def __post_init__(self) -> None:
            if self.min_abs < 0:
                raise ValueError(f"min_abs must be >= 0, got {self.min_abs}")

    def run(self, ir: graphopt.GraphIR, ctx: graphopt.PassContext) -> graphopt.PassResult:
        gm = ir.graph_module
        folded = skipped = 0
        for node in list(ir.graph.nodes):
            m = _match(gm, node)
            if m is None:
                continue
            if abs(m.factor) < self.options.min_abs:
                skipped += 1
                continue
            if not ctx.should_rewrite(f"fold-linear-scale: {m.scale.name} = {m.scale.target}"
                                      f"({m.producer.name}, {m.c:g})"):
                continue
            _fold(gm, m)
            folded += 1
        stats = {"folded": folded}
        if skipped:
            stats["skipped_min_abs"] = skipped
        return graphopt.PassResult(ir, folded > 0, stats)


# -- matching ----------------------------------------------------------------------------------


def _match(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Match | None:
    """The scale node's producer and factor, or None when ``node`` is not a foldable scale."""
    if node.op != "call_function" or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.target in _MUL:
        producer, c = (a, constant_scalar(b)) if _is_producer(a) else (b, constant_scalar(a))
        divide = False
    elif node.target in _DIV:
        producer, c, divide = a, constant_scalar(b), True
    else:
        return None
    if c is None or not _is_producer(producer) or len(producer.users) != 1:
        return None
    if c == 0 or not math.isfinite(c):
        return None
    weights = _weights(gm, producer) if _same_type(node, producer) else None
    if weights is None:
        return None
    return _Match(node, producer, 1.0 / c if divide else c, divide, c, *weights)


def _is_producer(n: object) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and (n.target is _LINEAR or n.target in _MATMUL)


def _weights(gm: torch.fx.GraphModule, producer: torch.fx.Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W, b) of the producer when both are floating constants; else None."""
    if producer.target is _LINEAR:
        if producer.kwargs or len(producer.args) not in (2, 3):
            return None
        w = constant_value(producer.args[1])
        b_arg = producer.args[2] if len(producer.args) == 3 else None
        b = None if b_arg is None else constant_value(b_arg)
        if b_arg is not None and b is None:
            return None
    else:
        if producer.kwargs or len(producer.args) != 2:
            return None
        w, b = constant_value(producer.args[1]), None
    if w is None or not w.is_floating_point() or (b is not None and not b.is_floating_point()):
        return None
    return w, b


def _same_type(scale: torch.fx.Node, producer: torch.fx.Node) -> bool:
    """The scale must not change dtype or shape (a 0-dim scalar never broadcasts the output up)."""
    sv, pv = scale.meta.get("val"), producer.meta.get("val")
    if not isinstance(sv, torch.Tensor) or not isinstance(pv, torch.Tensor):
        return False
    return sv.dtype == pv.dtype and sv.shape == pv.shape


def _root_attr(n: torch.fx.Node) -> str:
    """The attribute a constant expression starts from (names the new weight)."""
    while n.op != "get_attr":
        n = n.all_input_nodes[0]
    return str(n.target)

# -- rewriting ---------------------------------------------------------------------------------

def _fold(gm: torch.fx.GraphModule, m: _Match) -> None:
    graph = gm.graph
    w, b = m.weight, m.bias
    w_root = _root_attr(m.producer.args[1])
    with graph.inserting_before(m.scale):
        w_node = graph.get_attr(_register(gm, w_root, _scaled(w, m), like=attribute(gm, w_root)))
        args = [m.producer.args[0], w_node]
        if b is not None:
            b_root = _root_attr(m.producer.args[2])
            args.append(graph.get_attr(_register(gm, b_root, _scaled(b, m), like=attribute(gm, b_root))))
        new = graph.call_function(m.producer.target, tuple(args))
    new.meta.update({k: v for k, v in m.scale.meta.items() if k in ("val", "tensor_meta")})
    copy_source_meta(m.producer, new)  # errors and reports point at the model's code
    m.scale.replace_all_uses_with(new)
    erase_dead(graph, [m.scale, m.producer])  # and the old weight expressions, once nothing reads them


def _scaled(t: torch.Tensor, m: _Match) -> torch.Tensor:
    """``t * c`` (or ``t / c``) computed in float64 and rounded once to ``t``'s dtype."""
    t64 = t.detach().to(torch.float64)
    return (t64 / m.c if m.divide else t64 * m.c).to(t.dtype).contiguous()


def _register(gm: torch.fx.GraphModule, base: str, value: torch.Tensor, like: object) -> str:
    """Add ``value`` under a fresh name made from ``base``; a parameter if ``like`` is one."""
    stem = re.sub(r"_scaled(_\d+)?$", "", base.replace(".", "_"), count=1) + "_scaled"
    return add_constant(gm, stem, value, parameter=isinstance(like, torch.nn.Parameter))
