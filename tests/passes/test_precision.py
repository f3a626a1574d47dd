"""precision: GEMMs/attention/embeddings in fp16 or bf16, fp32 islands for norms, softmax and
reductions, interface unchanged; verified by the reference policy (which can fail); a tiny HF Llama
and the real MiniLM-L6 lowered to the onnx and torch targets on CPU, checked on fresh inputs."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import VerificationError
from graphopt.ir.nodes import packet
from tests.conftest import load_sample_model
from tests.passes.conftest import llama_inputs

aten = torch.ops.aten
GEMMS = (aten.linear, aten.matmul, aten.scaled_dot_product_attention)
ISLANDS = (aten.rms_norm, aten.layer_norm, aten.softmax, aten._softmax, aten.mean, aten.pow, aten.rsqrt)


def _dtype(node):
    return node.meta["val"].dtype


@pytest.fixture(scope="module")
def llama_fp16(tiny_llama):
    original, optimized, report, _ = graphopt.optimize(tiny_llama.ir.copy(), pipeline="cleanup,precision")
    return original, optimized, report.passes[-1]


def test_expected_ops(llama_fp16):
    original, optimized, record = llama_fp16
    assert record["verify"]["passed"] and record["verify"]["policy"].startswith("reference(")
    stats = record["stats"]
    assert stats["weights_converted"] == 16 and stats["fp32_islands"] >= 5 and stats["casts"] > 0
    gemms = [n for n in optimized.call_nodes() if packet(n) in GEMMS]
    assert gemms and all(_dtype(n) == torch.float16 for n in gemms)
    data_gemms = [n for n in gemms if packet(n) is aten.linear]
    for n in data_gemms:   # every operand of a linear is fp16, weights stored in fp16
        assert all(_dtype(a) == torch.float16 for a in n.all_input_nodes), n.format_node()
    islands = [n for n in optimized.call_nodes() if packet(n) in ISLANDS]
    assert islands and all(_dtype(n) == torch.float32 for n in islands)
    assert all(_dtype(a) == torch.float32 for n in islands for a in n.all_input_nodes
               if a.meta["val"].is_floating_point())
    # rotary tables are not data: they stay fp32 (cos/sin of 255 × inv_freq in fp16 is off by 0.1 rad)
    assert all(_dtype(n) == torch.float32 for n in optimized.call_nodes() if packet(n) in (aten.cos, aten.sin))
    params = dict(optimized.graph_module.named_parameters())
    assert params["lm_head.weight"].dtype == torch.float16
    assert params["model.norm.weight"].dtype == torch.float32          # read only by the norm island
    assert [s.dtype for s in optimized.outputs] == [s.dtype for s in original.outputs] == ["float32"]
    assert optimized.meta["precision"]["dtype"] == "float16"
    assert optimized.meta["lowering_check"]["policy"] == "reference"


def test_numerics_on_fresh_inputs(tiny_llama, llama_fp16):
    original, optimized, _ = llama_fp16
    for seed in (11, 12):
        inputs = llama_inputs(seed)
        want, got = original.run(inputs)[0], optimized.run(inputs)[0]
        assert got.dtype == torch.float32
        rel = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
        assert 0 < rel < 5e-3, rel                          # fp16, not fp32, and close
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_policy_fails_when_the_tolerance_is_too_tight(tiny_llama):
    with pytest.raises(VerificationError, match="precision"):
        graphopt.optimize(tiny_llama.ir.copy(), pipeline="cleanup,precision(tol=1e-9)")


def test_bf16_on_the_torch_target(tiny_llama, tmp_path):
    art = graphopt.compile(tiny_llama.ir.copy(), pipeline="cleanup,fuse,precision(dtype=bf16)", target="torch",
                           out=tmp_path / "bf16", report=None)
    assert art.manifest["verification"]["passed"] is True
    assert art.report["lowering"]["verify"]["policy"].startswith("reference(")
    ids, mask = llama_inputs(21)
    got = graphopt.load(art.path)(input_ids=ids, attention_mask=mask)["logits"]
    with torch.no_grad():
        want = tiny_llama.model(input_ids=ids, attention_mask=mask).logits
    rel = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    assert 1e-4 < rel < 4e-2, rel                            # bf16: 8-bit mantissa


@pytest.mark.parametrize("target", ["onnx", pytest.param("torch", marks=pytest.mark.matrix)])
def test_minilm_fp16(tmp_path, target):
    """Real MiniLM-L6 weights: fuse + fp16 lowered to ONNX Runtime (CPU) or torch, fresh sentences."""
    minilm = load_sample_model("minilm")
    model, inputs, dynamic = minilm.build(batch=2)
    fresh = minilm.tokenize(["Precision lives in the graph for strongly typed engines.",
                             "A short one.", "Norms and softmax stay in fp32 while the GEMMs run in half precision."])
    with torch.no_grad():
        want = minilm.mean_pool(model(**fresh).last_hidden_state, fresh["attention_mask"])
    art = graphopt.compile(model, inputs, "cleanup,fuse,precision", target=target, out=tmp_path / target,
                           dynamic=dynamic, report=None, n_random=0)   # fresh sentences are checked below
    assert art.report["passes"][-1]["stats"]["low_precision_ops"] > 30
    out = graphopt.load(art.path)(**fresh)["last_hidden_state"]
    got = minilm.mean_pool(out.float(), fresh["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.9999, (target, cos)
    assert not torch.equal(got, want)
