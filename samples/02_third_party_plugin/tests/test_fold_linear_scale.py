"""Tests of fold-linear-scale: which ops remain, numerics on fresh inputs, random models, a real
model family (HF OPT), options, bisect cooperation, and the full compile → load round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from graphopt_linear_scale import FoldLinearScale
from hypothesis import given, settings

import graphopt
from graphopt.testing import check_pass, random_models

aten = torch.ops.aten
SCALE = 1.0 / math.sqrt(8)


class ScaledLinear(nn.Module):
    """``q_proj(x) <op> c`` in its spellings."""

    def __init__(self, op: str, bias: bool = True):
        super().__init__()
        self.op = op
        self.q_proj = nn.Linear(16, 16, bias=bias)
        self.register_buffer("scaling", torch.tensor(SCALE))

    def forward(self, x):
        if self.op == "matmul":
            return x @ self.q_proj.weight.T * SCALE  # hand-written linear, no bias
        q = self.q_proj(x)
        if self.op == "mul":
            return q * SCALE
        if self.op == "rmul":
            return SCALE * q
        if self.op == "div":
            return q / math.sqrt(8)
        if self.op == "buffer":
            return q * self.scaling  # a 0-dim constant tensor
        if self.op == "chain":
            return q * 2.0 / 3.0
        raise ValueError(self.op)


class SharedLinear(nn.Module):
    """The unscaled projection is used too: folding would need a second GEMM."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        y = self.proj(x)
        return y + y * SCALE


class ScoreScale(nn.Module):
    """nanoGPT: the scale follows q @ k.T, a product of two activations."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return (self.q(x) @ self.k(x).transpose(-2, -1)) * SCALE


class VectorScale(nn.Module):
    """A per-channel scale is not a scalar: left alone."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return self.proj(x) * self.gain


def _x(b: int = 2, t: int = 5, h: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, h, generator=torch.Generator().manual_seed(seed))


def _optimize(model: nn.Module, pipeline: str = "fold-linear-scale"):
    original, optimized, report, _ = graphopt.optimize(model.eval(), (_x(),), pipeline)
    return original, optimized, report.passes[0]["stats"]


def _scales_after_producers(ir: graphopt.GraphIR) -> list[str]:
    """mul/div nodes fed directly by a linear or matmul: what the pass must leave none of."""
    producers = (aten.linear.default, aten.matmul.default, aten.mm.default)
    return [n.name for n in ir.graph.nodes
            if n.target in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)
            and any(a.target in producers for a in n.all_input_nodes)]


@pytest.mark.parametrize("op,bias", [("mul", True), ("mul", False), ("rmul", True), ("div", True),
                                     ("buffer", True), ("matmul", False), ("chain", True)])
def test_folds_scale_into_weights(op, bias):
    original, optimized, stats = _optimize(ScaledLinear(op, bias))
    assert _scales_after_producers(original), "the test model must contain the pattern"
    assert _scales_after_producers(optimized) == []
    assert stats["folded"] == (2 if op == "chain" else 1)
    ops = optimized.op_counts()
    assert "aten.mul" not in ops and "aten.div" not in ops
    assert ops.get("aten.linear", 0) + ops.get("aten.matmul", 0) == 1


@pytest.mark.parametrize("model_cls", [SharedLinear, ScoreScale, VectorScale])
def test_leaves_other_scales_alone(model_cls):
    original, optimized, stats = _optimize(model_cls())
    assert stats["folded"] == 0
    assert optimized.op_counts() == original.op_counts()


@pytest.mark.parametrize("op", ["mul", "div", "buffer", "matmul", "chain"])
def test_numerics_on_fresh_inputs(op):
    model = ScaledLinear(op).eval()
    _, optimized, _ = _optimize(model)
    for seed, (b, t) in enumerate([(1, 3), (3, 7)], start=100):  # never the example inputs
        x = _x(b, t, seed=seed)
        with torch.no_grad():
            expected = model(x)
        (got,) = optimized.run([x])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_check_pass_on_the_sample_pattern():
    report = check_pass("fold-linear-scale", ScaledLinear("mul"), (_x(),))
    assert report["passes"][0]["stats"]["folded"] == 1


@given(rm=random_models())
@settings(max_examples=10, deadline=None)
def test_random_models_keep_numerics(rm):
    check_pass("fold-linear-scale", rm.module, rm.example_inputs)


def test_hf_opt_folds_every_query_scale():
    """OPT scales q right after q_proj: one fold per layer."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                 use_cache=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    report = check_pass("fold-linear-scale", model, {"input_ids": ids})
    assert report["passes"][0]["stats"]["folded"] == cfg.num_hidden_layers


def test_min_abs_option():
    _, optimized, stats = _optimize(ScaledLinear("mul"), f"fold-linear-scale(min_abs={SCALE * 2})")
    assert stats == {"folded": 0, "skipped_min_abs": 1}
    assert "aten.mul" in optimized.op_counts()
    with pytest.raises(graphopt.PassOptionError, match="min_abs"):
        _optimize(ScaledLinear("mul"), "fold-linear-scale(min_abs=-1)")
    with pytest.raises(graphopt.PassOptionError, match="valid options: min_abs"):
        _optimize(ScaledLinear("mul"), "fold-linear-scale(threshold=1)")


def test_respects_the_bisect_rewrite_limit():
    ir = graphopt.capture(ScaledLinear("chain").eval(), (_x(),))
    result = FoldLinearScale().run(ir, graphopt.PassContext(rewrite_limit=1))
    assert result.stats["folded"] == 1


def test_compile_to_onnx_and_load(tmp_path):
    pm = graphopt.get_plugin_manager()
    if "onnx" not in pm.backends:
        err = (pm.plugins.get("graphopt-backends") or graphopt.plugins.PluginInfo("", "")).error
        pytest.skip(f"the onnx backend is not registered yet ({err or 'no plugin provides it'})")
    model = ScaledLinear("mul").eval()
    art = graphopt.compile(model, (_x(),), pipeline="fold-linear-scale", target="onnx", out=tmp_path / "art",
                           report=None)
    assert art.report["passes"][0]["stats"]["folded"] == 1
    engine = graphopt.load(tmp_path / "art")
    x = _x(2, 5, seed=7)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(engine(x), expected, rtol=1e-4, atol=1e-5)
