"""fuse-activations: GELU and SiLU written out as arithmetic become ``aten.gelu`` / ``aten.silu``.

Why: GPT-2 (``gelu_new``), BERT ports, T5 and many hand-written models spell their activation out,
which captures as six to nine elementwise nodes. As one node the onnx backend emits a single ONNX
``Gelu`` (opset 20, ``approximate="tanh"`` too) or ``Sigmoid``+``Mul`` that ONNX Runtime and
TensorRT fuse, and quantization passes see one activation instead of a chain::

    %h  = aten.mul(%x, 0.5)
    %c  = aten.pow(%x, 3.0)
    %c2 = aten.mul(%c, 0.044715)
    %p  = aten.add(%x, %c2)
    %p2 = aten.mul(%p, 0.797885)
    %t  = aten.tanh(%p2)
    %t1 = aten.add(%t, 1.0)
    %y  = aten.mul(%h, %t1)                     →   %y = aten.gelu(%x, approximate="tanh")

    %y  = aten.mul(%x, aten.sigmoid(%x))        →   %y = aten.silu(%x)

How a match is found: every rule names a transcendental op ``f`` (``erf``, ``tanh``, ``sigmoid``),
the polynomial its argument must be in ``x``, and the polynomial in ``x`` and ``t = f(...)`` the
whole expression must be. Arithmetic subgraphs (``mul``, ``add``, ``sub``, ``neg``, ``div`` by a
number, ``pow`` by a small integer) are read as polynomials with float coefficients, so operand
order, association and constant folding do not matter (``x*0.5*(1+t)``, ``0.5*x + 0.5*x*t`` and
``(x/2)*(t+1)`` are all ``0.5x + 0.5xt``). Starting at each ``f`` node, ``x`` is the first node in its
argument's arithmetic subgraph for which the argument is the expected polynomial, and a root is
the lowest ancestor of ``t`` (through arithmetic users, on each path) that equals the expected
expression and has ``x``'s shape and dtype. Inner nodes other users still read stay. Coefficients must agree
to a relative 1e-5 (``0.7978845608`` and ``math.sqrt(2 / math.pi)`` both pass; a GELU with
``0.045`` instead of ``0.044715`` is left alone), and ``x`` must be a floating-point tensor.

SwiGLU / GeGLU (``silu(gate(x)) * up(x)``, gate and up two projections of one input: two
``aten.linear`` of the same tensor, or two pieces of one split/slice of a merged projection) are
counted (``swiglu`` / ``geglu``) and kept as ``silu`` + ``mul``: ATen has no op for them, and the ONNX
exporter already lowers ``silu`` * ``mul`` to ``Sigmoid``, ``Mul``, ``Mul`` that both ONNX Runtime and
TensorRT fuse. Existing ``aten.gelu`` / ``aten.silu`` nodes are counted as ``canonical``.

Verification: ``reference()`` (the fp64 rule, README "Verification"): exact in real arithmetic, but the fused kernels round
differently.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.ir import GraphIR
from graphopt.verify import reference

from .patterns import aten, constant_scalar, copy_source_meta, erased_by, packet, tensor_val

log = logging.getLogger(__name__)

Node = torch.fx.Node

RTOL = 1e-5          # how closely a coefficient must match the rule's
MAX_NODES = 24       # arithmetic nodes read per polynomial: activations are small
MAX_CLIMB = 6        # levels of ancestors of f(...) tried as the root


# -- polynomials over atoms --------------------------------------------------------------------
# A polynomial maps a monomial (a sorted tuple of (atom, power)) to its coefficient; atom 0 is x,
# atom 1 is t = f(...). ``{(): 0.5}`` is the constant 0.5, ``{((0, 1), (1, 1)): 0.5}`` is 0.5*x*t.
Poly = dict[tuple[tuple[int, int], ...], float]


def _mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            powers: dict[int, int] = {}
            for atom, k in m1 + m2:
                powers[atom] = powers.get(atom, 0) + k
            m = tuple(sorted(powers.items()))
            out[m] = out.get(m, 0.0) + c1 * c2
    return out


def _add(p: Poly, q: Poly, scale: float = 1.0) -> Poly:
    out = dict(p)
    for m, c in q.items():
        out[m] = out.get(m, 0.0) + scale * c
    return out


def _const(c: float) -> Poly:
    return {(): c}


class _NotPoly(Exception):
    """The subgraph is not a polynomial in the atoms (another tensor, an op we do not read)."""


def polynomial(x: Any, atoms: dict[Node, int], seen: list[Node] | None = None) -> Poly:
    """``x`` as a polynomial in ``atoms``; raises :class:`_NotPoly`. ``seen`` collects the nodes read."""
    if isinstance(x, Node) and x in atoms:
        return {((atoms[x], 1),): 1.0}
    if constant_scalar(x) is not None:
        return _const(constant_scalar(x))
    if not isinstance(x, Node) or x.op != "call_function":
        raise _NotPoly(x)
    if seen is not None:
        if len(seen) >= MAX_NODES:
            raise _NotPoly("too large")
        seen.append(x)
    op, args = packet(x), x.args
    rule = ARITHMETIC.get(op)
    if rule is None or x.kwargs.get("rounding_mode") is not None:
        raise _NotPoly(x)
    return rule(args, x.kwargs, lambda a: polynomial(a, atoms, seen))


def _pow(args: tuple, kwargs: dict, read: Callable[[Any], Poly]) -> Poly:
    k = constant_scalar(args[1])
    if k is None or k != int(k) or not 1 <= k <= 4:
        raise _NotPoly("exponent")
    base, out = read(args[0]), _const(1.0)
    for _ in range(int(k)):
        out = _mul(out, base)
    return out


def _div(args: tuple, kwargs: dict, read: Callable[[Any], Poly]) -> Poly:
    d = constant_scalar(args[1])
    if not d:
        raise _NotPoly("division by a tensor or by zero")
    return _mul(read(args[0]), _const(1.0 / d))


ARITHMETIC: dict[Any, Callable[[tuple, dict, Callable[[Any], Poly]], Poly]] = {
    aten.mul: lambda a, kw, read: _mul(read(a[0]), read(a[1])),                       # a * b
    aten.add: lambda a, kw, read: _add(read(a[0]), read(a[1]), kw.get("alpha", 1)),   # a + alpha*b
    aten.sub: lambda a, kw, read: _add(read(a[0]), read(a[1]), -kw.get("alpha", 1)),  # a - alpha*b
    aten.neg: lambda a, kw, read: _mul(read(a[0]), _const(-1.0)),                     # -a
    aten.div: _div,                                                                   # a / number
    aten.pow: _pow,                                                                   # a ** k, k in 1..4
}


def _same(p: Poly, q: Poly) -> bool:
    """Equal up to a relative RTOL per coefficient (terms near zero dropped)."""
    p = {m: c for m, c in p.items() if abs(c) > 1e-12}
    q = {m: c for m, c in q.items() if abs(c) > 1e-12}
    return p.keys() == q.keys() and all(math.isclose(p[m], q[m], rel_tol=RTOL) for m in p)


X, T = 0, 1


def poly(*terms: tuple[float, int, int]) -> Poly:
    """``poly((c, i, j), ...)`` = sum of c * x**i * t**j."""
    out: Poly = {}
    for c, i, j in terms:
        m = tuple((a, k) for a, k in ((X, i), (T, j)) if k)
        out[m] = out.get(m, 0.0) + c
    return out


# -- rules ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """``root == outer(x, t)`` where ``t = f(inner(x))`` → ``replace(x)``."""

    kind: str
    f: Any
    inner: Poly
    outer: Poly
    replace: Callable[[torch.fx.Graph, Node], Node]


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
HALF_X_ONE_PLUS_T = poly((0.5, 1, 0), (0.5, 1, 1))   # 0.5*x*(1 + t)

RULES: list[Rule] = [
    # 0.5*x*(1 + erf(x/sqrt(2))) -> gelu(x)
    Rule("gelu_erf", aten.erf, poly((1 / math.sqrt(2.0), 1, 0)), HALF_X_ONE_PLUS_T,
         lambda g, x: g.call_function(aten.gelu.default, (x,))),
    # 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))) -> gelu(x, approximate="tanh")
    Rule("gelu_tanh", aten.tanh, poly((SQRT_2_OVER_PI, 1, 0), (SQRT_2_OVER_PI * 0.044715, 3, 0)),
         HALF_X_ONE_PLUS_T, lambda g, x: g.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})),
    # x*sigmoid(x) -> silu(x)
    Rule("silu", aten.sigmoid, poly((1.0, 1, 0)), poly((1.0, 1, 1)),
         lambda g, x: g.call_function(aten.silu.default, (x,))),
]

#: the rules by the op at the root of their pattern; the activations they fuse into
RULES_BY_OP = {rule.f: [r for r in RULES if r.f is rule.f] for rule in RULES}
ACTIVATIONS = (aten.gelu, aten.silu)


@dataclass
class Match:
    rule: Rule
    x: Node
    t: Node
    root: Node
    inner: list[Node]


def _subgraph(arg: Any) -> list[Node]:
    """The arithmetic nodes of ``arg``'s subgraph and their operands, top-down (breadth first)."""
    out: list[Node] = []
    queue = [arg]
    while queue and len(out) < MAX_NODES:
        n = queue.pop(0)
        if not isinstance(n, Node) or n in out:
            continue
        out.append(n)
        if packet(n) in ARITHMETIC:
            queue.extend(a for a in n.args if isinstance(a, Node))
    return out


