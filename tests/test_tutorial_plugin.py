"""The README's "Write your first pass" tutorial, built from its text: its files are written into
a fresh folder, the package is pip-installed into a folder of its own (on the PYTHONPATH of one
subprocess only, so no other test sees the plugin) and its own tests run there. The tutorial must
stay under 80 lines of code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def tutorial_files() -> dict[str, str]:
    text = README.read_text()
    start = text.index("### Write your first pass")
    section = text[start:text.index("\n## ", start)]
    files = {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", section, re.S):
        first, _, _ = block.partition("\n")
        if first.startswith("# file: "):
            files[first[len("# file: "):].strip()] = block
    return files


def test_the_tutorial_is_three_files_under_80_lines():
    files = tutorial_files()
    assert set(files) == {"pyproject.toml", "graphopt_silu/__init__.py", "tests/test_fuse_silu.py"}
    code = sum(1 for body in files.values() for line in body.splitlines() if line.strip())
    assert code < 80, code


def test_the_tutorial_plugin_installs_and_passes_its_tests(tmp_path):
    try:
        import setuptools  # noqa: F401  (--no-build-isolation builds with the environment's setuptools)
    except ImportError:
        pytest.skip("setuptools is not installed; the tutorial plugin cannot be built without network access")
    src, site = tmp_path / "src", tmp_path / "site"
    for rel, body in tutorial_files().items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(body)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip install of the tutorial plugin failed:\n{res.stdout}\n{res.stderr}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHOPT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=src,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "3 passed" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
