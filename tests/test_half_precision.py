"""Half-precision models (fp16 / bf16, converted with ``model.to(dtype)``) on every target.

- fp16/bf16 × onnx/torch compile with verification on, and ``graphopt.load(out)(**inputs)``
  matches the module on fresh random tokens (other batch and length, left padding) within the
  rule the lowering check uses: error vs an fp64 run of the same weights <= 3 x the module's own;
- the onnx target computes a bf16 graph in fp32 (ONNX Runtime's CPU provider has no bf16
  MatMul), says so (note, payload, ``graphopt inspect``), never touches the compiler's bf16 IR,
  and still takes and returns bf16 tensors;
- example inputs/outputs of dtypes numpy lacks are stored as raw bits with their dtype in the
  manifest and come back as bf16 tensors (``Engine.example_inputs()``, ``graphopt run``);
- the dtype-aware lowering check still catches a wrong artifact.

Models are tiny Qwen2 / Llama built from configs (nothing downloaded). Each compile costs ~15 s of
CPU (torch.export, per-pass verification, the ONNX exporter), so the default run compiles three
that between them cover both dtypes, both targets, both pipelines and both families; the full
dtype x target x pipeline matrix on the reported Qwen2 configuration is marked ``matrix``
(``pytest -m matrix tests/test_half_precision.py``).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.errors import ArtifactError, BackendError, VerificationError
from graphopt.runtime.arrays import from_stored, to_storable
from tests.conftest import load_sample_model

DYNAMIC = {"input_ids": {0: (1, 8), 1: (1, 64)}, "attention_mask": {0: (1, 8), 1: (1, 64)}}
_ARTIFACTS: dict[tuple, tuple] = {}


def qwen2(dtype: torch.dtype, layers: int = 2) -> torch.nn.Module:
    """The configuration of the report (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 256, sdpa)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval().to(dtype)


def token_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 256, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


def compiled(tmp_path_factory, dtype: torch.dtype, target: str, pipeline: str, family: str = "qwen2",
             layers: int = 1):
    """(model, artifact) compiled once per session for each combination."""
    key = (dtype, target, pipeline, family, layers)
    if key not in _ARTIFACTS:
        if family == "qwen2":  # examples batch 2 x seq 8, as reported
            model, inputs, dynamic = qwen2(dtype, layers), token_inputs(2, 8, seed=1), DYNAMIC
        else:
            model, inputs, dynamic = load_sample_model("hf_llama").build(
                attn_implementation="sdpa", num_hidden_layers=layers, seq_len=8)
            model = model.to(dtype)
        out = tmp_path_factory.mktemp(f"{family}{layers}-{str(dtype)[6:]}-{target}-{pipeline.replace(',', '-')}") / "art"
        art = graphopt.compile(model, inputs, pipeline=pipeline, target=target, out=out, dynamic=dynamic,
                               report=None)
        _ARTIFACTS[key] = (model, art)
    return _ARTIFACTS[key]


def rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x.double() - ref.double()) ** 2).mean().sqrt())


def check_matches_the_module(model: torch.nn.Module, art, dtype: torch.dtype) -> None:
    check = art.report["lowering"]["verify"]
    assert check["passed"] and check["policy"].startswith("reference("), check   # dtype-aware, not fp32 allclose
    eng = graphopt.load(art.path)
    inputs = token_inputs(3, 13, seed=7)      # fresh tokens, another batch and length than the example
    inputs["attention_mask"][0, :5] = 0       # a left-padded row
    got = eng(**inputs)["logits"]
    with torch.no_grad():
        want = model(**inputs).logits
        exact = copy.deepcopy(model).double()(**inputs).logits   # the same weights, computed in fp64
    assert got.dtype == dtype and got.shape == want.shape       # the model's own dtype comes back
    own = rms(want, exact)
    assert rms(got, exact) <= 3 * own + torch.finfo(dtype).eps / 64, (rms(got, exact), own)
    # and elementwise: a few ulps of the logits' scale (fp32 compute vs the module's half rounding)
    assert float((got.double() - want.double()).abs().max()) <= 8 * torch.finfo(dtype).eps * float(want.abs().max())


#: (dtype, target, pipeline, family): every dtype, target, pipeline and family at least once
FAST = [(torch.bfloat16, "onnx", "cleanup,fuse", "qwen2"),
        (torch.bfloat16, "torch", "cleanup", "llama"),
        (torch.float16, "onnx", "cleanup", "qwen2")]
#: the reported Qwen2 (2 layers) on every dtype x target x pipeline, and Llama bf16 on both targets
MATRIX = [(dt, target, pipeline, "qwen2") for dt in (torch.bfloat16, torch.float16) for target in ("onnx", "torch")
          for pipeline in ("cleanup,fuse", "cleanup")] + [(torch.bfloat16, t, "cleanup,fuse", "llama")
                                                         for t in ("onnx", "torch")]


def _id(case: tuple) -> str:
    return "-".join(str(v).replace("torch.", "") for v in case)


