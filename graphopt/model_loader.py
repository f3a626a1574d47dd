"""A model spec → (module, example_inputs, dynamic, tokenizer).

Two kinds of spec:

- ``path/to/file.py:factory``: the factory takes no arguments and returns ``(module,
  example_inputs)`` or ``(module, example_inputs, dynamic)`` where ``dynamic`` is
  ``{input: {dim: (min, max)}}``. The file is imported under a private module name with its folder
  on ``sys.path`` (so it can import its neighbours), without touching the caller's ``sys.modules``
  entries of the same name.
- a Hugging Face checkpoint directory (config.json + safetensors + tokenizer):
  :mod:`graphopt.checkpoint` loads it.

:func:`load_model` takes either; ``compile``, ``optimize`` and the CLI go through it.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import InputError, ModelLoadError


@dataclass
class LoadedModel:
    """A resolved model spec: what ``compile`` needs, plus the tokenizer.json to ship (if any)."""

    module: torch.nn.Module
    example_inputs: Any
    dynamic: dict | None
    tokenizer: str | None = None


def load_model(spec: str | Path, *, dtype: Any = None, dynamic: dict | None = None,
               layers: int | None = None) -> LoadedModel:
    """Resolve ``spec``: a checkpoint directory or ``path/to/file.py:factory``.

    ``dtype`` (``float32`` / ``bfloat16`` / ``float16``) and ``dynamic`` shape what a checkpoint
    directory loads as (its example inputs are sized to fit ``dynamic``); for a factory, ``dynamic``
    is left to the caller to merge and ``dtype`` is refused (the factory decides its dtype).
    ``layers`` keeps a checkpoint's first N decoder layers (a draft model for speculative decoding).
    """
    from graphopt.checkpoint import is_checkpoint_dir, load_checkpoint

    if is_checkpoint_dir(spec):
        ck = load_checkpoint(spec, dtype=dtype, dynamic=dynamic, layers=layers)
        return LoadedModel(ck.module, ck.example_inputs, ck.dynamic, str(ck.tokenizer) if ck.tokenizer else None)
    if dtype is not None:
        raise InputError(f"dtype {dtype!r} applies to checkpoint directories; {spec} is a factory file: cast the "
                         "module in the factory (model.to(torch.bfloat16)) instead")
    if layers is not None:
        raise InputError(f"layers={layers!r} applies to checkpoint directories; {spec} is a factory file: build the "
                         "shallower model in the factory instead")
    module_obj, example_inputs, dyn, factory_file = load_factory_with_module(str(spec))
    return LoadedModel(module_obj, example_inputs, dyn, factory_tokenizer(factory_file))


def split_spec(spec: str) -> tuple[Path, str]:
    file, sep, factory = spec.rpartition(":")
    if not sep or not file or not factory:
        raise ModelLoadError(f"model {spec!r} must be path/to/file.py:factory (e.g. samples/models/nanogpt.py:build) "
                             "or a checkpoint directory holding config.json (and it is neither)")
    return Path(file), factory


def load_factory(spec: str, **kwargs: Any) -> tuple[torch.nn.Module, Any, dict | None]:
    module_obj, example_inputs, dynamic, _ = load_factory_with_module(spec, **kwargs)
    return module_obj, example_inputs, dynamic


def factory_tokenizer(python_module: Any) -> str | None:
    """The ``TOKENIZER`` path a factory file may define (a tokenizers ``tokenizer.json``): compile
    copies it into the artifact so ``graphopt generate --prompt`` can tokenize."""
    tok = getattr(python_module, "TOKENIZER", None)
    return str(tok) if tok else None


def load_factory_with_module(spec: str, **kwargs: Any) -> tuple[torch.nn.Module, Any, dict | None, Any]:
    """Like :func:`load_factory`, plus the imported factory file (for its ``TOKENIZER``)."""
    path, factory = split_spec(spec)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist (from {spec!r})")
    if path.suffix != ".py":
        raise ModelLoadError(f"model file {path} is not a .py file; MODEL is path/to/file.py:factory")
    name = f"_graphopt_model_{abs(hash(str(path.resolve())))}"
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ModelLoadError(f"importing {path} failed: {type(e).__name__}: {e}") from e
        fn = getattr(module, factory, None)
        if fn is None or not callable(fn):
            options = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                             and getattr(v, "__module__", None) == name)
            raise ModelLoadError(f"{path} has no function {factory!r}; functions defined there: {options or 'none'}")
        try:
            result = fn(**kwargs)
        except Exception as e:
            raise ModelLoadError(f"{spec} raised {type(e).__name__}: {e}") from e
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise ModelLoadError(f"{spec} must return (module, example_inputs) or (module, example_inputs, dynamic), "
                             f"got {type(result).__name__}")
    module_obj, example_inputs = result[0], result[1]
    dynamic = result[2] if len(result) == 3 else None
    if not isinstance(module_obj, torch.nn.Module):
        raise ModelLoadError(f"{spec} returned a {type(module_obj).__name__} as its module; return a torch.nn.Module")
    return module_obj, example_inputs, dynamic, module


def resolve_model_arg(model: str | Path, example_inputs: Any = None, dynamic: dict | None = None, *,
                      dtype: Any = None, tokenizer: str | Path | None = None, layers: int | None = None
                      ) -> tuple[torch.nn.Module, Any, dict | None, str | Path | None]:
    """``compile("DIR")`` / ``optimize("file.py:factory")``: a model given as a spec →
    ``(module, example_inputs, dynamic, tokenizer)``. What the caller passed explicitly wins:
    its example inputs and tokenizer replace the spec's, its dynamic dims are merged over them."""
    loaded = load_model(model, dtype=dtype, dynamic=dynamic, layers=layers)
    merged = {k: dict(v) for k, v in (loaded.dynamic or {}).items()}
    for name, dims in (dynamic or {}).items():
        merged.setdefault(name, {}).update(dims)
    return (loaded.module, example_inputs if example_inputs is not None else loaded.example_inputs,
            merged or None, tokenizer or loaded.tokenizer)
