"""Every sample's README commands run (STYLE habit 7).

The commands are the lines of ```bash blocks in ``samples/NN_*/README.md`` that start with
``.venv/bin/``; they run from the repo root with ``.venv/bin/`` mapped to this interpreter's
folder and ``build/`` redirected into a temporary directory. Samples whose commands install
packages are covered by their own tests (tests/test_third_party_plugin.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_commands(readme: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith(".venv/bin/")]


SAMPLES = sorted(p for p in (REPO / "samples").glob("[0-9][0-9]_*") if (p / "README.md").is_file())
CASES = [(s.name, readme_commands(s / "README.md")) for s in SAMPLES]


@pytest.mark.slow
@pytest.mark.parametrize("sample, commands", [c for c in CASES if c[1]], ids=[c[0] for c in CASES if c[1]])
def test_readme_commands_run(sample, commands, tmp_path):
    """The commands of one README run in order (later ones use what earlier ones built)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for command in commands:
        argv = shlex.split(command)
        argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))
        argv = [a.replace("build/", f"{tmp_path}/") if a.startswith("build/") else a for a in argv]
        p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, f"{command}\n{p.stdout}\n{p.stderr}"


def test_every_numbered_sample_has_commands():
    assert SAMPLES, "no samples/NN_*/README.md found"
    for s in SAMPLES:
        if s.name != "02_third_party_plugin":  # installs a package: tests/test_third_party_plugin.py
            assert readme_commands(s / "README.md"), f"{s.name}/README.md has no runnable .venv/bin/ commands"
