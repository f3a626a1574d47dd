"""graphopt-quant: observers, calibrate, quantize (every scheme), the accuracy guard, lowering."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt.errors import PassError, PassOptionError
from graphopt.passes.pipeline import PassSpec
from graphopt.verify.metrics import token_cosine

QDQ = "graphopt.quantize_dequantize"
DQ = "graphopt.dequantize_linear"


def run_pipeline(ir, specs, verify=False):
    """Numerics are checked by each test on fresh inputs; the full per-pass verification (and the
    lowering check) runs in the compile fixture below, once."""
    _, out, report, _ = graphopt.optimize(ir.copy(), pipeline=specs, verify=verify)
    return out, report


def calib_sets(tiny_llama, n=4):
    return [{"input_ids": tiny_llama.inputs(100 + i)[0]} for i in range(n)]


def specs(tiny_llama, **quant):
    return [PassSpec("calibrate", {"calib": calib_sets(tiny_llama), "observer": quant.pop("observer", "minmax"),
                                   "batch_size": 2}),
            PassSpec("quantize", quant)]


def cosine(a, b, tiny_llama, seed=7):
    inputs = tiny_llama.inputs(seed)
    return token_cosine(a.run(inputs)[0], b.run(inputs)[0])["worst"]


# -- observers ---------------------------------------------------------------------------------
def test_observers_clip_outliers_and_are_deterministic():
    from graphopt_quant.observers import OBSERVERS, Observer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[0] = 60.0  # one outlier
    amax = {}
    for m in OBSERVERS:
        obs = Observer()
        obs.update_max(x)
        obs.update_hist(x)
        amax[m] = obs.amax(m, percentile=99.9)
        again = Observer()
        again.update_max(x)
        again.update_hist(x)
        assert again.amax(m, percentile=99.9) == amax[m]
    assert amax["minmax"] == 60.0
    for m in ("percentile", "entropy"):
        assert 1.0 < amax[m] < 20.0, (m, amax[m])
    # MSE keeps a lone far outlier (clipping it costs more than coarser steps), but clips a Gaussian's tail
    assert amax["mse"] < 60.0
    obs = Observer()
    obs.update_max(x[1:])
    obs.update_hist(x[1:])
    assert obs.amax("mse") < obs.max


# -- calibrate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis, block_size", [
    ((70, 24), 0, 32),    # a last, shorter block
    ((64, 24), 0, 32),
    ((24, 70), 1, 16),    # blocks along the inner axis
    ((5, 70, 3), 1, 16),
    ((64, 24), 0, 0),     # per channel
    ((24, 64), 1, 0),
    ((30, 8), 0, 64),     # one block shorter than block_size
])
def test_dequantize_linear_is_q_times_the_repeated_scale(shape, axis, block_size):
    """The op scales one float copy of q in place through a block view (no expanded scale, no
    second product tensor); the values are exactly q * scale repeated over each block."""
    import graphopt_quant.ops  # noqa: F401 - registers the op

    g = torch.Generator().manual_seed(sum(shape) + block_size)
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)
    n = shape[axis]
    rows = -(-n // block_size) if block_size else n
    scale = torch.rand(*(rows if i == axis else (1 if block_size == 0 else d) for i, d in enumerate(shape)),
                       generator=g) + 0.1
    if block_size == 0:
        scale = scale.flatten()
        want = q.float() * scale.reshape([n if i == axis else 1 for i in range(q.dim())])
    else:
        want = q.float() * scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, n)
    got = torch.ops.graphopt.dequantize_linear(q, scale, axis, block_size)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("fmt, block_size, reduce_range", [
    ("int4", 32, False), ("int4", 64, False), ("int8", 0, False), ("int8", 0, True), ("float8_e4m3fn", 0, False)])
def test_weights_quantized_in_chunks_are_bit_identical(monkeypatch, fmt, block_size, reduce_range):
    """Output channels are quantized in chunks (bounded transient memory on a 1 GiB lm_head):
    many small chunks give exactly the values and scales of one chunk."""
    from graphopt_quant import core

    w = torch.randn(70, 100, generator=torch.Generator().manual_seed(9))
    whole = core.quantize_weight(w, fmt, block_size, reduce_range)
    monkeypatch.setattr(core, "_CHUNK_ELEMENTS", 700)  # 7 output channels per chunk
    chunked = core.quantize_weight(w, fmt, block_size, reduce_range)
    for a, b in zip(whole, chunked):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.int8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.int8) if b.dtype == torch.float8_e4m3fn else b)
        else:
            assert a == b


def test_calibrate_twice_gives_identical_scales(tiny_llama):
    a, _ = run_pipeline(tiny_llama.ir, specs(tiny_llama, scheme="w8a8", observer="entropy")[:1])
    b, _ = run_pipeline(tiny_llama.ir, specs(tiny_llama, scheme="w8a8", observer="entropy")[:1])
    ca, cb = json.loads(a.meta["artifact_files"]["calibration.json"]), json.loads(b.meta["artifact_files"]["calibration.json"])
    assert ca["layers"] == cb["layers"] and ca["key"] == cb["key"] and len(ca["layers"]) > 0


def test_quantize_without_calibrate_is_a_clear_error(tiny_llama):
    with pytest.raises(PassError, match="put calibrate"):
        run_pipeline(tiny_llama.ir, [PassSpec("quantize", {"scheme": "w8a8"})])
    with pytest.raises(PassOptionError, match="scheme"):
        run_pipeline(tiny_llama.ir, [PassSpec("quantize", {"scheme": "int3"})])


# -- schemes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, extra, min_cos", [
    ("w8a8", {}, 0.99),
    pytest.param("smoothquant", {"alpha": 0.5}, 0.99, marks=pytest.mark.matrix),
    pytest.param("int8-weight", {}, 0.999, marks=pytest.mark.matrix),
    ("int4-weight", {"block_size": 32}, 0.95),
    pytest.param("fp8", {}, 0.98, marks=pytest.mark.matrix),
])
def test_scheme_rewrites_and_stays_close(tiny_llama, scheme, extra, min_cos):
    out, report = run_pipeline(tiny_llama.ir, specs(tiny_llama, scheme=scheme, **extra))
    ops = out.op_counts()
    assert ops.get(DQ, 0) > 0
    # the lm_head stays float (default), except with int4-weight (lm_head=auto quantizes it there)
    head_float = scheme != "int4-weight"
    assert ops.get("aten.linear", 0) == int(head_float)
    assert (ops.get(QDQ, 0) > 0) == (scheme in ("w8a8", "smoothquant", "fp8"))
    assert cosine(tiny_llama.ir, out, tiny_llama) >= min_cos
    q = out.meta["quantization"]
    assert q["quantized"] == 15 - head_float and any("lm_head" in s for s in q["skipped"]) == head_float
    assert all(np.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 5 for r in q["layers"])
    if scheme == "int4-weight":
        qw = [t for n, t in out.graph_module.named_buffers() if n.endswith("_qweight")]
        assert all(t.dtype == torch.int8 and int(t.min()) >= -8 and int(t.max()) <= 7 for t in qw)


@pytest.mark.parametrize("scheme, lm_head, quantized", [
    ("int4-weight", "float", False),
    ("int8-weight", "quantize", True),
    ("int8-weight", "auto", False),
])
def test_lm_head_option(tiny_llama, scheme, lm_head, quantized):
    out, _ = run_pipeline(tiny_llama.ir, [PassSpec("quantize", {"scheme": scheme, "lm_head": lm_head})])
    q = out.meta["quantization"]
    assert any("lm_head" in s for s in q["skipped"]) != quantized
    assert out.op_counts().get("aten.linear", 0) == int(not quantized)
    with pytest.raises(PassOptionError, match="lm_head"):
        run_pipeline(tiny_llama.ir, [PassSpec("quantize", {"scheme": scheme, "lm_head": "yes"})])


def test_int4_quantizes_a_tied_lm_head_and_the_embedding_keeps_its_table():
    """A tied lm_head is named after the embedding table (which the default patterns skip): with
    int4-weight it is quantized, the embedding lookup still reads the float table, and the model
    stays close."""
    from graphopt.model_loader import load_factory

    model, ex, dyn = load_factory("samples/models/hf_llama.py:build")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    ir = graphopt.capture(model, ex, dyn)
    out, _ = run_pipeline(ir, [PassSpec("quantize", {"scheme": "int4-weight", "block_size": 32})])
    q = out.meta["quantization"]
    assert q["skipped"] == [] and out.op_counts().get("aten.linear", 0) == 0
    emb = next(n for n in out.graph.nodes if n.target is torch.ops.aten.embedding.default)
    table = out.graph_module.get_parameter(emb.args[0].target) if emb.args[0].op == "get_attr" else None
    assert table is model.model.embed_tokens.weight  # the float table, shared, untouched
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = out.run([ids, mask])[0]
    assert token_cosine(want, got)["worst"] > 0.95


def test_smoothquant_folds_into_norms(tiny_llama):
    _, fused, _, _ = graphopt.optimize(tiny_llama.ir.copy(), pipeline="fuse-norms", verify=False)
    out, _ = run_pipeline(fused, specs(tiny_llama, scheme="smoothquant"))
    muls = [n for n in out.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.mul.Tensor
            and any(isinstance(a, torch.fx.Node) and str(a.target).endswith("_smooth_inv") for a in n.args)]
    norms_feeding_qdq = [n for n in out.graph.nodes if n.target is torch.ops.aten.rms_norm.default
                         and any(u.target is torch.ops.graphopt.quantize_dequantize.default for u in n.users)]
    assert norms_feeding_qdq, "the smoothing factor was not folded into any RMSNorm"
    assert len(muls) < 14


# -- accuracy guard ------------------------------------------------------------------------------
def test_guard_falls_back_most_damaging_layers(tiny_llama):
    out, _ = run_pipeline(tiny_llama.ir, specs(tiny_llama, scheme="int4-weight", block_size=128,
                                               min_cosine=0.9995))
    q = out.meta["quantization"]
    assert q["fallback"], "a tight bound must send some layers back to float"
    assert q["guard"]["quantized"]["worst_cosine"] >= 0.9995
    damages = [r["damage"] for r in q["layers"]]
    assert damages == sorted(damages, reverse=True)
    assert q["fallback"] == [r["layer"] for r in q["layers"][: len(q["fallback"])]]
    with pytest.raises(PassError, match="accuracy bound does not hold"):
        run_pipeline(tiny_llama.ir, specs(tiny_llama, scheme="int4-weight", min_cosine=0.99999999, max_fallback=1))


# -- lowering --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w8a8_artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "w8a8"
    pipe = specs(tiny_llama, scheme="w8a8", activations="uint8", reduce_range=True)
    art = graphopt.compile(tiny_llama.ir.copy(), pipeline=pipe, target="onnx", out=out, report=None)
    return art, pipe


def test_onnx_runtime_runs_int8_kernels(w8a8_artifact, tiny_llama):
    import onnxruntime as ort

    art, _ = w8a8_artifact
    model = onnx.load(str(art.path / "model.onnx"))
    kinds = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(art.path.parent / "ort_optimized.onnx")
    ort.InferenceSession(str(art.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    assert "MatMulIntegerToFloat" in fused or "QLinearMatMul" in fused, fused
    eng = graphopt.load(art.path)
    ids, mask = tiny_llama.inputs(11)
    got = eng(input_ids=ids, attention_mask=mask)["logits"]
    assert token_cosine(tiny_llama.ir.run([ids, mask])[0], got)["worst"] > 0.98


def test_calibration_is_saved_and_reused(w8a8_artifact, tiny_llama):
    art, pipe = w8a8_artifact
    saved = json.loads((art.path / "calibration.json").read_text())
    assert "calibration.json" in art.manifest["pass_files"] and saved["layers"]
    again = graphopt.compile(tiny_llama.ir.copy(), pipeline=pipe, target="onnx", out=art.path, report=None)
    calib = next(r for r in again.report["passes"] if r["name"] == "calibrate")
    assert calib["stats"]["reused"] == 1


def test_fp8_onnx_follows_tensorrt_rules(tiny_llama, tmp_path):
    out = tmp_path / "fp8"
    graphopt.compile(tiny_llama.ir.copy(), pipeline=specs(tiny_llama, scheme="fp8"), target="onnx", out=out,
                     verify=False, report=None)
    model = onnx.load(str(out / "model.onnx"))
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consts.update({i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer})
    qs = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qs
    for n in qs:
        scale = consts.get(n.input[1])
        if scale is not None:
            assert (np.asarray(scale, dtype=np.float32) > 0).all(), n.name
        if len(n.input) > 2 and n.input[2] in consts:
            assert not np.asarray(consts[n.input[2]], dtype=np.float32).any(), f"{n.name}: zero point != 0"
        if n.op_type == "QuantizeLinear":  # activations: per tensor
            assert scale is None or np.asarray(scale).size == 1


def test_torch_target_runs_the_same_numerics(tiny_llama, tmp_path):
    pipe = specs(tiny_llama, scheme="int4-weight", block_size=32)
    art = graphopt.compile(tiny_llama.ir.copy(), pipeline=pipe, target="torch", out=tmp_path / "pt2", report=None)
    quantized, _ = run_pipeline(tiny_llama.ir, pipe)
    ids, mask = tiny_llama.inputs(21)
    got = graphopt.load(art.path, device="cpu")(input_ids=ids, attention_mask=mask)["logits"]
    torch.testing.assert_close(got, quantized.run([ids, mask])[0], rtol=1e-4, atol=1e-4)


def test_int4_weights_lower_as_int4_that_ort_fuses_and_tensorrt_accepts(tiny_llama, tmp_path):
    """Block-wise int4 weights are INT4 initializers in the ONNX file (not int8 holding -8..7):
    ONNX Runtime fuses DequantizeLinear → MatMul into MatMulNBits, the static TensorRT check finds
    no block-quantization error, and the artifact reproduces the quantized graph."""
    import onnxruntime as ort

    from graphopt.backends.tensorrt_check import check_onnx

    pipe = specs(tiny_llama, scheme="int4-weight", block_size=32)
    out = tmp_path / "int4"
    graphopt.compile(tiny_llama.ir.copy(), pipeline=pipe, target="onnx", out=out, verify=False, report=None)
    model = onnx.load(str(out / "model.onnx"))
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    inits = {i.name: i for i in model.graph.initializer}
    assert len(blocked) == 15  # the lm_head too (int4-weight quantizes it by default)
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in blocked)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("MatMulNBits") == 15, sorted(set(fused))
    report = check_onnx(out / "model.onnx", version="10.15")
    assert not [f for f in report.findings if f.severity == "error"], report.format()
    quantized, _ = run_pipeline(tiny_llama.ir, pipe)
    ids, mask = tiny_llama.inputs(23)
    got = graphopt.load(out)(input_ids=ids, attention_mask=mask)["logits"]
    assert token_cosine(quantized.run([ids, mask])[0], got)["worst"] > 0.999
    # no float GEMM weight left: the compile's check session keeps prepacking (MatMulNBits is
    # several times slower on unpacked weights)
    from graphopt.backends import onnx as onnx_backend

    assert onnx_backend._float_gemm_weight_bytes(out / "model.onnx") == 0


@pytest.mark.parametrize("scheme", ["w8a8", "smoothquant", "fp8"])
def test_tensorrt_style_quantized_artifacts_pass_the_static_check(tiny_llama, tmp_path, scheme):
    """With TensorRT's explicit-quantization rules (the default: int8 activations, zero point 0;
    fp8 E4M3), the Q/DQ graph the onnx backend writes has no finding for TensorRT 10.15 or 11; the
    ONNX Runtime x86 option activations=uint8 (zero point 128) is what the check reports."""
    from graphopt.backends.tensorrt_check import check_onnx

    out = tmp_path / scheme
    graphopt.compile(tiny_llama.ir.copy(), pipeline=specs(tiny_llama, scheme=scheme), target="onnx", out=out,
                     verify=False, report=None)
    for version in ("10.15", "11"):
        report = check_onnx(out / "model.onnx", version=version)
        assert not [f for f in report.findings if f.severity == "error"], report.format()
    if scheme == "w8a8":
        ort_style = tmp_path / "uint8"
        graphopt.compile(tiny_llama.ir.copy(), pipeline=specs(tiny_llama, scheme=scheme, activations="uint8"),
                         target="onnx", out=ort_style, verify=False, report=None)
        rules = {f.rule for f in check_onnx(ort_style / "model.onnx", version="10.15").findings}
        assert "qdq-zero-point" in rules
