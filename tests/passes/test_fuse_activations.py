"""fuse-activations: GELU (erf, tanh) and SiLU spelled out → aten.gelu / aten.silu; near misses
(wrong constants, other operands) left alone; SwiGLU counted before and after merge-gemms; GPT-2's
gelu_new through the pipeline to ONNX (Gelu) and torch; MiniLM's and Llama's activations canonical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from graphopt_fusion.fuse_activations import FuseActivations
from torch import nn
from transformers.activations import FastGELUActivation, NewGELUActivation

import graphopt
from graphopt.passes.base import PassContext
from tests.conftest import optimize_verified
from tests.passes.lowering import lower_and_compare, token_inputs

H = 16
SPELLED_OUT = ("aten.erf", "aten.tanh", "aten.sigmoid", "aten.pow")


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(H, 32, bias=False), nn.Linear(H, 32, bias=False)

    def forward(self, x):
        a = 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))                       # gelu, erf form
        b = (x + 1) * 0.5 * (1.0 + torch.erf((x + 1) * 0.7071067811865476))     # same, other association
        c = NewGELUActivation()(x + 2)                                          # GPT-2 gelu_new
        d = FastGELUActivation()(x + 3)                                         # x*0.798*(1 + 0.0447*x*x)
        e = (x + 4) * torch.sigmoid(x + 4)                                      # silu
        f = F.silu(self.gate(x)) * self.up(x)                                   # swiglu (canonical silu)
        return a, b, c, d, e, f, F.gelu(x + 5)                                  # canonical gelu


def _inputs(seed, batch=2, seq=5):
    return (torch.randn(batch, seq, H, generator=torch.Generator().manual_seed(seed)) * 3,)


def _optimize(module, inputs, pipeline="cleanup,fuse-activations", dynamic=None):
    return optimize_verified(module, inputs, pipeline, dynamic)


@pytest.fixture(scope="module")
def activations():
    return _optimize(Activations(), _inputs(0), dynamic={"x": {0: (1, 8), 1: (2, 64)}})


def test_expected_ops(activations):
    _, optimized, stats = activations
    assert stats == {"gelu_erf": 2, "gelu_tanh": 2, "silu": 1, "canonical": 2, "swiglu": 1, "geglu": 0}
    ops = optimized.op_counts()
    assert ops["aten.gelu"] == 5 and ops["aten.silu"] == 2
    for op in SPELLED_OUT:
        assert op not in ops, op
    approx = sorted(n.kwargs.get("approximate", "none") for n in optimized.call_nodes()
                    if n.target is torch.ops.aten.gelu.default)
    assert approx == ["none", "none", "none", "tanh", "tanh"]


def test_numerics_on_fresh_shapes(activations):
    original, optimized, _ = activations
    for seed, (batch, seq) in ((1, (3, 11)), (2, (1, 2)), (3, (8, 33))):
        inputs = list(_inputs(seed, batch, seq))
        for want, got in zip(original.run(inputs), optimized.run(inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class NearMisses(nn.Module):
    def forward(self, x):
        return (0.5 * x * (1 + torch.erf(x / 1.5)),                                           # wrong 1/sqrt(2)
                0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.045 * x ** 3))),   # wrong 0.044715
                0.6 * x * (1 + torch.erf(x / math.sqrt(2.0))),                                # wrong 0.5
                (x - 1) * torch.sigmoid(x),                                                   # x - 1 is not x
                x * torch.sigmoid(1.702 * x),                                                 # quick-gelu, not silu
                x * torch.sigmoid(x.flip(-1)))                                                # another tensor


def test_near_misses_left_alone():
    _, before, _, _ = graphopt.optimize(NearMisses(), _inputs(0), "cleanup", verify=False)
    after = before.copy()
    result = FuseActivations().run(after, PassContext())
    assert not result.changed and after.op_counts() == before.op_counts()
    assert result.stats == {"gelu_erf": 0, "gelu_tanh": 0, "silu": 0, "canonical": 0, "swiglu": 0, "geglu": 0}


def test_swiglu_is_recognized_after_merge_gemms():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(H, 32), nn.Linear(H, 32), nn.Linear(32, H)

        def forward(self, x):
            h = self.gate(x)
            return self.down(h * torch.sigmoid(h) * self.up(x))   # silu spelled out, then the gate

    _, optimized, stats = _optimize(Mlp(), _inputs(0), "cleanup,merge-gemms,fuse-activations")
    assert stats["silu"] == 1 and stats["swiglu"] == 1
    assert optimized.op_counts()["aten.split_with_sizes"] == 1


def test_rewrite_limit_is_respected():
    _, before, _, _ = graphopt.optimize(Activations(), _inputs(0), "cleanup", verify=False)
    ctx = PassContext(rewrite_limit=2)
    result = FuseActivations().run(before, ctx)
    assert result.stats["gelu_erf"] + result.stats["gelu_tanh"] + result.stats["silu"] == 2 and ctx.rewrites == 2


# -- real models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(sample_model_loader):
    model, inputs, dynamic = sample_model_loader("hf_gpt2").build()
    return (model, *_optimize(model, inputs, dynamic=dynamic))


def test_gpt2_gelu_new(gpt2):
    model, original, optimized, stats = gpt2
    assert stats["gelu_tanh"] == model.config.n_layer and stats["gelu_erf"] == stats["silu"] == 0
    assert "aten.tanh" not in optimized.op_counts() and "aten.pow" not in optimized.op_counts()
    inputs = list(token_inputs(3, 3, 11).values())
    torch.testing.assert_close(optimized.run(inputs)[0], original.run(inputs)[0], rtol=1e-5, atol=1e-5)


def test_gpt2_lowers_to_gelu(gpt2, tmp_path):
    model, _, optimized, _ = gpt2
    nodes = lower_and_compare(optimized, model, token_inputs(4, 3, 9), tmp_path)
    gelus = [n for n in nodes if n.op_type == "Gelu"]
    assert len(gelus) == model.config.n_layer and "Tanh" not in {n.op_type for n in nodes}
    assert all(a.s == b"tanh" for n in gelus for a in n.attribute if a.name == "approximate")
    assert sum(n.op_type == "LayerNormalization" for n in nodes) == 2 * model.config.n_layer + 1


def test_minilm_gelu_is_canonical(sample_model_loader):
    model, inputs, _ = sample_model_loader("minilm").build()
    _, optimized, stats = _optimize(model, inputs)
    layers = model.config.num_hidden_layers
    assert stats == {"gelu_erf": 0, "gelu_tanh": 0, "silu": 0, "canonical": layers, "swiglu": 0, "geglu": 0}
    assert optimized.op_counts()["aten.tanh"] == 1   # the pooler's tanh is no GELU


def test_llama_swiglu(sample_model_loader):
    model, inputs, _ = sample_model_loader("hf_llama").build()
    _, _, stats = _optimize(model, inputs, "cleanup,merge-gemms,fuse-activations")
    layers = model.config.num_hidden_layers
    assert stats == {"gelu_erf": 0, "gelu_tanh": 0, "silu": 0, "canonical": layers, "swiglu": layers, "geglu": 0}