def _find_x(rule: Rule, t: Node) -> tuple[Node, list[Node]] | None:
    """The ``x`` for which ``t``'s argument is ``rule.inner(x)``."""
    if len(t.args) != 1 or t.kwargs:
        return None
    for x in _subgraph(t.args[0]):
        v = tensor_val(x)
        if v is None or not v.is_floating_point():
            continue
        seen: list[Node] = []
        try:
            p = polynomial(t.args[0], {x: X}, seen)
        except _NotPoly:
            continue
        if _same(p, rule.inner):
            return x, seen
    return None


def matches(rule: Rule, t: Node) -> list[Match]:
    """Every root above ``t = f(inner(x))`` that computes ``rule.outer(x, t)``: the ancestors of
    ``t`` through arithmetic users, lowest first on each path (nothing above a match is tried)."""
    found = _find_x(rule, t)
    if found is None:
        return []
    x, inner = found
    shape, dtype = [str(s) for s in tensor_val(x).shape], tensor_val(x).dtype
    out: list[Match] = []
    frontier, visited = [t], {t}
    for _ in range(MAX_CLIMB):
        above = []
        for node in frontier:
            for user in node.users:
                if user in visited or packet(user) not in ARITHMETIC:
                    continue
                visited.add(user)
                seen: list[Node] = []
                try:
                    p = polynomial(user, {x: X, t: T}, seen)
                except _NotPoly:
                    above.append(user)
                    continue
                v = tensor_val(user)
                if _same(p, rule.outer) and v is not None and v.dtype == dtype and [str(s) for s in v.shape] == shape:
                    out.append(Match(rule, x, t, user, inner + seen + [t]))
                else:
                    above.append(user)
        frontier = above
    return out


