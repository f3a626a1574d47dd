"""Shared pytest helpers.

The repo root is not necessarily on ``sys.path``, so sample model factories
under ``samples/models/`` are imported by file path.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MODELS_DIR = REPO_ROOT / "samples" / "models"


def load_sample_model(name: str):
    """Import ``samples/models/<name>.py`` by path and return the module.

    The module is registered in ``sys.modules`` (under a private name) before
    it is executed, which ``dataclasses`` and pickling need.
    """
    mod_name = f"_graphopt_sample_models_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = SAMPLE_MODELS_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load sample model {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


def split_inputs(example_inputs):
    """``(args, kwargs)`` from a factory's tuple-or-dict example inputs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def dynamic_shapes_from_spec(module, example_inputs, dynamic):
    """Turn a factory's ``{input: {dim: (min, max)}}`` spec into export Dims.

    Returns a tuple (positional inputs, in ``forward`` signature order) or a
    dict (keyword inputs) suitable for ``torch.export.export(dynamic_shapes=)``.
    Entries with the same dim index and the same (min, max) share one
    ``torch.export.Dim`` (e.g. ``input_ids`` and ``attention_mask`` dims).
    """
    import torch

    if not dynamic:
        return None
    dims: dict = {}

    def dim_for(idx: int, lo: int, hi: int):
        key = (idx, lo, hi)
        if key not in dims:
            base = {0: "batch", 1: "seq"}.get(idx, f"dim{idx}")
            name = base if not any(k[0] == idx for k in dims) else f"{base}_{lo}_{hi}"
            dims[key] = torch.export.Dim(name, min=lo, max=hi)
        return dims[key]

    def shapes_for(name: str):
        spec = dynamic.get(name)
        if not spec:
            return None
        return {int(i): dim_for(int(i), int(lo), int(hi)) for i, (lo, hi) in spec.items()}

    if isinstance(example_inputs, dict):
        return {name: shapes_for(name) for name in example_inputs}
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = set(dynamic) - set(params[: len(example_inputs)])
    if unknown:
        raise KeyError(f"dynamic spec names {sorted(unknown)} are not positional inputs {params}")
    return tuple(shapes_for(params[i]) for i in range(len(example_inputs)))


@pytest.fixture(scope="session")
def sample_model_loader():
    """Fixture returning :func:`load_sample_model`."""
    return load_sample_model


@pytest.fixture(scope="session")
def sample_models():
    """Namespace of the sample-model helpers (``load``, ``split_inputs``,
    ``dynamic_shapes_from_spec``), so tests need not ``import conftest``."""
    return SimpleNamespace(
        load=load_sample_model,
        split_inputs=split_inputs,
        dynamic_shapes_from_spec=dynamic_shapes_from_spec,
    )
