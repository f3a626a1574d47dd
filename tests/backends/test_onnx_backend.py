"""The ``onnx`` backend: capture → lower → load → run on fresh inputs of other sizes.

Numerics: outputs match the eager module to 1e-5 on inputs whose batch and sequence differ from the
example inputs (including batch 1, below the ``Dim`` minimum of 2 that torch.export requires).
Structure: input/output names and symbolic dim labels in the file, the IR-version cap for the
installed onnxruntime, ``onnx.checker``, external data, clear errors for bad artifacts.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from graphopt.backends import onnx as onnx_backend
from graphopt.backends.onnx import OnnxBackend, ir_version_for_opset, ort_max_ir_version
from graphopt.capture import capture
from graphopt.errors import ArtifactError, BackendError, InputError
from tests.conftest import run_in_threads

ATOL = 1e-5


from tests.backends.models import CASES  # noqa: E402  (shared with the other backend test)


@pytest.fixture(scope="module")
def captured():
    """name → (model, ir, fresh inputs); each model captured once for the module."""
    out = {}
    for name, make in CASES.items():
        model, inputs, dynamic, fresh = make()
        out[name] = (model, capture(model, inputs, dynamic=dynamic), fresh)
    return out


def _eager(model, fresh):
    with torch.no_grad():
        out = model(*fresh)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _err(got, want):
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


def _lower_and_load(ir, out_dir, **options):
    backend = OnnxBackend()
    lowered = backend.lower(ir, out_dir, options)
    return lowered, backend.load(out_dir, {"target": "onnx", "payload": lowered.payload})


@pytest.fixture(scope="module")
def artifact(captured, tmp_path_factory):
    """``artifact(case, opset=None)`` → (Lowered, artifact dir), lowered once per module."""
    cache = {}

    def get(case, opset=None):
        if (case, opset) not in cache:
            out_dir = tmp_path_factory.mktemp(f"{case}-{opset}")
            cache[case, opset] = (OnnxBackend().lower(captured[case][1], out_dir, {"opset": opset}), out_dir)
        return cache[case, opset]

    return get


def _load(lowered, out_dir, **options):
    return OnnxBackend().load(out_dir, {"target": "onnx", "payload": lowered.payload}, **options)


# -- numerics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [None, 23], ids=["default-opset", "opset23"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_on_fresh_sizes(captured, artifact, case, opset):
    model, _, fresh = captured[case]
    lowered, out_dir = artifact(case, opset)
    runner = _load(lowered, out_dir)
    got = runner.run(list(fresh))
    assert all(isinstance(t, torch.Tensor) for t in got)
    assert _err(got, _eager(model, fresh)) <= ATOL
    assert lowered.files == ["model.onnx"]
    assert lowered.payload["format"] == "onnx" and lowered.payload["file"] == "model.onnx"
    # default: the exporter's (20), or 23 where the graph has SDPA (exported as the Attention op)
    assert lowered.payload["opset"] == (opset or (23 if case == "attention-sdpa" else onnx_backend.exporter_opsets()[0]))
    # numpy inputs give the same result
    np_got = runner.run([t.numpy() for t in fresh])
    assert _err(np_got, got) == 0.0


def test_sdpa_is_the_standard_attention_op_at_opset_23(artifact):
    _, out_dir = artifact("attention-sdpa", 23)
    ops = {n.op_type for n in onnx.load(str(out_dir / "model.onnx")).graph.node}
    assert "Attention" in ops


@pytest.mark.parametrize("settings", [{}, {"disabled_optimizers": []}, {"spinning": False}],
                         ids=["cpu-default", "all-ort-fusions", "no-spinning"])
def test_runner_session_settings_keep_the_numbers(captured, artifact, settings):
    """ONNX Runtime fusions measured slower on CPU are off by default; every setting gives the
    module's outputs."""
    from graphopt.runtime.onnx_runner import CPU_DISABLED_OPTIMIZERS

    model, _, fresh = captured["attention-sdpa"]
    runner = _load(*artifact("attention-sdpa", 23), **settings)
    want = settings.get("disabled_optimizers", list(CPU_DISABLED_OPTIMIZERS))
    assert runner.disabled_optimizers == want
    assert _err(runner.run(list(fresh)), _eager(model, fresh)) <= ATOL


