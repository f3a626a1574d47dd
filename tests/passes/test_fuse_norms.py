"""fuse-norms: decomposed RMSNorm / LayerNorm → aten.rms_norm / aten.layer_norm; near misses left
alone; numerics on fresh shapes; the HF Llama through the pipeline to ONNX (RMSNormalization) and
torch; GPT-2's norms counted as canonical (nanoGPT's: test_fuse_activations)."""

from __future__ import annotations

import pytest
import torch
from graphopt_fusion.fuse_norms import FuseNorms
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import graphopt
from graphopt.passes.base import PassContext
from tests.conftest import optimize_verified
from tests.passes.lowering import lower_and_compare, token_inputs

H = 32
DYNAMIC = {"x": {0: (1, 8), 1: (2, 64)}}
DECOMPOSED = ("aten.pow", "aten.mean", "aten.rsqrt", "aten.sqrt", "aten.var", "aten.sub", "aten.div")


class TFLayerNorm(nn.Module):
    """BERT's TF-style LayerNorm: mean / sub / pow-mean / add eps / sqrt / div / mul / add."""

    def __init__(self, eps=1e-12):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.randn(H)), nn.Parameter(torch.randn(H)), eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + self.eps)) + self.bias


class Norms(nn.Module):
    """One of each form, plus a canonical nn.LayerNorm after a residual add."""

    def __init__(self):
        super().__init__()
        self.rms = LlamaRMSNorm(H, eps=1e-6)
        nn.init.normal_(self.rms.weight)
        self.tf_ln = TFLayerNorm()
        self.ln = nn.LayerNorm(H)

    def forward(self, x, y):
        var_ln = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(torch.var(x, -1, unbiased=False, keepdim=True) + 1e-5)
        t5 = y * torch.rsqrt((y * y).mean(-1, keepdim=True) + 1e-6)   # T5: no weight, x*x
        return self.rms(x), self.tf_ln(x + 1), var_ln, t5, self.ln(x + y)


def _inputs(seed, batch=2, seq=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, H, generator=g) * 3 + 1, torch.randn(batch, seq, H, generator=g))


def _optimize(module, inputs, dynamic=None, pipeline="cleanup,fuse-norms"):
    return optimize_verified(module, inputs, pipeline, dynamic)


@pytest.fixture(scope="module")
def norms():
    dynamic = {"x": DYNAMIC["x"], "y": DYNAMIC["x"]}
    return _optimize(Norms(), _inputs(0), dynamic)


def test_expected_ops(norms):
    original, optimized, stats = norms
    assert stats == {"rms_norm": 2, "layer_norm": 2, "canonical": 1, "residual_norm": 1}
    ops = optimized.op_counts()
    assert ops["aten.rms_norm"] == 2 and ops["aten.layer_norm"] == 3
    for op in DECOMPOSED:
        assert op not in ops, op
    fused = {n.args[4] if n.target is torch.ops.aten.layer_norm.default else n.args[3]
             for n in optimized.call_nodes() if "norm" in str(n.target)}
    assert fused == {1e-6, 1e-12, 1e-5}                         # eps read from the graph
    rms = [n for n in optimized.call_nodes() if n.target is torch.ops.aten.rms_norm.default]
    assert sorted(n.args[2] is None for n in rms) == [False, True]   # Llama weight absorbed; T5 has none