# -- gated linear units (counted, not rewritten) -------------------------------------------------
SPLITS = (aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split, aten.tensor_split)


def _projection_source(x: Any) -> tuple[str, Any] | None:
    """What a gate/up projection was computed from: a linear's input, or the tensor a split or a
    last-dim slice took it from."""
    if packet(x) is aten.linear:
        return "linear", x.args[0]
    if isinstance(x, Node) and x.target is operator.getitem and packet(x.args[0]) in SPLITS:
        return "split", x.args[0]
    if packet(x) is aten.slice and tensor_val(x) is not None and len(x.args) > 1 and x.args[1] in (-1, tensor_val(x).dim() - 1):
        return "slice", x.args[0]
    return None


def gated_unit(node: Node) -> str | None:
    """``"swiglu"`` / ``"geglu"`` if ``node = act(gate) * up`` with gate and up two projections of
    one tensor."""
    if packet(node) is not aten.mul or len(node.args) != 2:
        return None
    for act, up in (node.args, node.args[::-1]):
        kind = {aten.silu: "swiglu", aten.gelu: "geglu"}.get(packet(act))
        if kind is None:
            continue
        gate_src, up_src = _projection_source(act.args[0]), _projection_source(up)
        if gate_src is not None and gate_src == up_src and act.args[0] is not up:
            return kind
    return None


class FuseActivations(Pass):
    """Fuse GELU (erf and tanh forms) and SiLU written as arithmetic into aten.gelu / aten.silu."""

    name = "fuse-activations"
    verification = reference()

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        graph = ir.graph
        stats: dict[str, int] = {rule.kind: 0 for rule in RULES}
        stats["canonical"] = sum(1 for n in graph.nodes if packet(n) in ACTIVATIONS)
        erased: set[Node] = set()
        for t in list(graph.nodes):
            if t in erased or packet(t) not in RULES_BY_OP:
                continue  # erased by an earlier rewrite, or not a transcendental op
            found = next((ms for ms in (matches(r, t) for r in RULES_BY_OP[packet(t)]) if ms), [])
            for m in found:
                if m.root in erased or not ctx.should_rewrite(
                        f"fuse {m.rule.kind} at {m.root.name} (input {m.x.name})"):
                    continue
                with graph.inserting_before(m.root):
                    new = m.rule.replace(graph, m.x)
                new.meta["val"] = m.root.meta.get("val")
                copy_source_meta(m.root, new)
                m.root.replace_all_uses_with(new)
                erased |= erased_by(graph, [m.root] + m.inner)
                stats[m.rule.kind] += 1
                log.debug("fuse-activations: %s at %s", m.rule.kind, new.name)
        for kind in ("swiglu", "geglu"):
            stats[kind] = 0
        for node in graph.nodes:
            kind = gated_unit(node)
            if kind is not None:
                stats[kind] += 1
        changed = any(stats[rule.kind] for rule in RULES)
        return PassResult.after_rewrites(ir, stats, changed)
