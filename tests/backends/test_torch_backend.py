"""The ``torch`` backend: capture → torch.export.save → load → run on fresh inputs of other sizes,
and the archive check that keeps ``torch.export.load`` from unpickling anything."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from graphopt.backends.torch import TorchBackend
from graphopt.capture import capture
from graphopt.errors import ArtifactError, InputError
from graphopt.runtime.torch_runner import check_pt2_archive
from tests.conftest import run_in_threads

ATOL = 1e-5


from tests.backends.models import CASES  # noqa: E402  (shared with the other backend test)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """name → (model, fresh inputs, Lowered, artifact dir); each case captured and lowered once."""
    out = {}
    for name, make in CASES.items():
        model, inputs, dynamic, fresh = make()
        ir = capture(model, inputs, dynamic=dynamic)
        out_dir = tmp_path_factory.mktemp(name)
        out[name] = (model, fresh, TorchBackend().lower(ir, out_dir, {}), out_dir)
    return out


def _load(lowered, out_dir, **options):
    return TorchBackend().load(out_dir, {"target": "torch", "payload": lowered.payload}, **options)


def _eager(model, fresh):
    with torch.no_grad():
        out = model(*fresh)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _err(got, want):
    return max(float((g.cpu() - w).abs().max()) for g, w in zip(got, want))


# -- numerics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_on_fresh_sizes(artifacts, case):
    model, fresh, lowered, out_dir = artifacts[case]
    assert lowered.files == ["model.pt2"] and (out_dir / "model.pt2").is_file()
    assert lowered.payload == {"format": "pt2", "file": "model.pt2", "torch": torch.__version__}
    runner = _load(lowered, out_dir, device="cpu")
    assert runner.device == "cpu"
    got = runner.run(list(fresh))
    assert all(isinstance(t, torch.Tensor) for t in got)
    assert _err(got, _eager(model, fresh)) <= ATOL
    assert _err(runner.run([t.numpy() for t in fresh]), got) == 0.0  # numpy inputs too


def test_runner_is_safe_from_several_threads(artifacts):
    model, _, lowered, out_dir = artifacts["attention-mask"]
    runner = _load(lowered, out_dir, device="cpu")
    torch.manual_seed(1)
    jobs = [(torch.randn(1 + i % 4, 3 + i, 32),) for i in range(12)]
    results: dict[int, float] = {}

    def work(i):
        results[i] = _err(runner.run(list(jobs[i])), _eager(model, jobs[i]))

    run_in_threads(len(jobs), work)
    assert len(results) == len(jobs) and max(results.values()) <= ATOL


def test_inputs_outside_the_dynamic_range_are_input_errors(artifacts):
    _, _, lowered, out_dir = artifacts["mlp"]
    runner = _load(lowered, out_dir, device="cpu")
    with pytest.raises(InputError, match="outside what the program was compiled for"):
        runner.run([torch.randn(9, 3, 16), torch.ones(9, 3)])  # batch range is (1, 8)
    with pytest.raises(InputError, match="numpy array"):
        runner.run([[1.0], np.ones((2, 3), np.float32)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_clear_error(artifacts):
    _, _, lowered, out_dir = artifacts["mlp"]
    with pytest.raises(InputError, match="no CUDA GPU"):
        _load(lowered, out_dir, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda(artifacts):
    model, fresh, lowered, out_dir = artifacts["attention-sdpa"]
    runner = _load(lowered, out_dir, device="cuda")
    got = runner.run(list(fresh))
    assert got[0].device.type == "cuda"
    assert _err(got, _eager(model, fresh)) <= 1e-4  # TF32 / fused kernels on the GPU


# -- loading never unpickles ------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was (not) executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite(src, dst, edit):
    """Copy a .pt2 zip, passing each (relative name, bytes) through ``edit`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = zin.namelist()[0].split("/", 1)[0]
        entries = [(n[len(top) + 1:], zin.read(n)) for n in zin.namelist()]
        for rel, data in edit(entries):
            zout.writestr(f"{top}/{rel}", data)


def test_archive_check_accepts_what_torch_export_save_writes(artifacts):
    for _, _, _, out_dir in artifacts.values():
        check_pt2_archive(out_dir / "model.pt2")


def test_pickled_sample_inputs_are_refused_before_unpickling(artifacts, tmp_path):
    _, _, lowered, out_dir = artifacts["mlp"]
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker))
    bad = tmp_path / "bad"
    bad.mkdir()
    _rewrite(out_dir / "model.pt2", bad / "model.pt2",
             lambda es: [(r, evil if r.startswith("data/sample_inputs/") else d) for r, d in es])
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        _load(lowered, bad)
    assert not marker.exists()


def test_pickled_weights_custom_objects_and_native_code_are_refused(artifacts, tmp_path):
    _, _, lowered, out_dir = artifacts["mlp"]

    def use_pickle(entries):
        for rel, data in entries:
            if rel.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            yield rel, data

    cases = {
        "use_pickle": (use_pickle, "stored pickled"),
        "opaque": (lambda es: [*es, ("data/constants/opaque_obj_0", b"x")], "not something graphopt writes"),
        "aoti": (lambda es: [*es, ("data/aotinductor/model/model.so", b"\x7fELF")], "AOTInductor"),
        "legacy": (lambda es: [(r, d) for r, d in es if not r.startswith("models/")], "no models/"),
    }
    for name, (edit, message) in cases.items():
        bad = tmp_path / name
        bad.mkdir()
        _rewrite(out_dir / "model.pt2", bad / "model.pt2", edit)
        with pytest.raises(ArtifactError, match=message):
            _load(lowered, bad)


def test_load_errors_are_artifact_errors(artifacts, tmp_path):
    _, _, lowered, _ = artifacts["mlp"]
    with pytest.raises(ArtifactError, match="does not exist"):
        _load(lowered, tmp_path / "missing")
    (tmp_path / "model.pt2").write_bytes(b"not a zip file")
    with pytest.raises(ArtifactError, match="not a readable .pt2 archive"):
        _load(lowered, tmp_path)
    with pytest.raises(ArtifactError, match="file name inside"):
        TorchBackend().load(tmp_path, {"payload": {"file": "../x/model.pt2"}})


def test_registered_by_the_builtin_plugin():
    from graphopt.plugins import PluginManager

    pm = PluginManager()
    info = pm.load_module("graphopt.backends.builtin")
    assert info.status == "ok", info.error
    assert isinstance(pm.backend("torch"), TorchBackend)
    assert TorchBackend.summary() == "torch.export program (.pt2) run by PyTorch."