# -- structure of the file --------------------------------------------------------------------
def test_names_dims_ir_version_and_checker(captured, artifact):
    _, ir, _ = captured["mlp"]
    lowered, tmp_path = artifact("mlp")
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ir.input_names == ["x", "mask"]
    assert [o.name for o in model.graph.output] == ir.output_names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"x": ["batch", "seq", 16], "mask": ["batch", "seq"]}
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", "seq", 8]

    opset = lowered.payload["opset"]
    assert model.ir_version == lowered.payload["ir_version"]
    assert model.ir_version == min(onnx.IR_VERSION, ort_max_ir_version())
    assert model.ir_version >= ir_version_for_opset(opset)
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    assert lowered.payload["producer"].startswith("pytorch")


def test_ir_version_table():
    assert ort_max_ir_version("1.31.1") == 13
    assert ort_max_ir_version("1.20.0") == 10
    assert ort_max_ir_version("1.99.0") == onnx_backend.ORT_MAX_IR_VERSION[-1][1]
    assert ir_version_for_opset(18) == 8 and ir_version_for_opset(23) == 11


def test_installed_onnxruntime_loads_the_cap_and_no_more():
    """Re-checks ORT_MAX_IR_VERSION against the onnxruntime actually installed."""
    cap = ort_max_ir_version()

    def loads(ir_version: int) -> bool:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
        model.ir_version = ir_version
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return True
        except Exception:
            return False

    assert loads(cap)
    if onnxruntime.__version__.startswith("1.31."):  # the row verified by hand: exact there
        assert not loads(cap + 1)


def test_outputs_that_alias_inputs_or_each_other_get_their_own_names(tmp_path):
    class Aliasing(torch.nn.Module):
        def forward(self, a, b):
            h = a * 2
            return {"same": a, "h": h, "h_again": h, "const": torch.ones(3), "b_sum": b.sum(0)}

    model = Aliasing()
    ir = capture(model, (torch.randn(2, 3), torch.randn(4, 3)), dynamic={"a": {0: (1, 8)}})
    _, runner = _lower_and_load(ir, tmp_path)
    onnx_model = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.name for o in onnx_model.graph.output] == ["same", "h", "h_again", "const", "b_sum"]
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    want = model(a, b)
    assert _err(runner.run([a, b]), list(want.values())) == 0.0


def test_external_data_above_threshold(captured, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_backend, "EXTERNAL_DATA_THRESHOLD", 0)
    model, ir, fresh = captured["mlp"]
    lowered, runner = _lower_and_load(ir, tmp_path)
    assert lowered.files == ["model.onnx", "model.onnx.data"]
    assert lowered.payload["external_data"] == "model.onnx.data"
    assert (tmp_path / "model.onnx.data").stat().st_size > 0
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    assert _err(runner.run(list(fresh)), _eager(model, fresh)) <= ATOL


def test_lowering_prints_nothing(captured, tmp_path, capfd):
    _, ir, _ = captured["mlp"]
    OnnxBackend().lower(ir, tmp_path, {})
    out, _ = capfd.readouterr()
    assert out == ""


def test_runner_is_safe_from_several_threads(captured, artifact):
    model, _, _ = captured["attention-mask"]
    runner = _load(*artifact("attention-mask"), threads=1)
    torch.manual_seed(1)
    jobs = [(torch.randn(1 + i % 4, 3 + i, 32),) for i in range(16)]
    results: dict[int, float] = {}

    def work(i):
        results[i] = _err(runner.run(list(jobs[i])), _eager(model, jobs[i]))

    run_in_threads(len(jobs), work)
    assert len(results) == len(jobs) and max(results.values()) <= ATOL


# -- errors -----------------------------------------------------------------------------------
def test_load_errors_are_artifact_errors(artifact, tmp_path):
    backend = OnnxBackend()
    with pytest.raises(ArtifactError, match="does not exist"):
        backend.load(tmp_path / "missing", {"payload": {"file": "model.onnx"}})
    (tmp_path / "model.onnx").write_bytes(b"this is not protobuf")
    with pytest.raises(ArtifactError, match="could not load"):
        backend.load(tmp_path, {"payload": {"file": "model.onnx"}})
    with pytest.raises(ArtifactError, match="file name inside"):
        backend.load(tmp_path, {"payload": {"file": "../elsewhere/model.onnx"}})
    with pytest.raises(ArtifactError, match="not in this onnxruntime build"):
        _load(*artifact("mlp"), providers=["NoSuchExecutionProvider"])


