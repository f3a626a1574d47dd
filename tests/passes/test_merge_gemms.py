"""merge-gemms: linears sharing an input → one linear + split_with_sizes; what must not merge (computed
weights, other inputs, other dtypes) stays; numerics on fresh shapes; the HF Llama (QKV + gate/up)
through the pipeline to ONNX and torch; MiniLM's biased QKV."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from graphopt_fusion.merge_gemms import MergeGemms
from torch import nn

import graphopt
from graphopt.ir.graph_ir import GraphIR
from graphopt.passes.base import PassContext
from tests.conftest import optimize_verified
from tests.passes.lowering import lower_and_compare, token_inputs

aten = torch.ops.aten
H = 16


class Projections(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(H, 16), nn.Linear(H, 8), nn.Linear(H, 8)          # biased QKV
        self.gate, self.up = nn.Linear(H, 24, bias=False), nn.Linear(H, 24, bias=False)     # gate/up
        self.a, self.b = nn.Linear(H, 4), nn.Linear(H, 4, bias=False)                       # mixed bias
        self.alone = nn.Linear(H, 4)                                                        # nothing to merge with

    def forward(self, x, w):
        h = x + 1
        qkv = self.q(x) + torch.cat([self.k(x), self.v(x)], -1)
        mlp = self.gate(h) * self.up(h)
        mixed = self.a(h * 2) - self.b(h * 2)
        computed = torch.nn.functional.linear(x, w) + self.alone(h - 1)   # weight is a graph input
        return qkv, mlp, mixed, computed


def _inputs(seed, batch=2, seq=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, H, generator=g), torch.randn(4, H, generator=g)


def _optimize(module, inputs, pipeline="cleanup,merge-gemms", dynamic=None):
    return optimize_verified(module, inputs, pipeline, dynamic)


@pytest.fixture(scope="module")
def projections():
    return _optimize(Projections(), _inputs(0), dynamic={"x": {0: (1, 8), 1: (2, 64)}})


def test_expected_ops(projections):
    original, optimized, stats = projections
    assert stats == {"merged_groups": 3, "linears_merged": 7}
    assert original.op_counts()["aten.linear"] == 9 and optimized.op_counts()["aten.linear"] == 5
    splits = [n for n in optimized.call_nodes() if n.target is aten.split_with_sizes.default]
    assert sorted(tuple(n.args[1]) for n in splits) == [(4, 4), (16, 8, 8), (24, 24)]
    assert all(n.args[2] == -1 for n in splits)
    merged = {n.args[1].target: n for n in optimized.call_nodes()
              if n.target is aten.linear.default and str(n.args[1].target).startswith("_merged_")}
    assert len(merged) == 3
    params = dict(optimized.graph_module.named_parameters())
    shapes = sorted((tuple(params[w].shape), len(n.args) > 2) for w, n in merged.items())
    assert shapes == [((8, H), True), ((32, H), True), ((48, H), False)]
    # originals are dropped; the only new numbers are the zero bias of the bias-less linear in "mixed"
    assert optimized.param_count() == original.param_count() + 4


def test_mixed_bias_gets_zeros(projections):
    _, optimized, _ = projections
    params = dict(optimized.graph_module.named_parameters())
    [bias] = [params[n.args[2].target] for n in optimized.call_nodes()
              if n.target is aten.linear.default and len(n.args) > 2 and n.args[2] is not None
              and params[n.args[2].target].shape == (8,)]
    assert torch.count_nonzero(bias[4:]) == 0 and torch.count_nonzero(bias[:4]) == 4


def test_numerics_on_fresh_shapes(projections):
    original, optimized, _ = projections
    for seed, (batch, seq) in ((1, (3, 11)), (2, (1, 2)), (3, (8, 40))):
        inputs = list(_inputs(seed, batch, seq))
        for want, got in zip(original.run(inputs), optimized.run(inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shared_input_different_dtypes_left_alone():
    """Two constant weights of different dtypes on one input: a structural check (such a graph only
    runs under autocast-like dispatch, so it is built by hand and never executed)."""
    root = nn.Module()
    root.w32 = nn.Parameter(torch.randn(8, H))
    root.w16 = nn.Parameter(torch.randn(8, H, dtype=torch.float16))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, H)
    outs = []
    for name in ("w32", "w16"):
        w = graph.get_attr(name)
        outs.append(graph.call_function(aten.linear.default, (x, w)))
    graph.output(tuple(outs))
    ir = GraphIR(torch.fx.GraphModule(root, graph), [], [])
    result = MergeGemms().run(ir, PassContext())
    assert not result.changed and result.stats == {"merged_groups": 0, "linears_merged": 0}
    assert sum(n.target is aten.linear.default for n in ir.graph.nodes) == 2


def test_rewrite_limit_is_respected():
    _, before, _, _ = graphopt.optimize(Projections(), _inputs(0), "cleanup", verify=False)
    ctx = PassContext(rewrite_limit=1)
    result = MergeGemms().run(before, ctx)
    assert result.stats["merged_groups"] == 1 and ctx.rewrites == 1


# -- real models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(sample_model_loader):
    model, inputs, dynamic = sample_model_loader("hf_llama").build()
    return (model, *_optimize(model, inputs, dynamic=dynamic))


def test_llama_qkv_and_gate_up(llama):
    model, original, optimized, stats = llama
    layers = model.config.num_hidden_layers
    assert stats == {"merged_groups": 2 * layers, "linears_merged": 5 * layers}
    assert optimized.op_counts()["aten.linear"] == original.op_counts()["aten.linear"] - 3 * layers
    splits = sorted(tuple(n.args[1]) for n in optimized.call_nodes() if n.target is aten.split_with_sizes.default)
    c = model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    assert splits == sorted([(c.hidden_size, kv, kv), (c.intermediate_size,) * 2] * layers)
    assert all(n.target is operator.getitem for n in optimized.graph.nodes
               if n.args and getattr(n.args[0], "target", None) is aten.split_with_sizes.default)
    names = list(optimized.graph_module.state_dict())
    for merged_away in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert not any(merged_away in n for n in names), merged_away   # no weight kept twice
    inputs = list(token_inputs(5, 3, 11).values())
    torch.testing.assert_close(optimized.run(inputs)[0], original.run(inputs)[0], rtol=1e-5, atol=1e-5)


def test_llama_lowers(llama, tmp_path):
    model, _, optimized, _ = llama
    ops = [n.op_type for n in lower_and_compare(optimized, model, token_inputs(6, 4, 7), tmp_path, opset=None)]
    assert ops.count("Split") >= 2 * model.config.num_hidden_layers


def test_minilm_biased_qkv(sample_model_loader):
    model, inputs, _ = sample_model_loader("minilm").build()
    _, optimized, stats = _optimize(model, inputs)
    layers = model.config.num_hidden_layers
    assert stats == {"merged_groups": layers, "linears_merged": 3 * layers}
    merged = [n for n in optimized.call_nodes() if n.target is aten.linear.default
              and str(n.args[1].target).startswith("_merged_")]
    assert len(merged) == layers and all(len(n.args) == 3 for n in merged)   # biases merged too
