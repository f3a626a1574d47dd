"""Small nanoGPT artifacts shared by the production-loading and TensorRT-check tests, compiled once
per test process (``functools.cache``) into one temporary directory, without per-pass verification
(the passes' own tests verify them; these tests check loading, serving and the static checker)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

PIPELINES = {
    "plain": ("cleanup", "onnx"),
    "torch": ("cleanup", "torch"),
    "fused": ("cleanup,fuse", "onnx"),
    "kv-cache": ("cleanup,fuse,kv-cache", "onnx"),
}


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="graphopt-prod-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def nanogpt_artifact(kind: str) -> Path:
    """Compile samples/models/nanogpt.py for ``kind`` (a key of PIPELINES) and return the directory."""
    import torch

    import graphopt
    from tests.conftest import load_sample_model

    pipeline, target = PIPELINES[kind]
    model, example_inputs, dynamic = load_sample_model("nanogpt").build()
    out = _workdir() / kind
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graphopt.compile(
            model,
            example_inputs,
            pipeline=pipeline,
            target=target,
            out=out,
            dynamic=dynamic,
            verify=False,
            report=None,
        )
    finally:
        torch.set_num_threads(before)
    return out