def test_numerics_on_fresh_shapes(norms):
    original, optimized, _ = norms
    for seed, (batch, seq) in ((1, (3, 11)), (2, (1, 2)), (3, (7, 40))):
        inputs = list(_inputs(seed, batch, seq))
        for want, got in zip(original.run(inputs), optimized.run(inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_second_run_finds_nothing(norms):
    _, optimized, _ = norms
    again = FuseNorms().run(optimized.copy(), PassContext())
    assert not again.changed and again.stats["canonical"] == 5


def test_half_precision_casts_round_trip():
    """Llama in bf16: x.to(f32) ... .to(bf16) * w fuses to rms_norm(x_bf16, w): no casts left."""
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.rms = LlamaRMSNorm(H)

        def forward(self, x):
            return self.rms(x)

    x = torch.randn(2, 5, H).bfloat16()
    ir = graphopt.capture(Cast().bfloat16(), (x,))
    _, optimized, _, _ = graphopt.optimize(ir.copy(), pipeline="cleanup", verify=False)
    assert optimized.op_counts()["aten.to"] == 2
    result = FuseNorms().run(optimized, PassContext())
    assert result.stats["rms_norm"] == 1
    assert optimized.op_counts() == {"aten.rms_norm": 1}
    [node] = optimized.call_nodes()
    assert node.args[0].op == "placeholder" and node.meta["val"].dtype == torch.bfloat16
    x2 = torch.randn(3, 7, H).bfloat16()
    torch.testing.assert_close(optimized.run([x2])[0], ir.run([x2])[0], rtol=1.6e-2, atol=1e-2)


class EpsFromInput(nn.Module):
    def forward(self, x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class EpsFromBuffer(nn.Module):
    """eps a one-element constant tensor: a constant scalar all the same (unless its shape widens
    the result's rank)."""

    def __init__(self, shape=(1,)):
        super().__init__()
        self.register_buffer("eps", torch.full(shape, 1e-6))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class EpsComputed(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + x.amax(-1, keepdim=True).abs() * 1e-6)


class MeanOverSequence(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)


class NoKeepdim(nn.Module):
    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1) + 1e-6).unsqueeze(-1)


@pytest.mark.parametrize("module, inputs", [
    (EpsFromInput(), (torch.randn(2, 5, H), torch.tensor(1e-6))),   # eps is a graph input
    (EpsComputed(), (torch.randn(2, 5, H),)),                       # eps is computed from x
    (EpsFromBuffer((1, 1, 1, 1)), (torch.randn(2, 5, H),)),         # eps broadcasts to rank 4
    (MeanOverSequence(), (torch.randn(2, 5, H),)),                  # reduces dim 1, not the features
    (NoKeepdim(), (torch.randn(2, 5, H),)),                         # mean without keepdim
], ids=["eps-input", "eps-computed", "eps-widens-rank", "mean-over-seq", "no-keepdim"])
def test_near_misses_left_alone(module, inputs):
    _, before, _, _ = graphopt.optimize(module, inputs, "cleanup", verify=False)
    after = before.copy()
    result = FuseNorms().run(after, PassContext())
    assert not result.changed and result.stats["rms_norm"] == result.stats["layer_norm"] == 0
    assert after.op_counts() == before.op_counts()


def test_eps_from_a_one_element_constant_tensor():
    _, optimized, stats = _optimize(EpsFromBuffer(), (torch.randn(2, 5, H),))
    assert stats["rms_norm"] == 1
    [norm] = optimized.call_nodes()
    assert norm.args[3] == pytest.approx(1e-6) and isinstance(norm.args[3], float)


def test_centering_over_another_dim_is_an_rms_norm_not_a_layer_norm():
    class Mixed(nn.Module):
        def forward(self, x):
            d = x - x.mean(-2, keepdim=True)          # centered over the sequence, normalized over H
            return d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)

    _, optimized, stats = _optimize(Mixed(), (torch.randn(2, 5, H),))
    assert stats["layer_norm"] == 0 and stats["rms_norm"] == 1
    [norm] = [n for n in optimized.call_nodes() if n.target is torch.ops.aten.rms_norm.default]
    assert norm.args[0].target is torch.ops.aten.sub.Tensor


def test_rewrite_limit_is_respected():
    _, before, _, _ = graphopt.optimize(Norms(), _inputs(0), "cleanup", verify=False)
    ctx = PassContext(rewrite_limit=1)
    result = FuseNorms().run(before, ctx)
    assert result.stats["rms_norm"] + result.stats["layer_norm"] == 1 and ctx.rewrites == 1


# -- real models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(sample_model_loader):
    model, inputs, dynamic = sample_model_loader("hf_llama").build()
    original, optimized, stats = _optimize(model, inputs, dynamic)
    return model, original, optimized, stats


def test_llama_norms(llama):
    model, original, optimized, stats = llama
    layers = model.config.num_hidden_layers
    assert stats["rms_norm"] == 2 * layers + 1 and stats["layer_norm"] == 0
    assert stats["residual_norm"] == 2 * layers         # every norm but the first reads a residual add
    assert optimized.op_counts()["aten.rms_norm"] == 2 * layers + 1
    for op in ("aten.pow", "aten.mean", "aten.rsqrt"):
        assert op not in optimized.op_counts(), op
    inputs = list(token_inputs(5, 3, 11).values())
    torch.testing.assert_close(optimized.run(inputs)[0], original.run(inputs)[0], rtol=1e-5, atol=1e-5)


def test_llama_lowers_to_rms_normalization(llama, tmp_path):
    model, _, optimized, _ = llama
    # batch 3: at opset 23 torch.onnx's own optimizer turns the (unfused) RoPE into RotaryEmbedding
    # with batch-1 caches, which the onnx backend must expand for ONNX Runtime to accept batch > 1
    ops = [n.op_type for n in lower_and_compare(optimized, model, token_inputs(6, 3, 9), tmp_path)]
    assert ops.count("RMSNormalization") == 2 * model.config.num_hidden_layers + 1
    assert "ReduceMean" not in ops


def test_gpt2_layer_norms_are_canonical(sample_model_loader):
    model, inputs, _ = sample_model_loader("hf_gpt2").build()
    _, optimized, stats = _optimize(model, inputs)
    layers = model.config.n_layer
    assert stats == {"rms_norm": 0, "layer_norm": 0, "canonical": 2 * layers + 1, "residual_norm": 2 * layers}
