"""eliminate-dead-code: Input → expected ops, bit-identical outputs on fresh inputs, a tiny Llama.

torch.export already drops most dead code, so the input graph is written out by hand."""

from __future__ import annotations

import torch
import torch.fx
from graphopt_cleanup.eliminate_dead_code import EliminateDeadCode

from graphopt.ir.analysis import live_nodes
from graphopt.ir.graph_ir import GraphIR, TensorSpec
from graphopt.passes.base import PassContext

aten = torch.ops.aten


def _inputs(seed: int) -> list[torch.Tensor]:
    return [torch.randn(8, generator=torch.Generator().manual_seed(seed))]


def _dead_code_ir() -> GraphIR:
    """
    %x: f32[8]
    %w = get_attr[w]                          live
    %unused = get_attr[unused]                dead
    %exp = aten.exp(%x)                       dead
    %neg = aten.neg(%exp)                     dead (reads dead code only)
    %shift = aten.add(%unused, 1)             dead
    %noise = aten.rand_like(%x)               kept: random, dropping it shifts the random stream
    %abs = aten.abs(%x)                       kept: an assertion reads it
    aten._assert_tensor_metadata(%abs, ...)   kept: remove-noops' to drop
    %y = aten.mul(%x, %w)
    return (%y,)
    """
    root = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    root.register_buffer("w", torch.randn(8, generator=g))
    root.register_buffer("unused", torch.randn(8, generator=g))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w, unused = graph.get_attr("w"), graph.get_attr("unused")
    graph.call_function(aten.neg.default, (graph.call_function(aten.exp.default, (x,)),))
    graph.call_function(aten.add.Tensor, (unused, 1))
    graph.call_function(aten.rand_like.default, (x,))
    checked = graph.call_function(aten.abs.default, (x,))
    graph.call_function(aten._assert_tensor_metadata.default, (checked,), {"dtype": torch.float32})
    graph.output((graph.call_function(aten.mul.Tensor, (x, w)),))
    ir = GraphIR(torch.fx.GraphModule(root, graph), [TensorSpec("x", "float32", [8])],
                 [TensorSpec("y", "float32", [8])], example_inputs=_inputs(0))
    return ir.recompile()


def test_expected_ops_after():
    ir = _dead_code_ir()
    result = EliminateDeadCode().run(ir, PassContext())

    assert result.stats == {"removed": 4}
    assert ir.op_counts() == {"aten._assert_tensor_metadata": 1, "aten.abs": 1, "aten.mul": 1,
                              "aten.rand_like": 1}
    assert [n.target for n in ir.graph.nodes if n.op == "get_attr"] == ["w"]
    assert list(ir.graph_module.state_dict()) == ["w"]  # the unused buffer is gone too
    assert EliminateDeadCode().run(ir, PassContext()).stats == {"removed": 0}


def test_outputs_bit_identical_on_fresh_inputs(same_outputs):
    original = _dead_code_ir()
    ir = _dead_code_ir()
    EliminateDeadCode().run(ir, PassContext())
    for seed in (1, 2, 3):
        same_outputs(original, ir, _inputs(seed))


def test_rewrite_limit_allows_exactly_one_rewrite():
    ir = _dead_code_ir()
    ctx = PassContext(rewrite_limit=1)
    result = EliminateDeadCode().run(ir, ctx)
    assert result.stats == {"removed": 1} and ctx.rewrites == 1
    ir.graph.lint()  # users go first: what is left is still a valid graph


def test_tiny_llama(tiny_llama, same_outputs):
    original = tiny_llama.ir
    ir = original.copy()
    result = EliminateDeadCode().run(ir, PassContext())

    # capture leaves an unused arange(1) -> unsqueeze chain and the unused
    # rotary_emb.original_inv_freq buffer behind
    assert result.stats["removed"] > 0
    assert "model.rotary_emb.original_inv_freq" in original.graph_module.state_dict()
    assert "model.rotary_emb.original_inv_freq" not in ir.graph_module.state_dict()
    assert ir.param_count() < original.param_count()
    live = live_nodes(ir)
    assert all(n.name in live or n.is_impure() for n in ir.graph.nodes)
    for seed in (1, 2):
        same_outputs(original, ir, tiny_llama.inputs(seed))
