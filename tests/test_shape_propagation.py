"""Incremental shape propagation after each pass (issue: real-size LLMs, compile time).

Symbolic FakeTensor propagation costs milliseconds per node; after every pass the pass manager
recomputes only the nodes the pass made or changed, nodes it rewired to inputs of another shape,
and what a changed shape reaches. These tests pin that the result is the one a full propagation
gives, and that a pass that only rewires nodes to same-shaped inputs recomputes almost nothing.
"""

from __future__ import annotations

import pytest
import sympy
import torch
from graphopt_cleanup.remove_noops import RemoveNoops

import graphopt
import graphopt.ir.shapes as shapes
from graphopt.ir.shapes import _same_meta
from graphopt.model_loader import load_factory
from graphopt.passes import PassContext, PassManager


def _full_vs_incremental(monkeypatch) -> list[tuple[int, int, list[str]]]:
    """Wrap the propagation: after each incremental one, run a full one and record the nodes whose
    ``val`` differs (the full result is kept, so a mismatch cannot hide in later passes)."""
    seen: list[tuple[int, int, list[str]]] = []
    real = shapes.propagate_shapes

    def checked(ir, dirty=None, rewired=None):
        n = real(ir, dirty, rewired)
        if dirty is not None:
            inc = {node.name: node.meta.get("val") for node in ir.graph.nodes}
            real(ir, None)
            bad = [node.name for node in ir.graph.nodes
                   if node.op != "output" and not _equivalent(inc[node.name], node.meta.get("val"))]
            seen.append((n, len(ir.graph.nodes), bad))
        return n

    monkeypatch.setattr(shapes, "propagate_shapes", checked)
    return seen


def _equivalent(a, b) -> bool:
    """Same meta, or the same sizes and strides once every symbol is given a value: the shape
    environment learns facts as passes run (``Min(64, 64*s53)`` becomes ``64`` once ``s53 >= 1``
    is known), so a kept ``val`` may spell a stride another way than a fresh one."""
    if _same_meta(a, b):
        return True
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype:
        return False
    exprs = [(x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(x), y.node.expr if isinstance(
        y, torch.SymInt) else sympy.Integer(y)) for x, y in zip([*a.shape, *a.stride()], [*b.shape, *b.stride()])]
    if a.dim() != b.dim():
        return False
    free = set().union(*(ea.free_symbols | eb.free_symbols for ea, eb in exprs))
    return all(all(ea.subs({s: v for s in free}) == eb.subs({s: v for s in free}) for ea, eb in exprs)
               for v in (1, 2, 7))


@pytest.mark.parametrize("factory, kwargs, pipeline", [
    ("hf_llama", {"attn_implementation": "sdpa"}, "cleanup,fuse,kv-cache"),
    ("hf_gpt2", {}, "cleanup,fuse,kv-cache"),
])
def test_incremental_propagation_equals_a_full_one(monkeypatch, factory, kwargs, pipeline):
    seen = _full_vs_incremental(monkeypatch)
    model, ex, dyn = load_factory(f"samples/models/{factory}.py:build", **kwargs)
    graphopt.optimize(model, ex, pipeline, dynamic=dyn)
    assert len(seen) >= 5, f"only {len(seen)} incremental propagations ran"
    assert [bad for *_, bad in seen if bad] == []
    # the kv-cache pass (new placeholders, a new signature) is incremental too, and cheaper than full
    recomputed, total, _ = seen[-1]
    assert recomputed < total


def test_rewired_nodes_with_same_shaped_inputs_are_not_recomputed():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = x.view(x.shape)  # a no-op view: remove-noops rewires its users to x
            return torch.relu(self.lin(y) + y).sum(-1)

    ir = graphopt.capture(M(), (torch.randn(3, 5, 8),), {"x": {0: (1, 8), 1: (1, 64)}})
    calls: list[int] = []
    real = shapes.propagate_shapes

    def counting(ir_, dirty=None, rewired=None):
        calls.append((real(ir_, dirty, rewired), len(ir_.graph.nodes)))
        return calls[-1][0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "propagate_shapes", counting)
        out = PassManager([RemoveNoops()]).run(ir.copy(), PassContext(original=ir))
    assert not any(n.target is torch.ops.aten.view.default for n in out.graph.nodes)
    (recomputed, total), = calls
    # the output node and the weights' get_attr are always re-read; the rewired linear/add are not
    assert recomputed <= 4 < total, (recomputed, total)
    for n in out.graph.nodes:
        if n.op == "call_function":
            assert isinstance(n.meta.get("val"), (torch.Tensor, torch.SymInt, int)), n.format_node()