def test_run_errors_are_input_errors(artifact):
    runner = _load(*artifact("mlp"))
    with pytest.raises(InputError, match="takes 2 inputs"):
        runner.run([torch.randn(2, 3, 16)])
    with pytest.raises(InputError, match="rejected"):
        runner.run([torch.randn(2, 3, 16, dtype=torch.float64), torch.ones(2, 3)])
    with pytest.raises(InputError, match="numpy array"):
        runner.run([[1.0], np.ones((2, 3), np.float32)])


def test_bad_options_and_unexportable_dims_are_backend_errors(tmp_path):
    with pytest.raises(BackendError, match="opset=99"):
        onnx_backend.resolve_opset(99)
    with pytest.raises(BackendError, match="not an integer"):
        onnx_backend.resolve_opset("latest")

    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x.reshape(6, 2) * 2  # only a batch of 3 fits

    ir = capture(FixedBatch(), (torch.randn(3, 4),))
    ir.inputs[0].shape[0] = "batch"  # claim a dynamic dim the graph cannot have
    ir.inputs[0].dynamic = {0: (1, 8)}
    with pytest.raises(BackendError, match="could not re-export"):
        OnnxBackend().lower(ir, tmp_path, {})


def test_registered_by_the_builtin_plugin():
    from graphopt.plugins import PluginManager

    pm = PluginManager()
    info = pm.load_module("graphopt.backends.builtin")
    assert info.status == "ok", info.error
    assert isinstance(pm.backend("onnx"), OnnxBackend)
    assert OnnxBackend.summary() == "ONNX (opset 18+) run by ONNX Runtime; the embedded default."


