"""fuse-rope: rotate-half RoPE → graphopt::rotary_embedding; near misses (wrong split, swapped
halves, interleaved, caches whose halves differ) left alone; the custom op against ONNX Runtime's
RotaryEmbedding and through torch.export save/load in a fresh process; the HF Llama through the
pipeline to ONNX (RotaryEmbedding) and torch; nanoGPT (no RoPE) untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from graphopt_fusion.fuse_rope import FuseRope
from graphopt_fusion.ops import rotary_embedding
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import graphopt
from graphopt.passes.base import PassContext
from tests.conftest import optimize_verified
from tests.passes.lowering import lower_and_compare, token_inputs

HEADS, KV_HEADS, D = 4, 2, 16
ROTARY = "graphopt.rotary_embedding"


def _angles(seq: int, d: int = D, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    return torch.outer(torch.arange(seq).float(), inv_freq)               # [seq, d/2]


class HFRope(nn.Module):
    """Llama's rotary embedding: cos/sin from positions at run time, HF's apply_rotary_pos_emb."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D), persistent=False)

    def forward(self, q, k):
        pos = torch.arange(q.shape[2]).float()[None, :, None]             # [1, S, 1]
        freqs = pos * self.inv_freq                                       # [1, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())


class ChunkRope(nn.Module):
    """Constant [S, D] caches broadcast over batch and heads; rotate_half by chunk."""

    def __init__(self, seq):
        super().__init__()
        emb = torch.cat((_angles(seq),) * 2, dim=-1)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())

    def forward(self, q):
        x1, x2 = q.chunk(2, dim=-1)
        return q * self.cos + torch.cat((-x2, x1), dim=-1) * self.sin


def _qk(seed, batch=2, seq=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HEADS, seq, D, generator=g), torch.randn(batch, KV_HEADS, seq, D, generator=g)


def _optimize(module, inputs, pipeline="cleanup,fuse-rope", dynamic=None):
    return optimize_verified(module, inputs, pipeline, dynamic)


@pytest.fixture(scope="module")
def hf_rope():
    dim = {0: (1, 8), 2: (2, 64)}
    return _optimize(HFRope(), _qk(0), dynamic={"q": dim, "k": dim})