@pytest.mark.parametrize("dtype,target,pipeline,family", FAST, ids=[_id(c) for c in FAST])
def test_half_model_matches_the_module(tmp_path_factory, dtype, target, pipeline, family):
    model, art = compiled(tmp_path_factory, dtype, target, pipeline, family)
    check_matches_the_module(model, art, dtype)


@pytest.mark.matrix
@pytest.mark.parametrize("dtype,target,pipeline,family", MATRIX, ids=[_id(c) for c in MATRIX])
def test_half_matrix(tmp_path_factory, dtype, target, pipeline, family):
    model, art = compiled(tmp_path_factory, dtype, target, pipeline, family, layers=2)
    check_matches_the_module(model, art, dtype)


def test_bf16_onnx_computes_in_fp32_and_says_so(tmp_path_factory, capsys):
    model, art = compiled(tmp_path_factory, torch.bfloat16, "onnx", "cleanup,fuse")
    assert next(model.parameters()).dtype == torch.bfloat16        # the user's module is untouched
    payload = art.manifest["payload"]
    assert payload["compute_dtype"] == "float32" and payload["source_dtype"] == "bfloat16"
    assert art.manifest["outputs"][0]["dtype"] == "bfloat16"      # the interface stays the model's
    notes = json.loads((art.path / "report.json").read_text())["lowering"]["notes"]
    assert any(n.startswith("bf16 graph computed in fp32 on ONNX Runtime CPU") and "MiB" in n for n in notes), notes
    m = onnx.load(str(art.path / "model.onnx"))
    bf16 = onnx.TensorProto.BFLOAT16
    assert not [t.name for t in m.graph.initializer if t.data_type == bf16]
    assert all(v.type.tensor_type.elem_type != bf16 for v in (*m.graph.input, *m.graph.output))
    assert any(t.data_type == onnx.TensorProto.FLOAT for t in m.graph.initializer)
    assert main(["inspect", str(art.path)]) == 0
    assert "computes in: float32" in capsys.readouterr().out


def test_bf16_examples_are_stored_as_raw_bits_and_replayed(tmp_path_factory, capsys, tmp_path):
    for target, pipeline, family in (("onnx", "cleanup,fuse", "qwen2"), ("torch", "cleanup", "llama")):
        _, art = compiled(tmp_path_factory, torch.bfloat16, target, pipeline, family)
        assert art.manifest["examples"]["dtypes"] == {"logits": "bfloat16"}
        with np.load(art.path / "expected_outputs.npz") as z:
            assert z["logits"].dtype == np.uint16                      # the bits, not a lossy float copy
        eng = graphopt.load(art.path)
        expected = eng.expected_outputs()["logits"]
        assert isinstance(expected, torch.Tensor) and expected.dtype == torch.bfloat16
        assert expected.abs().max() > 0                                # real values, not reinterpreted zeros
        assert isinstance(eng.example_inputs()["input_ids"], np.ndarray)  # numpy where numpy can
        out = tmp_path / f"{target}.npz"
        assert main(["run", str(art.path), "--output", str(out)]) == 0
        text = capsys.readouterr().out
        assert "logits: bfloat16" in text and "(ok" in text, text
        with np.load(out) as z:
            assert z["logits"].dtype == np.float32
            assert np.array_equal(z["logits"], eng(**eng.example_inputs())["logits"].float().numpy())


