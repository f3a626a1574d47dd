"""The `graphopt` command end to end: compile → run on every sample model and target, the wrong
pass caught and bisected, tampered artifacts refused, bad input → exit 2.

Most tests call ``graphopt.cli.main`` in-process (same code path as the console script, minus
interpreter start-up); one runs the installed console script as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphopt.cli import main

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "samples" / "models"
BROKEN = "tests.plugins.broken_add"


@pytest.fixture
def unregister_broken():
    yield
    from graphopt.plugins import get_plugin_manager

    get_plugin_manager().unregister_plugin(BROKEN)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def nanogpt_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "nanogpt"
    assert main(["compile", f"{MODELS}/nanogpt.py:build", "--pipeline", "cleanup", "--out", str(out), "-q"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "torch"])
@pytest.mark.parametrize("model", ["nanogpt", "hf_llama", "hf_gpt2", "minilm"])
def test_compile_then_run_reproduces_the_module(capsys, tmp_path, model, target):
    out = tmp_path / f"{model}-{target}"
    code, stdout, _ = run_cli(capsys, "compile", f"{MODELS}/{model}.py:build", "--pipeline", "cleanup",
                              "--target", target, "--out", out, "-q")
    assert code == 0, stdout
    assert "remove-noops" in stdout and "lower:" + target in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == target and manifest["verification"]["passed"] is True
    assert manifest["verification"]["lowering_error_vs_original"] <= 1e-4
    code, stdout, _ = run_cli(capsys, "run", out)
    assert code == 0, stdout
    err = float(stdout.split("max abs error vs the original module: ")[1].split()[0])
    assert err <= 1e-4


def test_console_script_demo_and_exit_codes(tmp_path):
    exe = shutil.which("graphopt", path=os.path.dirname(sys.executable)) or shutil.which("graphopt")
    assert exe, "the graphopt console script is not installed (pip install -e .)"
    out = tmp_path / "nanogpt"
    p = subprocess.run([exe, "compile", f"{MODELS}/nanogpt.py:build", "--pipeline", "cleanup", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "[1/4] remove-noops" in p.stderr  # progress per pass
    assert "err vs orig" in p.stdout  # the per-pass verification report
    assert {"manifest.json", "report.json", "report.html", "model.onnx"} <= {f.name for f in out.iterdir()}
    p = subprocess.run([exe, "run", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "(ok" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([exe, "compile", "no/such/file.py:build"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_console_entry_runs_exit_handlers_and_keeps_the_exit_code(tmp_path):
    """``graphopt`` (cli.run) exits without the interpreter's teardown, after the atexit handlers
    (temporary files, log handlers) and with main's exit code and everything printed."""
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, pathlib, sys\n"
            f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
            "from graphopt import cli\n"
            "sys.argv = ['graphopt'] + sys.argv[1:]\n"
            "cli.run()\n")
    p = subprocess.run([sys.executable, "-c", code, "passes"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "kv-cache" in p.stdout and marker.read_text() == "yes"
    p = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "none")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr


def test_run_with_inputs_and_output(capsys, tmp_path, nanogpt_artifact):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", idx=rng.integers(0, 65, size=(3, 20)).astype(np.int64))
    code, stdout, _ = run_cli(capsys, "run", nanogpt_artifact, "--inputs", tmp_path / "x.npz",
                              "--output", tmp_path / "y.npz")
    assert code == 0
    with np.load(tmp_path / "y.npz") as z:
        assert z["output"].shape == (3, 20, 65)


def test_tampered_payload_exits_2_with_a_checksum_message(capsys, tmp_path, nanogpt_artifact):
    art = tmp_path / "art"
    shutil.copytree(nanogpt_artifact, art)
    payload = art / "model.onnx"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))
    code, _, stderr = run_cli(capsys, "run", art)
    assert code == 2
    assert "checksum mismatch" in stderr and "model.onnx" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("args, fragment", [
    (["compile", "samples/models/nanogpt.py"], "must be path/to/file.py:factory"),
    (["compile", f"{MODELS}/nanogpt.py:nope"], "has no function 'nope'"),
    (["compile", f"{MODELS}/nanogpt.py:build", "--pipeline", "cleanup,nope"], "unknown pass 'nope'; valid names:"),
    (["compile", f"{MODELS}/nanogpt.py:build", "--pipeline", "remove-noops(x=1)"], "has no option 'x'"),
    (["compile", f"{MODELS}/nanogpt.py:build", "--target", "tpu"], "unknown target 'tpu'; valid targets: onnx, tensorrt, torch"),
    (["compile", f"{MODELS}/nanogpt.py:build", "--dynamic", "idx:1=2"], "NAME:DIM=MIN..MAX"),
    (["compile", f"{MODELS}/nanogpt.py:build", "--dynamic", "idx:1=2..4"], "outside its dynamic range"),
    (["run", "/no/such/artifact"], "does not exist"),
    (["inspect", "/no/such/artifact"], "does not exist"),
    (["bisect", f"{MODELS}/nanogpt.py:build"], "--pipeline is required"),
    (["generate", "/no/such/artifact", "--ids", "1,2"], "does not exist"),
])
def test_bad_input_exits_2_with_a_clear_message(capsys, args, fragment):
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2, stderr
    assert fragment in stderr and "Traceback" not in stderr


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--pipeline", "a", "--config", "b.toml"])
    assert e.value.code == 2
    assert main([]) == 2


def test_run_rejects_inputs_of_the_wrong_shape(capsys, tmp_path, nanogpt_artifact):
    np.savez(tmp_path / "bad.npz", idx=np.ones((2, 80), dtype=np.int64))
    code, _, stderr = run_cli(capsys, "run", nanogpt_artifact, "--inputs", tmp_path / "bad.npz")
    assert code == 2 and "outside its compiled dynamic range [2, 63]" in stderr


