"""The third-party plugin sample (samples/02_third_party_plugin) installs with pip and graphopt
finds it through its entry point: ``graphopt plugins`` / ``passes`` list it and ``graphopt
compile`` runs its pass.

The package is pip-installed into the running environment for this module and uninstalled after
(from a copy, so the build leaves nothing in the checkout). If it was installed before the tests
ran, it is used as it is and left installed.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "samples" / "02_third_party_plugin"
MODEL = REPO_ROOT / "tests" / "data" / "scaled_linear_model.py"
DIST = "graphopt-linear-scale"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def _installed() -> bool:
    try:
        md.distribution(DIST)
        return True
    except md.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    if _installed():
        yield "already installed"
        return
    if _pip("--version").returncode != 0:
        pytest.skip(f"pip is not available in {sys.executable}; cannot install the sample plugin")
    try:
        import setuptools  # noqa: F401  (--no-build-isolation builds with the environment's setuptools)
    except ImportError:
        pytest.skip("setuptools is not installed; the sample plugin cannot be built without network access")
    src = tmp_path_factory.mktemp("plugin") / "02_third_party_plugin"
    shutil.copytree(SAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    res = _pip("install", "--no-deps", "--no-build-isolation", "-q", str(src))
    assert res.returncode == 0, f"pip install of the sample plugin failed:\n{res.stdout}\n{res.stderr}"
    try:
        yield "installed"
    finally:
        res = _pip("uninstall", "-y", DIST)
        assert res.returncode == 0, f"pip uninstall {DIST} failed:\n{res.stdout}\n{res.stderr}"


def graphopt_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed ``graphopt`` command (plugin environment variables cleared)."""
    script = Path(sys.executable).with_name("graphopt")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "graphopt.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("GRAPHOPT_PLUGINS", "GRAPHOPT_DISABLE_PLUGINS")}
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def test_plugins_lists_the_entry_point(installed_plugin, tmp_path):
    assert "linear-scale" in _ok(graphopt_cli("plugins", cwd=tmp_path))
    plugins = {p["name"]: p for p in json.loads(_ok(graphopt_cli("plugins", "--json", cwd=tmp_path)))}
    info = plugins["linear-scale"]
    assert info["status"] == "ok", info
    assert info["passes"] == ["fold-linear-scale"]
    assert info["module"] == "graphopt_linear_scale"
    assert DIST in info["source"]  # "entry point (graphopt-linear-scale 0.1.0)"


def test_passes_lists_the_pass(installed_plugin, tmp_path):
    out = _ok(graphopt_cli("passes", cwd=tmp_path))
    assert "fold-linear-scale  [linear-scale]" in out
    assert "option min_abs: float = 0.0" in out


def test_compile_runs_the_pass(installed_plugin, tmp_path):
    out = tmp_path / "art"
    _ok(graphopt_cli("compile", f"{MODEL}:build", "--pipeline", "cleanup,fold-linear-scale", "--out", str(out),
                     "--report", "json", cwd=tmp_path))
    report = json.loads((out / "report.json").read_text())
    (rec,) = [r for r in report["passes"] if r["name"] == "fold-linear-scale"]
    assert rec["plugin"] == "linear-scale"
    assert rec["stats"]["folded"] == 1
    assert rec["verify"]["passed"], rec["verify"]
    assert report["verification"]["passed"]