class FloatIn(torch.nn.Module):
    """A float input and two float outputs: bf16 crosses the runtime boundary both ways."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        return {"y": torch.nn.functional.silu(h), "z": h.float().sum(-1)}


@pytest.fixture(scope="module")
def float_in_bf16(tmp_path_factory):
    torch.manual_seed(0)
    model = FloatIn().eval().to(torch.bfloat16)
    x = torch.randn(2, 16).bfloat16()
    arts = {t: graphopt.compile(model, (x,), pipeline="cleanup", target=t, dynamic={"x": {0: (1, 8)}},
                                out=tmp_path_factory.mktemp(f"floatin-{t}") / "art", report=None)
            for t in ("onnx", "torch")}
    return model, arts


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_bf16_inputs_accepted_as_torch_numpy_or_ml_dtypes(float_in_bf16, target):
    import ml_dtypes

    model, arts = float_in_bf16
    art = arts[target]
    assert art.manifest["examples"]["dtypes"] == {"x": "bfloat16", "y": "bfloat16"}   # z is fp32
    eng = graphopt.load(art.path)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(9)).bfloat16()
    with torch.no_grad():
        want = model(x)
    for given in (x, x.float().numpy(), x.float().numpy().astype(ml_dtypes.bfloat16)):
        got = eng(given)
        assert got["y"].dtype == torch.bfloat16 and got["z"].dtype == torch.float32
        assert torch.allclose(got["y"].float(), want["y"].float(), rtol=2 ** -7, atol=1e-2)
        assert torch.allclose(got["z"], want["z"], rtol=1e-2, atol=1e-2)
    assert isinstance(eng.example_inputs()["x"], torch.Tensor) and eng.example_inputs()["x"].dtype == torch.bfloat16


def test_half_lowering_check_still_catches_a_wrong_artifact(tmp_path, monkeypatch):
    from graphopt.runtime.onnx_runner import OnnxRuntimeRunner

    run = OnnxRuntimeRunner.run
    monkeypatch.setattr(OnnxRuntimeRunner, "run", lambda self, inputs: [o * 1.03 for o in run(self, inputs)])
    torch.manual_seed(0)
    model = FloatIn().eval().to(torch.bfloat16)
    with pytest.raises(VerificationError, match="error vs fp64"):
        graphopt.compile(model, (torch.randn(2, 16).bfloat16(),), pipeline="cleanup", target="onnx",
                         out=tmp_path / "wrong", report=None)


def test_lowering_policy_follows_the_dtype():
    from graphopt.backends.onnx import OnnxBackend
    from graphopt.verify.lowering import lowering_policy
    from graphopt.verify.policies import AllClose, Reference

    x = torch.randn(2, 16)
    fp32 = graphopt.capture(FloatIn().eval(), (x,))
    assert isinstance(lowering_policy(OnnxBackend(), fp32), AllClose)
    for dtype in (torch.float16, torch.bfloat16):
        ir = graphopt.capture(FloatIn().eval().to(dtype), (x.to(dtype),))
        policy = lowering_policy(OnnxBackend(), ir)
        assert isinstance(policy, Reference) and policy.tol == torch.finfo(dtype).eps / 64


def test_upcast_works_on_a_copy():
    from graphopt.backends.onnx import upcast_bfloat16

    class Factories(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            ramp = torch.arange(8, dtype=torch.bfloat16) + torch.ones(8, dtype=torch.bfloat16)
            return (x @ self.w + ramp).to(torch.bfloat16)

    m = Factories().eval().bfloat16()
    ir = graphopt.capture(m, (torch.randn(3, 8).bfloat16(),))
    before = {n: (t, t.dtype) for n, t in ir.graph_module.named_parameters()}
    low, added = upcast_bfloat16(ir)
    assert added == 8 * 8 * 2
    assert all(t.dtype == torch.float32 for t in low.graph_module.parameters())
    assert {n: (t, t.dtype) for n, t in ir.graph_module.named_parameters()} == before      # original untouched
    assert [s.dtype for s in low.inputs + low.outputs] == ["float32", "float32"]
    assert [s.dtype for s in ir.inputs + ir.outputs] == ["bfloat16", "bfloat16"]
    assert not any(a is torch.bfloat16 for n in low.graph.nodes for a in [*n.args, *n.kwargs.values()])
    x = torch.randn(5, 8)
    got = low.graph_module(x)[0]
    assert got.dtype == torch.float32
    want = x @ m.w.detach().float() + torch.arange(1, 9).float()   # fp32 arithmetic on the bf16 weights
    assert torch.allclose(got, want, atol=1e-5)
    assert upcast_bfloat16(graphopt.capture(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),))) is None


def test_upcast_refuses_bit_reinterpretation():
    from graphopt.backends.onnx import upcast_bfloat16

    class Bits(torch.nn.Module):
        def forward(self, x):
            return x.view(torch.int16) + 1

    ir = graphopt.capture(Bits().eval(), (torch.randn(2, 4).bfloat16(),))
    with pytest.raises(BackendError, match="bfloat16='keep'"):
        upcast_bfloat16(ir)


def test_raw_bit_storage_round_trips_and_refuses_a_mismatch():
    x = torch.randn(3, 5).bfloat16()
    arr, name = to_storable(x)
    assert arr.dtype == np.uint16 and name == "bfloat16"
    assert torch.equal(from_stored("x", arr, name), x)
    assert to_storable(torch.ones(2))[1] is None
    with pytest.raises(ArtifactError, match="raw"):
        from_stored("x", np.ones(3, np.float32), "bfloat16")
    with pytest.raises(ArtifactError, match="cannot read"):
        from_stored("x", arr, "bfloat7")


@pytest.mark.matrix  # one more compile (~1 min here); a tracker for the lead's fix
@pytest.mark.xfail(strict=False, reason="bf16 + kv-cache: the kv-cache equivalence check (graphopt_kvcache/decoding.py, "
                   "owned by the lead) holds bf16 to fp32 tolerances, and generation.py's ONNX Runtime "
                   "IOBinding path calls .numpy() on bf16 cache tensors")
def test_bf16_kv_cache_generates_like_the_module(tmp_path):
    model, inputs, dynamic = load_sample_model("hf_llama").build(attn_implementation="sdpa", seq_len=8)
    model = model.to(torch.bfloat16)
    art = graphopt.compile(model, inputs, pipeline="cleanup,fuse,kv-cache", target="onnx", out=tmp_path / "kv",
                           dynamic=dynamic, report=None)
    prompt = token_inputs(1, 6, seed=4)["input_ids"]
    got = graphopt.load(art.path).generate(prompt, max_new_tokens=4)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids)
