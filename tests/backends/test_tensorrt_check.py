"""The static TensorRT checker on crafted ONNX files: one test group per rule, each with a model that
must pass and one that must fail (naming the node and the fix), plus the CLI and the sample artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from graphopt.backends.tensorrt_check import (
    CheckReport,
    TensorRTCheckError,
    check_onnx,
    known_releases,
    latest_version,
    load_data,
    parser_ir_version,
)
from graphopt.cli import main as cli
from graphopt.errors import ArtifactError, GraphoptError, InputError


# -- crafting ------------------------------------------------------------------------------------
def model(nodes, inputs, outputs, inits=(), opset=20, ir=9, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], ir_version=ir)


def vi(name, dtype=T.FLOAT, shape=("batch", 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def const(name, value, dtype=None):
    arr = np.asarray(value, dtype=dtype)
    return numpy_helper.from_array(arr, name)


def relu_model(**kw):
    return model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x")], [vi("y")], **kw)


def findings(report: CheckReport, rule: str, severity: str = "error"):
    return [f for f in report.findings if f.rule == rule and f.severity == severity]


def only(report: CheckReport, rule: str, severity: str = "error"):
    got = findings(report, rule, severity)
    assert len(got) == 1, report.format()
    return got[0]


# -- a clean model, the report object ------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.0", "10.15", "11", None])
def test_clean_model_has_no_findings(version):
    r = check_onnx(relu_model(), version=version)
    assert r.ok and r.findings == [], r.format()
    assert "ok, no findings" in r.format()


def test_report_format_dict_and_raise():
    m = model([helper.make_node("Unique", ["x"], ["y"], name="uniq")], [vi("x")], [vi("y")])
    r = check_onnx(m, version="10.15")
    assert not r.ok and len(r.errors) == 1
    text = r.format()
    assert "node 'uniq' (Unique)" in text and "fix:" in text and "1 error" in text
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ok"] is False and d["findings"][0]["node"] == {"name": "uniq", "op_type": "Unique"}
    assert d["findings"][0]["rule"] == "op-support" and d["findings"][0]["fix"]
    with pytest.raises(TensorRTCheckError) as e:
        r.raise_if_errors()
    assert isinstance(e.value, GraphoptError) and e.value.exit_code == 2 and e.value.report is r
    assert r.errors[0].node.name == "uniq" and tuple(r.errors[0].node) == ("uniq", "Unique")


# -- op support per version ----------------------------------------------------------------------
def attention_model(opset=23, past=False):
    q = vi("q", shape=(1, 4, "s", 16))
    ins = ["q", "k", "v"] + (["", "past_k", "past_v"] if past else [])
    inputs = [q, vi("k", shape=(1, 4, "s", 16)), vi("v", shape=(1, 4, "s", 16))]
    if past:
        inputs += [vi("past_k", shape=(1, 4, "p", 16)), vi("past_v", shape=(1, 4, "p", 16))]
    node = helper.make_node("Attention", ins, ["o"], name="attn_0", is_causal=1)
    return model([node], inputs, [vi("o", shape=(1, 4, "s", 16))], opset=opset, ir=11)


def llm_ops_model():
    nodes = [
        helper.make_node("RMSNormalization", ["x", "w"], ["n"], name="rms_0", axis=-1),
        helper.make_node("RotaryEmbedding", ["n4", "cos", "sin", "pos"], ["r"], name="rope_0"),
    ]
    # the RMSNorm output feeds RoPE through a reshape in real graphs; a separate input keeps it small
    inits = [
        const("w", np.ones(16, np.float32)),
        const("cos", np.ones((8, 8), np.float32)),
        const("sin", np.zeros((8, 8), np.float32)),
    ]
    inputs = [vi("x", shape=(1, "s", 16)), vi("n4", shape=(1, 4, "s", 16)), vi("pos", T.INT64, (1, "s"))]
    return model(
        nodes, inputs, [vi("n", shape=(1, "s", 16)), vi("r", shape=(1, 4, "s", 16))], inits, opset=23, ir=11
    )


def test_opset23_attention_needs_10_14():
    r = check_onnx(attention_model(), version="10.13")
    f = only(r, "op-support")
    assert f.node == ("attn_0", "Attention") and "10.14" in f.message and "fuse-attention" in f.fix
    assert only(r, "onnx-opset").message.startswith("opset 23 is outside")  # 10.13 documents opset <= 20
    assert check_onnx(attention_model(), version="10.14").ok
    assert check_onnx(attention_model(), version="11").ok


def test_rmsnorm_and_rope_need_10_15():
    r = check_onnx(llm_ops_model(), version="10.14")
    ops = sorted(f.node.op_type for f in findings(r, "op-support"))
    assert ops == ["RMSNormalization", "RotaryEmbedding"], r.format()
    assert all("10.15" in f.message and "10.15" in f.fix for f in findings(r, "op-support"))
    assert check_onnx(llm_ops_model(), version="10.15").ok
    assert check_onnx(llm_ops_model(), version="11.0").ok


def test_unsupported_and_unknown_and_custom_ops():
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dq"),
        helper.make_node("NoSuchOp", ["x"], ["n"], name="mystery"),
        helper.make_node("FusedMatMul", ["x", "x"], ["f"], name="fmm", domain="com.microsoft"),
    ]
    m = model(nodes, [vi("x")], [vi("f")], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    r = check_onnx(m, version="10.15")
    by_node = {f.node.name: f for f in r.errors}
    assert by_node["dq"].rule == "op-support" and "static Q/DQ" in by_node["dq"].fix
    assert (
        by_node["mystery"].rule == "op-support"
        and "not in the TensorRT operator table" in by_node["mystery"].message
    )
    assert by_node["fmm"].rule == "custom-op" and "plugin" in by_node["fmm"].fix


def test_ops_inside_subgraphs_are_checked():
    then_g = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["t"], name="inner_unique")], "then", [], [vi("t")]
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["e"], name="inner_relu")], "else", [], [vi("e")]
    )
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    r = check_onnx(model([node], [vi("x"), vi("c", T.BOOL, ())], [vi("y")]), version="10.15")
    assert only(r, "op-support").node.name == "inner_unique"


def test_documented_restrictions():
    # Attention with a KV cache input
    f = only(check_onnx(attention_model(past=True), version="10.15"), "op-restriction")
    assert f.node.name == "attn_0" and "past_key" in f.message and "past_value" in f.message
    # ReduceMean (opset 18) with axes computed at run time vs an initializer
    dyn = model(
        [
            helper.make_node("Shape", ["x"], ["ax"], name="shape"),
            helper.make_node("ReduceMean", ["x", "ax"], ["y"], name="mean_dyn"),
        ],
        [vi("x")],
        [vi("y")],
        opset=18,
    )
    assert only(check_onnx(dyn, version="10.15"), "op-restriction").node.name == "mean_dyn"
    static = model(
        [helper.make_node("ReduceMean", ["x", "ax"], ["y"], name="mean")],
        [vi("x")],
        [vi("y")],
        [const("ax", [1], np.int64)],
        opset=18,
    )
    assert check_onnx(static, version="10.15").ok
    # TopK sorted=0
    topk = model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top", sorted=0)],
        [vi("x")],
        [vi("v"), vi("i", T.INT64)],
        [const("k", [2], np.int64)],
    )
    assert "sorted=1" in only(check_onnx(topk, version="10.15"), "op-restriction").fix


# -- Q/DQ ----------------------------------------------------------------------------------------
def qdq_model(
    *,
    zp=0,
    zp_dtype=np.int8,
    scale=0.1,
    weight_scale=(0.1, 0.2, 0.3, 0.4),
    act_scale=None,
    block=None,
    wdtype=T.INT8,
    opset=21,
):
    """x --Q/DQ--> MatMul <--DQ-- int weight initializer."""
    act_scale = scale if act_scale is None else act_scale
    inits = [
        const("s_x", act_scale, np.float32),
        const("w_q", np.ones((8, 4), np.int8)),
        const("s_w", weight_scale, np.float32),
    ]
    q_in = ["x", "s_x"]
    if zp is not None:
        inits.append(const("zp_x", np.full(np.shape(act_scale), zp), zp_dtype))
        q_in.append("zp_x")
    if wdtype != T.INT8:
        inits[1] = helper.make_tensor("w_q", wdtype, (8, 4), np.ones(32, np.int64).tolist())
    dq_w_kw = {"axis": 1} if block is None else {"axis": 0, "block_size": block}
    nodes = [
        helper.make_node("QuantizeLinear", q_in, ["x_q"], name="q_x"),
        helper.make_node(
            "DequantizeLinear", ["x_q", "s_x"] + (["zp_x"] if zp is not None else []), ["x_dq"], name="dq_x"
        ),
        helper.make_node("DequantizeLinear", ["w_q", "s_w"], ["w"], name="dq_w", **dq_w_kw),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="mm"),
    ]
    return model(nodes, [vi("x")], [vi("y", shape=("batch", 4))], inits, opset=opset, ir=10)


def test_qdq_clean_per_tensor_activation_per_channel_weight():
    r = check_onnx(qdq_model(), version="10.15")
    assert r.ok and not r.findings, r.format()


def test_qdq_zero_point_must_be_zero():
    r = check_onnx(qdq_model(zp=3), version="10.15")
    got = findings(r, "qdq-zero-point")
    assert {f.node.name for f in got} == {"q_x", "dq_x"} and "symmetric" in got[0].message
    # no zero point and no output_dtype: ONNX quantizes to UINT8
    r = check_onnx(qdq_model(zp=None), version="10.15")
    f = only(r, "qdq-zero-point")
    assert f.node.name == "q_x" and "UINT8" in f.message and "INT8" in f.fix


def test_qdq_scale_must_be_positive():
    for bad in (0.0, -0.5):
        r = check_onnx(qdq_model(scale=bad), version="10.15")
        assert {f.node.name for f in findings(r, "qdq-scale")} == {"q_x", "dq_x"}
    r = check_onnx(qdq_model(weight_scale=(0.1, 0.0, 0.3, float("nan"))), version="10.15")
    f = only(r, "qdq-scale")
    assert f.node.name == "dq_w" and "2 of 4" in f.message


def test_qdq_values_in_external_data_are_read(tmp_path):
    m = qdq_model(weight_scale=(0.1, -0.2, 0.3, 0.4))
    onnx.save(
        m, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    assert (tmp_path / "model.onnx.data").stat().st_size > 0
    f = only(check_onnx(tmp_path / "model.onnx", version="10.15"), "qdq-scale")
    assert f.node.name == "dq_w" and "1 of 4" in f.message


def test_qdq_per_channel_only_on_weights():
    r = check_onnx(qdq_model(act_scale=np.full(8, 0.1, np.float32)), version="10.15")
    got = findings(r, "qdq-per-channel")
    assert {f.node.name for f in got} == {"q_x", "dq_x"} and "activation" in got[0].message


def test_qdq_block_quantization_only_for_int4_fp4_fp8():
    int8_block = qdq_model(weight_scale=np.full((2, 4), 0.1, np.float32), block=4)
    f = only(check_onnx(int8_block, version="10.15"), "qdq-block")
    assert f.node.name == "dq_w" and "INT8" in f.message
    assert "INT4 held in INT8" in f.message and "TensorProto.INT4" in f.fix  # the weights are all 1
    int4_block = qdq_model(weight_scale=np.full((2, 4), 0.1, np.float32), block=4, wdtype=T.INT4)
    assert check_onnx(int4_block, version="10.15").ok
    # INT4 is weight-only: quantizing the activation to INT4 is refused
    r = check_onnx(_int4_activation(), version="10.15")
    assert any(f.rule == "qdq-block" and f.node.name == "q_x" for f in r.errors), r.format()


def _int4_activation():
    inits = [const("s", 0.1, np.float32)]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q_x", output_dtype=T.INT4),
        helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], name="dq_x"),
    ]
    return model(nodes, [vi("x")], [vi("y")], inits, opset=21, ir=10)


# -- precision flags -----------------------------------------------------------------------------
def fp16_model():
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], name="to_half", to=T.FLOAT16),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Cast", ["r"], ["y"], name="to_float", to=T.FLOAT),
    ]
    return model(nodes, [vi("x")], [vi("y")])


@pytest.mark.parametrize(
    "cfg",
    [
        {"builder_flags": ["FP16"]},
        {"flags": ["trt.BuilderFlag.FP16"]},
        {"fp16": True},
        {"trtexec": "trtexec --onnx=model.onnx --fp16"},
    ],
)
def test_fp32_graph_relying_on_fp16_flag_fails_on_trt11(cfg):
    f = only(check_onnx(relu_model(), version="11", build_config=cfg), "precision-flags")
    assert "float32 everywhere" in f.message and "precision(dtype=fp16)" in f.fix


def test_precision_flags_per_version_and_graph():
    cfg = {"builder_flags": ["FP16", "SPARSE_WEIGHTS"]}
    assert only(
        check_onnx(relu_model(), version="10.15", build_config=cfg), "precision-flags"
    )  # strongly typed
    # graph already in fp16: on 10.x only a warning (the flag is redundant), on 11 an error (removed)
    r10 = check_onnx(fp16_model(), version="10.15", build_config=cfg)
    assert r10.ok and only(r10, "precision-flags", "warning")
    assert not check_onnx(fp16_model(), version="11", build_config=cfg).ok
    # weakly typed 10.x build: deprecated, warning
    weak = check_onnx(relu_model(), version="10.15", build_config={**cfg, "strongly_typed": False})
    assert weak.ok and only(weak, "precision-flags", "warning")
    # no precision flags: nothing to say
    assert check_onnx(
        relu_model(), version="11", build_config={"builder_flags": ["SPARSE_WEIGHTS"], "workspace": 1 << 30}
    ).ok
    # a requested precision the graph does not carry
    f = only(check_onnx(relu_model(), version="11", build_config={"precision": "bf16"}), "precision-flags")
    assert "precision(dtype=bf16)" in f.fix
    assert check_onnx(fp16_model(), version="11", build_config={"precision": "fp16"}).ok


def test_build_json_next_to_the_file_is_read(tmp_path):
    onnx.save(relu_model(), tmp_path / "model.onnx")
    assert check_onnx(tmp_path / "model.onnx", version="11").ok
    (tmp_path / "build.json").write_text(json.dumps({"builder_flags": ["INT8"]}))
    assert not check_onnx(tmp_path / "model.onnx", version="11").ok
    assert not check_onnx(tmp_path, version="11").ok  # an artifact directory works too
    (tmp_path / "build.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="build.json"):
        check_onnx(tmp_path, version="11")


# -- optimization profiles -----------------------------------------------------------------------
def seq_model():
    return model(
        [helper.make_node("Identity", ["ids"], ["out"], name="id")],
        [vi("ids", T.INT64, ("batch", "seq")), vi("pos", T.INT64, (1, 4))],
        [vi("out", T.INT64, ("b", "s"))],
    )


GOOD = {"ids": {"min": [1, 1], "opt": [2, 64], "max": [4, 512]}, "pos": ([1, 4], [1, 4], [1, 4])}


def test_valid_profiles_in_every_form():
    assert check_onnx(seq_model(), version="10.15", profiles=GOOD).ok
    named = {"prefill": GOOD, "decode": {**GOOD, "ids": {"min": [1, 1], "opt": [1, 1], "max": [4, 1]}}}
    assert check_onnx(seq_model(), version="10.15", profiles=named).ok
    assert check_onnx(seq_model(), version="10.15", profiles=[GOOD, GOOD]).ok
    assert check_onnx(seq_model(), version="10.15", build_config={"profiles": named}).ok


def test_profile_order_rank_inputs_and_static_dims():
    bad_order = {**GOOD, "ids": {"min": [1, 64], "opt": [2, 32], "max": [4, 512]}}
    f = only(check_onnx(seq_model(), version="10.15", profiles=bad_order), "profile-order")
    assert f.node == ("ids", "graph input") and "dim 1" in f.message and "min 64, opt 32" in f.message
    bad_rank = {**GOOD, "ids": {"min": [1], "opt": [2], "max": [4]}}
    assert (
        "rank 1" in only(check_onnx(seq_model(), version="10.15", profiles=bad_rank), "profile-rank").message
    )
    unknown = {**GOOD, "input_idz": GOOD["ids"]}
    assert (
        "input_idz"
        in only(check_onnx(seq_model(), version="10.15", profiles=unknown), "profile-input").message
    )
    missing = {"prefill": GOOD, "decode": {"pos": GOOD["pos"]}}
    f = only(check_onnx(seq_model(), version="10.15", profiles=missing), "profile-input")
    assert f.node.name == "ids" and "decode" in f.message and "dynamic" in f.message
    static = {**GOOD, "pos": ([1, 2], [1, 4], [1, 4])}
    assert (
        "static (4)"
        in only(check_onnx(seq_model(), version="10.15", profiles=static), "profile-order").message
    )


@pytest.mark.parametrize(
    "bad", [{"ids": [1, 2, 3]}, {"p": {"ids": {"min": [1, "x"], "opt": [1, 1], "max": [1, 1]}}}, "ids:1..4"]
)
def test_malformed_profiles_are_input_errors(bad):
    with pytest.raises(InputError):
        check_onnx(seq_model(), version="10.15", profiles=bad)


# -- IR / opset / io types / versions ------------------------------------------------------------
def test_opset_range():
    f = only(check_onnx(relu_model(opset=8, ir=3), version="10.15"), "onnx-opset")
    assert "9..24" in f.message
    f = only(check_onnx(relu_model(opset=25, ir=12), version="10.15"), "onnx-opset")
    assert "opset = 24" in f.fix
    f = only(check_onnx(relu_model(opset=23, ir=11), version="10.0"), "onnx-opset")
    assert "TensorRT >= 10.14" in f.fix


def test_ir_version_range():
    r = check_onnx(relu_model(ir=13), version="10.15")
    assert r.ok and "model.ir_version = 12" in only(r, "onnx-ir-version", "warning").fix
    assert not check_onnx(relu_model(ir=2), version="10.15").ok
    # the stamp the warning asks for: the parser's IR, raised to what the opset needs
    assert (
        parser_ir_version(20, "10.0"),
        parser_ir_version(23, "10.14"),
        parser_ir_version(23, "10.15"),
    ) == (9, 11, 12)
    assert parser_ir_version(24, "10.0") == 12 == parser_ir_version(20)
    assert check_onnx(relu_model(opset=23, ir=parser_ir_version(23, "10.15")), version="10.15").findings == []


def test_io_dtypes():
    m = model([helper.make_node("Cast", ["x"], ["y"], name="c", to=T.FLOAT)], [vi("x", T.DOUBLE)], [vi("y")])
    f = only(check_onnx(m, version="10.15"), "io-dtype")
    assert f.node == ("x", "graph input") and "DOUBLE" in f.message


def test_versions():
    assert latest_version() == known_releases()[-1]
    assert only(check_onnx(relu_model(), version="12.0"), "tensorrt-version", "warning")
    for bad in ("9.3", "abc", ""):
        with pytest.raises(InputError):
            check_onnx(relu_model(), version=bad or "x.y")


def test_bad_inputs(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        check_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ArtifactError, match="without model.onnx"):
        check_onnx(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"\x00not protobuf at all\xff" * 10)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        check_onnx(tmp_path / "junk.onnx")
    with pytest.raises(InputError):
        check_onnx(42)


# -- the data file -------------------------------------------------------------------------------
def test_data_names_its_sources_and_is_consistent():
    data = load_data()
    assert "onnx-tensorrt" in data["sources"]["operators"] and "operators.md" in data["sources"]["operators"]
    rows = data["releases"]
    assert [r["version"] for r in rows] == sorted(
        (r["version"] for r in rows), key=lambda v: tuple(map(int, v.split(".")))
    )
    for r in rows:
        assert {"opset_min", "opset_max", "max_ir_version", "strongly_typed_only"} <= set(r)
    assert rows[-1]["strongly_typed_only"] and not rows[0]["strongly_typed_only"]
    ops = data["operators"]
    assert ops["Attention"]["since"] == "10.14" and ops["RMSNormalization"]["since"] == "10.15"
    assert ops["Unique"]["supported"] is False and ops["MatMul"]["supported"] is True
    assert "x_zero_point" in ops["DequantizeLinear"]["restrictions"]


def test_data_file_ships_with_the_package():
    from importlib import resources

    assert resources.files("graphopt.backends").joinpath("data/tensorrt_ops.json").is_file()
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"backends/data/*.json"' in pyproject  # [tool.setuptools.package-data] graphopt


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_exit_codes(tmp_path, capsys):
    onnx.save(relu_model(), tmp_path / "ok.onnx")
    onnx.save(attention_model(), tmp_path / "attn.onnx")
    assert cli(["check", "--target", "tensorrt", str(tmp_path / "ok.onnx")]) == 0
    assert "ok, no findings" in capsys.readouterr().out
    assert cli(["check", "--target", "tensorrt=10.13", str(tmp_path / "attn.onnx")]) == 1
    out = capsys.readouterr().out
    assert "attn_0" in out and "fix:" in out
    assert cli(["check", "--target", "tensorrt=10.15", "--json", str(tmp_path / "attn.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    (tmp_path / "p.json").write_text(
        json.dumps({"q": {"min": [1, 4, 9, 16], "opt": [1, 4, 8, 16], "max": [1, 4, 64, 16]}})
    )
    assert (
        cli(
            [
                "check",
                "--target",
                "tensorrt=11",
                "--profiles",
                str(tmp_path / "p.json"),
                str(tmp_path / "attn.onnx"),
            ]
        )
        == 1
    )
    assert "profile-order" in capsys.readouterr().out
    assert cli(["check", "--target", "onnx", str(tmp_path / "ok.onnx")]) == 2
    assert cli(["check", "--target", "tensorrt=ten", str(tmp_path / "ok.onnx")]) == 2
    assert cli(["check", str(tmp_path / "nope.onnx")]) == 2
    assert cli(["check", "--build-config", str(tmp_path / "nope.json"), str(tmp_path / "ok.onnx")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nope.json" in err


# -- graphopt's own artifacts --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("version", ["10.15", "11"])
def test_sample_artifacts_check_clean(version):
    from tests.production_artifacts import nanogpt_artifact

    for kind in ("fused", "kv-cache"):
        r = check_onnx(nanogpt_artifact(kind) / "model.onnx", version=version)
        assert r.ok, f"{kind}:\n{r.format()}"