# -- a real model family ----------------------------------------------------------------------
@pytest.mark.slow
def test_gpt2_tiny(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                        bos_token_id=255, eos_token_id=255, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, 256, (2, 16), generator=g),
              "attention_mask": torch.ones(2, 16, dtype=torch.int64)}
    dims = {0: (1, 16), 1: (2, 128)}
    ir = capture(model, inputs, dynamic={"input_ids": dims, "attention_mask": dims})

    t0 = time.perf_counter()
    lowered, runner = _lower_and_load(ir, tmp_path)
    print(f"gpt2-tiny onnx lowering: {time.perf_counter() - t0:.1f}s")

    onnx_model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in onnx_model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in onnx_model.graph.output] == ["logits"]
    assert [d.dim_param for d in onnx_model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    ids = torch.randint(0, 256, (3, 37), generator=g)
    mask = torch.ones(3, 37, dtype=torch.int64)
    mask[0, -6:] = 0  # right padding (a fully masked query row has no defined softmax)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert _err(runner.run([ids, mask]), [want]) <= ATOL


# -- the program is built from the graph, not traced again -------------------------------------
def test_lowering_builds_the_program_without_retracing(captured, artifact):
    from graphopt.backends.export import program_from_ir

    for case in captured:
        lowered, _ = artifact(case)
        assert lowered.payload["program"] == "direct", (case, lowered.payload["program"])
    _, ir, _ = next(iter(captured.values()))
    names = [n.name for n in ir.graph.nodes]
    ep = program_from_ir(ir)
    # the weights are the IR's own tensors (lifted, not copied)
    ir_tensors = {n.target: functools.reduce(getattr, n.target.split("."), ir.graph_module)
                  for n in ir.graph.nodes if n.op == "get_attr"}
    assert ep.state_dict and all(ep.state_dict[k] is ir_tensors[k] for k in ep.state_dict)
    assert [n.name for n in ir.graph.nodes] == names  # the IR's graph is left as it was
    assert all("val" in n.meta for n in ep.graph.nodes if n.op != "output")


def test_graphs_the_direct_build_cannot_take_are_re_exported(tmp_path):
    """A node calling a Python function (not an ATen op) makes the lowering re-export the graph
    with torch.export; the payload says so and the artifact computes the same."""

    class Model(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 3

    ir = capture(Model(), (torch.randn(2, 4),), dynamic={"x": {0: (1, 8)}})
    relu = next(n for n in ir.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    relu.target = torch.relu  # a torch function, not an OpOverload
    ir.recompile()
    lowered, runner = _lower_and_load(ir, tmp_path)
    assert lowered.payload["program"].startswith("re-exported: node"), lowered.payload["program"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(runner.run([x])[0], torch.relu(x) * 3)


def test_ops_without_an_onnx_translation_are_still_decomposed(tmp_path):
    """The exporter's decomposition is skipped only when every op has a translation: aten.rms_norm
    has none below opset 23, so at opset 20 it is decomposed, and computes the same."""

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, (8,), self.w, 1e-6) + 1

    model = Norm()
    ir = capture(model, (torch.randn(2, 8),), dynamic={"x": {0: (1, 8)}})
    assert any("rms_norm" in str(n.target) for n in ir.graph.nodes)
    lowered, runner = _lower_and_load(ir, tmp_path, opset=20)
    assert lowered.payload["program"] == "direct"
    assert "RMSNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(runner.run([x])[0], model(x))


def test_mixed_dtypes_still_get_their_casts(tmp_path):
    """The exporter's type-promotion pass reads the fake tensors the program carries instead of
    rerunning every node; the casts it inserts (int64 + float32, float16 * float32, a bool mask
    times a float) are still there and the artifact computes what torch does."""

    class Mixed(torch.nn.Module):
        def forward(self, x, n, h):
            y = (x + n) * h.to(torch.float16)     # int64 + float32, then float32 * float16
            return torch.where(n > 0, y, y * 2) + (n > 3) * x, (n * 2).sum(-1)

    ir = capture(Mixed(), (torch.randn(2, 8), torch.randint(-5, 5, (2, 8)), torch.randn(2, 8)),
                 dynamic={name: {0: (1, 8)} for name in ("x", "n", "h")})
    lowered, runner = _lower_and_load(ir, tmp_path)
    assert lowered.payload["program"] == "direct"
    assert "Cast" in {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(5, 8, generator=g), torch.randint(-5, 5, (5, 8), generator=g), torch.randn(5, 8, generator=g)]
    got, want = runner.run(args), Mixed()(*args)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tile", [512, 7])
def test_transposed_weights_are_written_in_row_blocks_byte_for_byte(tmp_path, monkeypatch, tile):
    """Constant folding leaves ``Transpose(W)`` as a strided numpy view; it is written in
    contiguous row blocks copied in column tiles (numpy writes such views element by element),
    with the same bytes: one tile, and many with a partial last one, for a 2-D and a 3-D view."""
    import onnx_ir

    monkeypatch.setattr(onnx_backend, "TILE_COLUMNS", tile)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    u = rng.standard_normal((4, 5, 30)).astype(np.float32).transpose(2, 0, 1)  # [30, 4, 5], strided

    def model():
        x = onnx_ir.Value(name="x", shape=onnx_ir.Shape([2, 48]), type=onnx_ir.TensorType(onnx_ir.DataType.FLOAT))
        wt = onnx_ir.Value(name="wt", const_value=onnx_ir.Tensor(w.T, name="wt"))
        ut = onnx_ir.Value(name="ut", const_value=onnx_ir.Tensor(u, name="ut"))
        node = onnx_ir.node("MatMul", [x, wt])
        node.outputs[0].name = "y"
        total = onnx_ir.node("ReduceSum", [ut])
        total.outputs[0].name = "s"
        graph = onnx_ir.Graph([x], [*node.outputs, *total.outputs], nodes=[node, total], initializers=[wt, ut],
                              opset_imports={"": 20})
        return onnx_ir.Model(graph, ir_version=10)

    plain, blocked = model(), model()
    assert onnx_backend._write_transposed_in_rows(blocked) == 2
    for m, name in ((plain, "plain"), (blocked, "blocked")):
        onnx_ir.save(m, str(tmp_path / f"{name}.onnx"), external_data=f"{name}.data", alignment=4096)
    assert (tmp_path / "plain.data").read_bytes() == (tmp_path / "blocked.data").read_bytes()
    x = np.random.default_rng(1).standard_normal((2, 48)).astype(np.float32)
    got, total = onnxruntime.InferenceSession(str(tmp_path / "blocked.onnx")).run(None, {"x": x})
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, u.sum(), rtol=1e-4)


def test_the_check_session_prepacks_only_small_float_gemm_weights(artifact, monkeypatch):
    """The compile's own check session leaves out ONNX Runtime's prepacked copy of the float GEMM
    weights when they are large (the memory bound of a real-size compile), keeps it otherwise."""
    low, out_dir = artifact("mlp")
    manifest = {"payload": low.payload}
    weights = onnx_backend._float_gemm_weight_bytes(out_dir / "model.onnx")
    assert weights > 0
    seen = []
    backend = onnx_backend.OnnxBackend()
    monkeypatch.setattr(backend, "load", lambda path, man, **kw: seen.append(kw.get("session_config")))
    backend.load_for_verification(out_dir, manifest)
    monkeypatch.setattr(onnx_backend, "PREPACK_FLOAT_BYTES", weights - 1)
    backend.load_for_verification(out_dir, manifest)
    assert seen == [None, {"session.disable_prepacking": "1"}]
