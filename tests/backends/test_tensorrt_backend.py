"""tensorrt target: builder-config mapping (TensorRT 10.x and 11.x, through the recording fake in
fake_tensorrt.py), profiles from dynamic dims (KV-cache: prefill/decode), the engine cache key,
plan-header checks before deserializing, the CLI without TensorRT (compile --target tensorrt,
--require-engine, build-engine), build-engine completing an artifact atomically; and, marked
``tensorrt``, real engines compared with ONNX Runtime where TensorRT and a GPU exist."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import graphopt
from graphopt.backends import tensorrt as trt_backend
from graphopt.backends.tensorrt import (
    BuildSettings,
    build_engine,
    build_engine_in_place,
    cache_key,
    check_plan,
)
from graphopt.cli import main
from graphopt.errors import ArtifactError, BackendError
from graphopt.ir.graph_ir import TensorSpec
from tests.backends.fake_tensorrt import FakeTensorRT

REPO = Path(__file__).resolve().parents[2]
MLP = f"{REPO}/tests/backends/tensorrt_models.py:mlp"
HAVE_TRT = trt_backend.import_tensorrt() is not None


def _settings(**kw) -> BuildSettings:
    prof = {"default": {"x": {"min": [1, 1, 16], "opt": [3, 5, 16], "max": [8, 64, 16]}}}
    return BuildSettings(profiles=kw.pop("profiles", prof), **kw).validate()


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"not really onnx, the fake parser only checks that the file exists " + np.random.bytes(16))
    return p


# -- builder-config mapping through the fake --------------------------------------------------
@pytest.mark.parametrize("version", ["10.13.0.35", "11.0.0.5"])
def test_builder_config_mapping(version, onnx_file, tmp_path):
    fake = FakeTensorRT(version)
    s = _settings(workspace_mib=512, optimization_level=5, hardware_compatibility="ampere_plus",
                  version_compatible=True, exclude_lean_runtime=True, sparse_weights=True)
    built = build_engine(onnx_file, s, trt=fake, cache_dir=tmp_path / "cache", compute_capability="9.0")
    assert built.plan[:4] == b"ftrt" and not built.cached
    (flags,) = fake.recorded("builder", "create_network")[0]
    assert flags == 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert fake.recorded("parser", "parse_from_file") == [(str(onnx_file),)]
    assert fake.recorded("config", "set_memory_pool_limit") == [(fake.MemoryPoolType.WORKSPACE, 512 << 20)]
    assert fake.recorded("config", "builder_optimization_level") == [(5,)]
    assert fake.recorded("config", "hardware_compatibility_level") == [(fake.HardwareCompatibilityLevel.AMPERE_PLUS,)]
    # one copy of the profile per concurrent execution context (contexts=2 by default)
    assert fake.recorded("profile", "set_shape") == [("x", (1, 1, 16), (3, 5, 16), (8, 64, 16))] * 2
    set_flags = [f for (f,) in fake.recorded("config", "set_flag")]
    assert set_flags == ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "SPARSE_WEIGHTS"]
    assert fake.recorded("config", "clear_flag") == [("TF32",)]          # fp32 stays fp32 unless tf32=true
    for removed in ("FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS"):
        assert removed not in set_flags                                   # strongly typed: never a precision flag
    assert fake.recorded("config", "create_timing_cache") == [(b"",)]
    timing = tmp_path / "cache" / "timing-trt{}-sm90.cache".format(".".join(version.split(".")[:2]))
    assert timing.read_bytes() == b"+timing"
    assert built.facts["tensorrt"] == version and built.facts["compute_capability"] == "9.0"
    assert built.facts["plan_magic"] == "ftrt" and built.facts["plan_header"] == built.plan[:32].hex()


def test_eleven_has_no_precision_flags_and_ten_keeps_them():
    assert not hasattr(FakeTensorRT("11.0.0.5").BuilderFlag, "FP16")
    assert hasattr(FakeTensorRT("10.13.0.35").BuilderFlag, "FP16")


def test_defaults_and_timing_cache_reuse(onnx_file, tmp_path):
    fake = FakeTensorRT("10.13.0.35")
    build_engine(onnx_file, _settings(tf32=True), trt=fake, cache_dir=tmp_path, compute_capability="8.6")
    assert fake.recorded("config", "hardware_compatibility_level") == [(fake.HardwareCompatibilityLevel.NONE,)]
    assert [f for (f,) in fake.recorded("config", "set_flag")] == ["TF32"]
    fake2 = FakeTensorRT("10.13.0.35")
    build_engine(onnx_file, _settings(optimization_level=4), trt=fake2, cache_dir=tmp_path, compute_capability="8.6")
    assert fake2.recorded("config", "create_timing_cache") == [(b"+timing",)]   # the first build's cache


def test_engine_cache_hit_and_key(onnx_file, tmp_path):
    fake = FakeTensorRT("10.13.0.35")
    first = build_engine(onnx_file, _settings(), trt=fake, cache_dir=tmp_path, compute_capability="9.0")
    again = build_engine(onnx_file, _settings(), trt=fake, cache_dir=tmp_path, compute_capability="9.0")
    assert again.cached and again.plan == first.plan and fake.builds == 1
    other = build_engine(onnx_file, _settings(), trt=fake, cache_dir=tmp_path, compute_capability="8.9")
    assert not other.cached and fake.builds == 2
    digest = trt_backend.onnx_digest(onnx_file)
    base = cache_key(digest, _settings(), "10.13.0.35", "9.0")
    changed = [cache_key("0" * 64, _settings(), "10.13.0.35", "9.0"),
               cache_key(digest, _settings(), "10.14.0.1", "9.0"),
               cache_key(digest, _settings(), "10.13.0.35", "8.0"),
               cache_key(digest, _settings(timing_cache=None, workspace_mib=1024), "10.13.0.35", "9.0"),
               cache_key(digest, _settings(profiles={"default": {"x": {"min": [1, 1, 16], "opt": [4, 5, 16],
                                                                       "max": [8, 64, 16]}}}), "10.13.0.35", "9.0")]
    assert len({base, *changed}) == 6                       # every input of the key changes it
    assert cache_key(digest, _settings(timing_cache="/tmp/x"), "10.13.0.35", "9.0") == base   # not the timing cache


def test_parser_and_build_failures_are_clear(onnx_file, tmp_path):
    fake = FakeTensorRT("11.0.0.5")
    fake.parse_errors = ["node_attention (Attention): unsupported attribute softcap"]
    with pytest.raises(BackendError, match="(?s)ONNX parser rejected.*node_attention.*graphopt check"):
        build_engine(onnx_file, _settings(), trt=fake, cache_dir=tmp_path, compute_capability="9.0")
    fake = FakeTensorRT("11.0.0.5")
    fake.build_fails = True
    with pytest.raises(BackendError, match="could not build an engine"):
        build_engine(onnx_file, _settings(), trt=fake, cache_dir=tmp_path, compute_capability="9.0")
    with pytest.raises(BackendError, match="too old"):
        build_engine(onnx_file, _settings(), trt=FakeTensorRT("8.6.1"), cache_dir=tmp_path, compute_capability="9.0")


def test_settings_validation():
    with pytest.raises(BackendError, match="hardware_compatibility"):
        _settings(hardware_compatibility="turing")
    with pytest.raises(BackendError, match="exclude_lean_runtime needs version_compatible"):
        _settings(exclude_lean_runtime=True)
    with pytest.raises(BackendError, match="strongly typed"):
        _settings(strongly_typed=False)
    with pytest.raises(ArtifactError, match="unknown builder settings"):
        BuildSettings.from_json({**_settings().to_json(), "fp16": True})


def test_trtexec_command():
    cmd = trt_backend.trtexec_command(_settings(hardware_compatibility="ampere_plus", version_compatible=True,
                                                sparse_weights=True))
    assert cmd.startswith("trtexec --onnx=model.onnx --saveEngine=model.plan --stronglyTyped")
    for part in ("--memPoolSize=workspace:4096M", "--builderOptimizationLevel=3", "--minShapes=x:1x1x16",
                 "--optShapes=x:3x5x16", "--maxShapes=x:8x64x16", "--hardwareCompatibilityLevel=ampere+",
                 "--versionCompatible", "--sparsity=enable", "--noTF32"):
        assert part in cmd
    assert "--fp16" not in cmd and "--int8" not in cmd


# -- profiles from dynamic dims -------------------------------------------------------------------
def _fake_ir(inputs, examples, generation=None, sparsity=None):
    return SimpleNamespace(inputs=inputs, example_inputs=[torch.zeros(s, dtype=torch.long) for s in examples],
                           meta={"generation": generation, "sparsity": sparsity})


def test_profiles_default_and_kv_cache():
    ids = TensorSpec("input_ids", "int64", ["batch", "seq"], {0: (1, 16), 1: (2, 256)})
    mask = TensorSpec("attention_mask", "int64", ["batch", "seq"], {0: (1, 16), 1: (2, 256)})
    ir = _fake_ir([ids, mask], [(2, 16), (2, 16)])
    assert trt_backend.profiles_for(ir) == {"default": {
        "input_ids": {"min": [1, 2], "opt": [2, 16], "max": [16, 256]},
        "attention_mask": {"min": [1, 2], "opt": [2, 16], "max": [16, 256]}}}

    ids = TensorSpec("input_ids", "int64", ["batch", "seq"], {0: (1, 16), 1: (1, 256)})
    past = TensorSpec("past_key_0", "float32", ["batch", 2, "past", 8], {0: (1, 16), 2: (0, 255)})
    gen = {"kind": "kv-cache", "ids": "input_ids", "cache_inputs": ["past_key_0"]}
    ir = _fake_ir([ids, past], [(2, 16), (2, 2, 0, 8)], gen)
    profiles = trt_backend.profiles_for(ir)
    assert list(profiles) == ["prefill", "decode"]
    assert profiles["prefill"]["input_ids"] == {"min": [1, 1], "opt": [2, 16], "max": [16, 256]}
    assert profiles["prefill"]["past_key_0"] == {"min": [1, 2, 0, 8], "opt": [2, 2, 0, 8], "max": [16, 2, 0, 8]}
    assert profiles["decode"]["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [16, 1]}
    assert profiles["decode"]["past_key_0"] == {"min": [1, 2, 1, 8], "opt": [2, 2, 127, 8], "max": [16, 2, 255, 8]}
    settings = trt_backend.settings_for(_fake_ir([ids, past], [(2, 16), (2, 2, 0, 8)], gen, {"pattern": "2:4"}), {})
    assert settings.sparse_weights is True
    assert trt_backend.settings_for(ir, {}).sparse_weights is False


# -- plan header checks ---------------------------------------------------------------------------
def test_check_plan_refuses_mismatches_before_deserializing(tmp_path):
    plan = tmp_path / "model.plan"
    data = b"ftrt" + bytes(range(60))
    plan.write_bytes(data)
    facts = {"tensorrt": "10.13.0.35", "compute_capability": "9.0", **trt_backend.plan_header(data)}
    check_plan(plan, facts, trt_version="10.13.0.35", compute_capability="9.0")   # ok
    with pytest.raises(ArtifactError, match="built with TensorRT 10.13.0.35 but TensorRT 10.14.1 is installed"):
        check_plan(plan, facts, trt_version="10.14.1", compute_capability="9.0")
    with pytest.raises(ArtifactError, match="(?s)compute capability 9.0 but this GPU is 8.6.*build-engine"):
        check_plan(plan, facts, trt_version="10.13.0.35", compute_capability="8.6")
    check_plan(plan, {**facts, "hardware_compatibility": "ampere_plus"}, trt_version="10.13.0.35", compute_capability="8.6")
    check_plan(plan, {**facts, "version_compatible": True}, trt_version="10.14.1", compute_capability="9.0")
    with pytest.raises(ArtifactError, match="built with TensorRT"):
        check_plan(plan, {**facts, "version_compatible": True}, trt_version="11.0.0", compute_capability="9.0")
    plan.write_bytes(b"ftrt" + bytes(range(1, 61)))
    with pytest.raises(ArtifactError, match="header .* differs"):
        check_plan(plan, facts, trt_version="10.13.0.35", compute_capability="9.0")
    plan.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ArtifactError, match="not a TensorRT plan"):
        check_plan(plan, facts, trt_version="10.13.0.35", compute_capability="9.0")


# -- the CLI and artifacts without TensorRT -------------------------------------------------------
@pytest.fixture(scope="module")
def trt_artifact(tmp_path_factory):
    """``graphopt compile ... --target tensorrt`` here (no TensorRT): the ONNX + build.json artifact."""
    out = tmp_path_factory.mktemp("trt") / "mlp-trt"
    code = main(["compile", MLP, "--target", "tensorrt", "--out", str(out), "-q", "--report", "json"])
    return code, out


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour where TensorRT is absent")
def test_compile_without_tensorrt_writes_onnx_build_json_and_says_so(trt_artifact, capsys):
    code, out = trt_artifact
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    payload = manifest["payload"]
    assert manifest["target"] == "tensorrt" and payload["engine"] is None and payload["onnx"] == "model.onnx"
    assert {"model.onnx", "build.json"} <= set(manifest["files"]) and "model.plan" not in manifest["files"]
    assert manifest["verification"]["lowering_error_vs_original"] <= 1e-4    # the ONNX ran in ONNX Runtime
    build = json.loads((out / "build.json").read_text())
    assert build["settings"]["strongly_typed"] is True and build["onnx_sha256"] == trt_backend.onnx_digest(out / "model.onnx")
    assert build["profiles"]["default"]["x"] == {"min": [1, 1, 16], "opt": [3, 5, 16], "max": [8, 64, 16]}
    assert build["trtexec"].startswith("trtexec --onnx=model.onnx") and "--minShapes=x:1x1x16,mask:1x1" in build["trtexec"]
    assert payload["check"]["errors"] == 0
    report = json.loads((out / "report.json").read_text())
    assert any("no TensorRT engine was built: the tensorrt Python module is not installed" in n
               for n in report["lowering"]["notes"])
    with pytest.raises(ArtifactError, match="(?s)no TensorRT engine yet.*build-engine"):
        graphopt.load(out)


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour where TensorRT is absent")
def test_require_engine_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["compile", MLP, "--target", "tensorrt", "--require-engine", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--require-engine" in err and "tensorrt Python module is not installed" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["compile", MLP, "--target", "onnx", "--require-engine", "--out", str(out), "-q"]) == 2
    assert "applies to --target tensorrt" in capsys.readouterr().err


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour where TensorRT is absent")
def test_build_engine_here_says_what_is_missing(trt_artifact, capsys):
    _, out = trt_artifact
    assert main(["build-engine", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tensorrt Python module is not installed" in err and "trtexec --onnx=model.onnx" in err
    onnx_dir = out.with_name("mlp-onnx")
    assert main(["compile", MLP, "--out", str(onnx_dir), "-q", "--report", "json"]) == 0
    capsys.readouterr()
    assert main(["build-engine", str(onnx_dir)]) == 2
    assert "compiled for target 'onnx'" in capsys.readouterr().err


def test_build_engine_in_place_with_the_fake(trt_artifact, tmp_path):
    """A GPU node, simulated: the fake builds a "plan", the artifact is swapped in atomically."""
    import shutil

    from graphopt.artifact import read_manifest, verify_checksums

    _, src = trt_artifact
    art = tmp_path / "art"
    shutil.copytree(src, art)
    fake = FakeTensorRT("11.0.0.5")
    facts = build_engine_in_place(art, trt=fake, cache_dir=tmp_path / "cache", verify=False, compute_capability="9.0")
    assert facts["status"] == "built" and facts["tensorrt"] == "11.0.0.5"
    manifest = read_manifest(art)
    verify_checksums(art, manifest)
    assert manifest["payload"]["engine"]["cache_key"] == facts["cache_key"] and "model.plan" in manifest["files"]
    assert (art / "model.plan").read_bytes()[:4] == b"ftrt" and not list(tmp_path.glob(".art.*"))
    again = build_engine_in_place(art, trt=fake, cache_dir=tmp_path / "cache", verify=False, compute_capability="9.0")
    assert again["status"] == "present" and fake.builds == 1
    fake.parse_errors = ["boom"]   # a failing rebuild leaves the artifact as it was
    before = (art / "manifest.json").read_bytes()
    with pytest.raises(BackendError, match="boom"):
        build_engine_in_place(art, trt=fake, cache_dir=tmp_path / "other", rebuild=True, verify=False,
                              compute_capability="9.0")
    assert (art / "manifest.json").read_bytes() == before
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="needs an NVIDIA GPU"):
            trt_backend.TensorRTBackend(trt=fake).load(art, manifest)


# -- real TensorRT: build, run, compare with ONNX Runtime ------------------------------------------
def _need_trt_and_gpu():
    if not HAVE_TRT:
        pytest.skip("needs the tensorrt Python module (TensorRT 10.x/11.x), which is not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU, and torch sees none")


@pytest.mark.tensorrt
@pytest.mark.parametrize("pipeline", ["cleanup", "cleanup,precision"])
def test_real_engine_matches_onnx_runtime(tmp_path, pipeline):
    _need_trt_and_gpu()
    from tests.backends.tensorrt_models import mlp

    module, inputs, dynamic = mlp()
    trt_art = graphopt.compile(module, inputs, pipeline, target="tensorrt", out=tmp_path / "trt", dynamic=dynamic,
                               target_options={"build": True, "cache_dir": str(tmp_path / "cache")})
    assert trt_art.manifest["payload"]["engine"]["plan_magic"] == "ftrt"
    ort_art = graphopt.compile(module, inputs, pipeline, target="onnx", out=tmp_path / "ort", dynamic=dynamic)
    trt_eng, ort_eng = graphopt.load(trt_art.path), graphopt.load(ort_art.path)
    for batch, seq in ((1, 17), (4, 9)):
        x, m = torch.randn(batch, seq, 16), torch.rand(batch, seq)
        for got, want in zip(trt_eng(x.cuda(), m.cuda()), ort_eng(x, m)):
            torch.testing.assert_close(got.float().cpu(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.tensorrt
def test_real_engine_is_safe_from_threads_and_build_engine_completes(tmp_path):
    _need_trt_and_gpu()
    from concurrent.futures import ThreadPoolExecutor

    from tests.backends.tensorrt_models import mlp

    module, inputs, dynamic = mlp()
    art = graphopt.compile(module, inputs, "cleanup", target="tensorrt", out=tmp_path / "a", dynamic=dynamic,
                           target_options={"build": False})
    assert main(["build-engine", str(art.path), "--cache-dir", str(tmp_path / "cache")]) == 0
    eng = graphopt.load(art.path)
    xs = [(torch.randn(2, 3 + i % 5, 16).cuda(), torch.ones(2, 3 + i % 5).cuda()) for i in range(16)]
    single = [eng(*x) for x in xs]
    with ThreadPoolExecutor(8) as pool:
        multi = list(pool.map(lambda x: eng(*x), xs))
    for a, b in zip(single, multi):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_runner_context_pool_never_shares_a_profile_copy():
    """TensorRT allows one context per optimization profile at a time (dynamic shapes): the runner
    hands each concurrent call a context bound to its own copy of the profile, and waits for one
    when every copy is busy."""
    import threading

    from graphopt.runtime.tensorrt_runner import TensorRTRunner

    class Ctx:
        def __init__(self):
            self.physical = 0

        def set_optimization_profile_async(self, index, stream):
            self.physical = index

    class Engine:
        num_optimization_profiles = 4   # 2 profiles (prefill, decode) x 2 copies

        def create_execution_context(self):
            return Ctx()

    runner = object.__new__(TensorRTRunner)   # the pool only; no GPU needed
    runner.engine, runner.n_profiles = Engine(), 2
    runner.plan_path, runner.torch_device = Path("model.plan"), "cuda"
    runner._lock, runner._closed = threading.Condition(), False
    runner._idle = {0: [], 1: []}
    runner._unused = {0: [0, 2], 1: [1, 3]}
    runner._new_stream = lambda: SimpleNamespace(cuda_stream=0)
    held, peak, seen, lock = set(), [0], set(), threading.Lock()

    first = [0]

    def call(profile):
        item = runner._acquire(profile)
        try:
            with lock:
                assert item[0].physical not in held       # never two calls on one profile copy
                assert item[0].physical % 2 == profile    # a copy of the profile the shapes fit
                held.add(item[0].physical)
                seen.add(item[0].physical)
                peak[0] = max(peak[0], len(held))
                first[0] += 1
                wait = first[0] <= 4
            # the first four calls hold their copies until all four are held: nothing is released
            # before, so they are two per profile, every copy the pool has, whatever the scheduling
            # (a short sleep was flaky on a loaded machine). Later calls do not wait: a barrier for
            # every call deadlocked when the last calls left were of one profile, which has only
            # two copies
            if wait:
                rendezvous.wait()
            with lock:
                held.discard(item[0].physical)
        finally:
            runner._release(profile, item)

    rendezvous = threading.Barrier(4, timeout=30)
    threads = [threading.Thread(target=call, args=(i % 2,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0, 1, 2, 3} and peak[0] <= 4
    runner.close()
    with pytest.raises(ArtifactError, match="closed"):
        runner._acquire(0)