def test_wrong_pass_is_caught_named_and_reproduced(capsys, tmp_path, unregister_broken):
    out = tmp_path / "broken"
    code, _, stderr = run_cli(capsys, "-p", BROKEN, "compile", f"{MODELS}/nanogpt.py:build",
                              "--pipeline", "cleanup,break-add", "--out", out, "-q")
    assert code == 1, stderr
    assert "verification failed after pass 'break-add' (#5 of 5, policy exact)" in stderr
    assert "passes before it: remove-noops, fold-constants, eliminate-common-subexpressions, eliminate-dead-code" in stderr
    assert "worst output: output" in stderr
    assert "first diverging node: %add" in stderr and "aten.sub.Tensor" in stderr
    assert not out.exists(), "a failed compile must not leave an artifact"
    repro = Path(str(out) + ".repro")
    assert {"original.pt2", "inputs.npz", "pipeline.txt", "failure.json", "README.txt"} <= {f.name for f in repro.iterdir()}
    assert json.loads((repro / "failure.json").read_text())["pass"] == "break-add"

    # graphopt bisect replays the reproducer: guilty pass, rewrite and node
    code, stdout, _ = run_cli(capsys, "-p", BROKEN, "bisect", repro)
    assert code == 1
    assert "guilty pass: break-add (#5" in stdout
    assert "guilty rewrite: #1 of 1: break-add: add" in stdout
    assert "guilty node: %add" in stdout


def test_bisect_from_a_model_finds_pass_and_node(capsys, unregister_broken):
    code, stdout, _ = run_cli(capsys, "-p", BROKEN, "bisect", f"{MODELS}/hf_gpt2.py:build",
                              "--pipeline", "remove-noops,break-add,eliminate-dead-code")
    assert code == 1
    assert "guilty pass: break-add (#2; passes before it: remove-noops)" in stdout
    assert "guilty node: %add" in stdout


def test_bisect_reports_a_clean_pipeline(capsys):
    code, stdout, _ = run_cli(capsys, "bisect", f"{MODELS}/nanogpt.py:build", "--pipeline", "cleanup")
    assert code == 0 and "no pass breaks verification" in stdout


def test_dump_ir_and_inspect(capsys, tmp_path):
    out, dumps = tmp_path / "art", tmp_path / "ir"
    code, _, _ = run_cli(capsys, "compile", f"{MODELS}/nanogpt.py:build", "--pipeline", "remove-noops,dce",
                         "--out", out, "--dump-ir", dumps, "-q", "--target", "torch")
    assert code == 0
    names = sorted(f.name for f in dumps.iterdir())
    assert names == ["000_capture.txt", "001_remove_noops.txt", "002_eliminate_dead_code.txt"]
    assert "aten.linear" in (dumps / "001_remove_noops.txt").read_text()
    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0
    assert "all" in stdout and "match their sha256" in stdout and "remove-noops" in stdout


def test_config_file(capsys, tmp_path):
    cfg = tmp_path / "build.toml"
    cfg.write_text(f'model = "{MODELS}/nanogpt.py:build"\ntarget = "torch"\nout = "art"\n'
                   'pipeline = "remove-noops,eliminate-dead-code"\n')
    code, stdout, _ = run_cli(capsys, "compile", "--config", cfg, "-q")
    assert code == 0, stdout
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"] == "torch" and manifest["pipeline"] == "remove-noops,eliminate-dead-code"


def test_passes_and_plugins_listings(capsys):
    code, stdout, _ = run_cli(capsys, "passes")
    assert code == 0
    assert "remove-noops  [graphopt-cleanup]" in stdout and "option" in stdout or "verification: exact" in stdout
    assert "cleanup = remove-noops,fold-constants,eliminate-common-subexpressions,eliminate-dead-code" in stdout
    code, stdout, _ = run_cli(capsys, "plugins")
    assert code == 0
    assert "graphopt-cleanup" in stdout and "[ok]" in stdout and "backends: onnx, torch" in stdout


def test_generate_with_ids(capsys, nanogpt_artifact):
    code, stdout, _ = run_cli(capsys, "generate", nanogpt_artifact, "--ids", "1,2,3", "--max-new-tokens", "5")
    assert code == 0
    ids = [int(x) for x in stdout.strip().split(",")]
    assert ids[:3] == [1, 2, 3] and len(ids) == 8
    code, _, stderr = run_cli(capsys, "generate", nanogpt_artifact, "--prompt", "hello")
    assert code == 2 and "no tokenizer.json" in stderr


def test_generate_prompt_on_the_trained_model(capsys, tmp_path):
    """graphopt generate --prompt on the trained decoder with a KV cache prints readable text."""
    if not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent (the Shakespeare factory reads its held-out text)")
    out = tmp_path / "bard"
    code, _, _ = run_cli(capsys, "compile", f"{MODELS}/shakespeare.py:build", "--pipeline", "cleanup,fuse,kv-cache",
                         "--out", out, "-q")
    assert code == 0
    assert (out / "tokenizer.json").is_file()  # from the factory file's TOKENIZER
    code, stdout, _ = run_cli(capsys, "generate", out, "--prompt", "ROMEO:\nI", "--max-new-tokens", "48")
    assert code == 0
    text = stdout
    assert text.startswith("ROMEO:\nI")
    letters = sum(c.isalpha() or c.isspace() or c in ",.;:'!?-" for c in text)
    assert letters / len(text) > 0.95, text
    words = {w.strip(",.;:!?'").lower() for w in text.split()}
    assert len(words & {"the", "and", "i", "you", "my", "to", "of", "a", "me", "is", "not", "that", "your", "with"}) >= 3, text