def test_expected_ops(hf_rope):
    original, optimized, stats = hf_rope
    assert stats == {"rope": 2, "not_fused": 0}
    ops = optimized.op_counts()
    assert ops[ROTARY] == 2 and "aten.neg" not in ops and ops["aten.cat"] == 1   # the one building the cache
    assert ops["aten.slice"] == 2                                              # half caches, shared by q and k
    for node in optimized.call_nodes():
        if op_is_rotary(node):
            assert [str(s) for s in node.args[1].meta["val"].shape][-1] == str(D // 2)


def op_is_rotary(node):
    return node.target is torch.ops.graphopt.rotary_embedding.default


def test_numerics_on_fresh_shapes(hf_rope):
    original, optimized, _ = hf_rope
    for seed, (batch, seq) in ((1, (3, 11)), (2, (1, 2)), (3, (8, 64))):
        inputs = list(_qk(seed, batch, seq))
        for want, got in zip(original.run(inputs), optimized.run(inputs)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)   # same arithmetic, same order


def test_constant_caches_and_chunk():
    _, optimized, stats = _optimize(ChunkRope(6), _qk(0)[:1])
    assert stats == {"rope": 1, "not_fused": 0}
    [node] = [n for n in optimized.call_nodes() if op_is_rotary(n)]
    assert list(node.args[1].meta["val"].shape) == [1, 6, D // 2]


class WrongSplit(nn.Module):
    def forward(self, q, cos, sin):
        h = D // 2 - 2
        return q * cos + torch.cat((-q[..., h:], q[..., :h]), dim=-1) * sin


class Swapped(nn.Module):
    def forward(self, q, cos, sin):
        h = D // 2
        return q * cos + torch.cat((q[..., :h], -q[..., h:]), dim=-1) * sin


class Interleaved(nn.Module):
    """GPT-J: rotate every two; not the rotate-half form (left alone)."""

    def forward(self, q, cos, sin):
        rotated = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)
        return q * cos + rotated * sin


class AnyCache(nn.Module):
    """Rotate-half with caches given as inputs: nothing proves their halves are equal."""

    def forward(self, q, cos, sin):
        return apply_rotary_pos_emb(q, q, cos, sin)[0]


@pytest.mark.parametrize("module", [WrongSplit(), Swapped(), Interleaved(), AnyCache()],
                         ids=["wrong-split", "swapped-halves", "interleaved", "unproven-cache"])
def test_near_misses_left_alone(module):
    angles = torch.cat((_angles(6),) * 2, dim=-1)[None]                  # [1, S, D]
    cos, sin = angles.cos(), angles.sin()
    if not isinstance(module, AnyCache):
        cos, sin = cos[:, None], sin[:, None]                            # [1, 1, S, D]
    _, before, _, _ = graphopt.optimize(module, (_qk(0)[0], cos, sin), "cleanup", verify=False)
    after = before.copy()
    result = FuseRope().run(after, PassContext())
    assert not result.changed and after.op_counts() == before.op_counts()
    assert result.stats == {"rope": 0, "not_fused": int(isinstance(module, AnyCache))}


# -- the custom op ---------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
def test_op_matches_onnxruntime_rotary_embedding(interleaved):
    """The reference implementation agrees with ONNX Runtime's opset-23 RotaryEmbedding."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    b, s = 3, 5
    x = torch.randn(b, HEADS, s, D)
    ang = torch.randn(b, s, D // 2)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
          (("x", [b, HEADS, s, D]), ("cos", [b, s, D // 2]), ("sin", [b, s, D // 2]), ("y", [b, HEADS, s, D]))]
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], interleaved=int(interleaved))
    model = helper.make_model(helper.make_graph([node], "rope", io[:3], io[3:]),
                              opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x.numpy(), "cos": ang.cos().numpy(), "sin": ang.sin().numpy()})[0]
    got = rotary_embedding(x, ang.cos(), ang.sin(), interleaved)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


class CallsOp(nn.Module):
    def __init__(self, interleaved):
        super().__init__()
        self.interleaved = interleaved

    def forward(self, x, ang):
        return torch.ops.graphopt.rotary_embedding(x, ang.cos(), ang.sin(), self.interleaved) * 2


@pytest.mark.parametrize("interleaved, opset", [(False, 23), (True, 23), (False, 20), (True, 20)])
def test_op_lowers_to_onnx(tmp_path, interleaved, opset):
    """opset 23: one RotaryEmbedding (caches of batch 1 expanded); below: the decomposition."""
    x, ang = torch.randn(2, HEADS, 5, D), torch.randn(1, 5, D // 2)
    dynamic = {"x": {0: (1, 8), 2: (2, 32)}, "ang": {1: (2, 32)}}
    art = graphopt.compile(CallsOp(interleaved), (x, ang), pipeline="", target="onnx", out=tmp_path / "a",
                           dynamic=dynamic, report=None, target_options={"opset": opset})
    ops = {n.op_type for n in onnx.load(str(art.path / "model.onnx")).graph.node}
    assert ("RotaryEmbedding" in ops) == (opset >= 23)
    x2, ang2 = torch.randn(4, HEADS, 9, D), torch.randn(1, 9, D // 2)
    torch.testing.assert_close(graphopt.load(art.path)(x2, ang2), CallsOp(interleaved)(x2, ang2),
                               rtol=1e-5, atol=1e-5)


def test_op_survives_torch_export_save_and_load_in_a_fresh_process(tmp_path):
    x, ang = torch.randn(2, HEADS, 5, D), torch.randn(1, 5, D // 2)
    art = graphopt.compile(CallsOp(False), (x, ang), pipeline="", target="torch", out=tmp_path / "t", report=None)
    torch.save({"x": x, "ang": ang, "want": CallsOp(False)(x, ang)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, graphopt                      # nothing imports graphopt_fusion explicitly
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = graphopt.load({str(art.path)!r})(io["x"], io["ang"])
        assert torch.equal(got, io["want"]), (got - io["want"]).abs().max()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# -- real models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(sample_model_loader):
    model, inputs, dynamic = sample_model_loader("hf_llama").build()
    return (model, *_optimize(model, inputs, dynamic=dynamic))


def test_llama_rope(llama):
    model, original, optimized, stats = llama
    layers = model.config.num_hidden_layers
    assert stats == {"rope": 2 * layers, "not_fused": 0}                      # q and k of every layer
    ops = optimized.op_counts()
    assert ops[ROTARY] == 2 * layers and "aten.neg" not in ops
    inputs = list(token_inputs(5, 3, 11).values())
    torch.testing.assert_close(optimized.run(inputs)[0], original.run(inputs)[0], rtol=1e-5, atol=1e-5)


def test_llama_lowers_to_rotary_embedding(llama, tmp_path):
    """One RotaryEmbedding per q and k of every layer, whose cos/sin caches are expanded to the
    batch once for the whole graph (from the inputs' named batch dim), not once per node; the
    artifact matches the module at another batch and length."""
    model, _, optimized, _ = llama
    nodes = lower_and_compare(optimized, model, token_inputs(6, 3, 9), tmp_path)
    ops = [n.op_type for n in nodes]
    assert ops.count("RotaryEmbedding") == 2 * model.config.num_hidden_layers and "Neg" not in ops
    made = {o: n for n in nodes for o in n.output}
    caches = {i for n in nodes if n.op_type == "RotaryEmbedding" for i in n.input[1:3]}
    assert len(caches) == 2 and all(made[c].op_type == "Expand" for c in caches)


def test_nanogpt_has_no_rope(sample_model_loader):
    model, inputs, _ = sample_model_loader("nanogpt").build()
    _, _, stats = _optimize(model, inputs)
    assert stats == {"rope": 0, "not_fused": 0}
