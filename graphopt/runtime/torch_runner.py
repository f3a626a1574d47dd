"""Runs a ``torch.export`` program (``model.pt2``) with PyTorch.

Unpickling: ``torch.export.load`` (torch 2.13) is NOT pickle-free on its own. The graph
(``models/*.json``) and plain weights/constants (raw bytes + JSON metadata) are read without
pickle, but ``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py`` also

- ``torch.load(weights_only=False)`` weights and constants whose config says ``use_pickle``
  (tensor subclasses), and legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` files;
- ``torch._C._pickle_load_obj`` / ``pickle.loads`` constants named ``custom_obj_*`` /
  ``opaque_obj_*`` (script and opaque objects);
- ``torch.load`` the sample inputs with ``weights_only=True`` and, if that fails, AGAIN with
  ``weights_only=False``;
- load compiled AOTInductor shared libraries found under ``data/aotinductor/``.

So before handing a file to ``torch.export.load``, :func:`check_pt2_archive` accepts only what
graphopt writes: an allow-list of entries, configs with ``use_pickle: false`` and tensor file
names only, and sample inputs that ``torch.load(weights_only=True)`` (the restricted unpickler,
which builds tensors and containers only) can read, so the unsafe fallback never runs.

Devices: ``device=None`` picks CUDA when torch sees a GPU, else CPU. The program is moved with
``torch.export.passes.move_to_device_pass`` (which also rewrites device constants inside the
graph, unlike ``Module.to``). Outputs are returned on the runner's device (no copy back to the
host); callers that need CPU tensors call ``.cpu()``.

Thread safety: the unlifted ``GraphModule`` holds no per-call state (graphopt's programs take
their KV cache as inputs and return it; no buffer is mutated in place) and ``torch.inference_mode``
is thread-local, so one runner serves concurrent calls. Inputs are converted per call and never
written to. A program that does mutate buffers (:func:`mutated_state`, e.g. a hand-written model
updating a buffer in ``forward``) is shared state: its calls are serialized with a lock, so they
stay correct, one at a time. ``close()`` only drops the reference: calls already running keep the
module alive; later calls get an ArtifactError.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from graphopt.backends.base import Runner
from graphopt.errors import ArtifactError, InputError, first_line
from graphopt.runtime.arrays import as_tensor

log = logging.getLogger(__name__)

# Entry kinds (relative to the archive's top folder) that a torch.export.save archive without
# pickled payloads contains. Anything else is refused.
_FIXED_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version",
                  ".data/serialization_id", "version"}


def check_pt2_archive(path: Path) -> None:
    """Refuse a ``.pt2`` file that would make ``torch.export.load`` unpickle or load native code.

    Raises:
        ArtifactError: the file is not a readable archive, or holds an entry outside the allow-list.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1 or any("/" not in n for n in names):
                raise ArtifactError(f"{path} is not a torch.export archive (entries outside one top folder)")
            top = tops.pop()
            rel = {n[len(top) + 1:]: n for n in names}
            if not any(r.startswith("models/") and r.endswith(".json") for r in rel):
                raise ArtifactError(f"{path} holds no models/*.json program; it is not a torch.export.save "
                                    "archive of this torch version (older formats are pickled and refused)")
            for r, full in rel.items():
                _check_entry(path, z, r, full)
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path} is not a readable .pt2 archive: {e}") from e


def _check_entry(path: Path, z: zipfile.ZipFile, rel: str, full: str) -> None:
    parts = PurePosixPath(rel).parts
    if ".." in parts:
        raise ArtifactError(f"{path}: entry {full!r} has '..' in its path")
    if rel in _FIXED_ENTRIES:
        return
    if (rel.startswith("models/") and rel.endswith(".json")) or rel.startswith("extra/"):
        return  # JSON program / strings
    if rel.startswith(("data/weights/", "data/constants/")) and len(parts) == 3:
        name = parts[2]
        if name.endswith("_config.json"):
            _check_payload_config(path, z, full)
            return
        if name.startswith(("weight_", "tensor_")):
            return  # raw tensor bytes
    if rel.startswith("data/sample_inputs/") and rel.endswith(".pt") and len(parts) == 3:
        data = z.read(full)
        if data:
            try:
                with warnings.catch_warnings():  # "pickle protocol 4" notices from a refused file
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(data), weights_only=True)
            except Exception as e:
                raise ArtifactError(f"{path}: sample inputs {full!r} are not plain tensors "
                                    f"(torch.load(weights_only=True) refused them: {type(e).__name__}); "
                                    "refusing to unpickle them") from e
        return
    raise ArtifactError(f"{path}: entry {full!r} is not something graphopt writes (pickled objects, "
                        "compiled AOTInductor code and legacy formats are refused); compile the model "
                        "again with graphopt")


def _check_payload_config(path: Path, z: zipfile.ZipFile, full: str) -> None:
    try:
        config = json.loads(z.read(full))["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: {full!r} is not a payload config: {e}") from e
    for fqn, meta in config.items():
        if not isinstance(meta, dict) or meta.get("use_pickle", True) is not False:
            raise ArtifactError(f"{path}: {fqn!r} in {full!r} is stored pickled (a tensor subclass or "
                                "custom object); graphopt refuses to unpickle artifact data")
        if not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise ArtifactError(f"{path}: {fqn!r} in {full!r} is a {meta.get('path_name')!r} object, "
                                "not a tensor; graphopt refuses to unpickle artifact data")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(dev)!r} was requested but torch sees no CUDA GPU; use device='cpu'")
    return dev


class TorchRunner(Runner):
    """``torch.export.load(model.pt2).module()`` on one device, called under inference mode."""

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"torch program {self.path} does not exist; the artifact directory is "
                                "incomplete: compile the model again")
        check_pt2_archive(self.path)
        dev = resolve_device(device)
        # Passes may insert custom ops (graphopt_fusion's graphopt::rotary_embedding); the plugins
        # that define them register them with torch when they load, which deserializing needs.
        from graphopt.plugins import get_plugin_manager

        get_plugin_manager()
        try:
            ep = torch.export.load(self.path)
            if dev.type != "cpu":
                from torch.export.passes import move_to_device_pass

                ep = move_to_device_pass(ep, dev)
            mutated = mutated_state(ep)
            self.module = ep.module()
        except ArtifactError:
            raise
        except Exception as e:
            missing = _unknown_ops(self.path)
            if missing:
                raise ArtifactError(f"{self.path} uses the op(s) {', '.join(missing)}, which no loaded plugin "
                                    "defines; install (or stop disabling) the plugin whose pass inserted "
                                    "them") from e
            raise ArtifactError(f"torch {torch.__version__} could not load {self.path}: {type(e).__name__}: "
                                f"{first_line(str(e))}. It was probably saved by another torch version; "
                                "compile the model again with this one") from e
        self.device = str(dev)
        self._device = dev
        # Buffers written by forward are state shared by every caller: serialize those programs.
        self.mutated_buffers = mutated
        self._lock: threading.Lock | None = threading.Lock() if self.mutated_buffers else None

    def run(self, inputs: list[Any]) -> list[torch.Tensor]:
        """Run on flat inputs in manifest order (torch tensors or numpy arrays); outputs as torch
        tensors on the runner's device."""
        module = self.module  # one read: close() from another thread cannot pull it away mid-call
        if module is None:
            raise ArtifactError(f"{self!r} was closed; load the artifact again to run it")
        args = [_to_tensor(i, x, self._device) for i, x in enumerate(inputs)]
        with self._lock or contextlib.nullcontext(), torch.inference_mode():
            try:
                out = module(*args)
            except (AssertionError, RuntimeError) as e:
                text = str(e)
                if "Guard failed" in text or text.startswith("Expected input"):
                    raise InputError(f"inputs outside what the program was compiled for: {first_line(text)}") from e
                raise
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TorchRunner({self.path.name}, device={self.device!r})"


def mutated_state(ep: torch.export.ExportedProgram) -> list[str]:
    """Buffers and parameters that running ``ep`` writes: those the signature lists as mutated
    (functional programs) and those written in place by a mutable op inside the graph, directly or
    through a view (torch 2.13 keeps ``add_`` on a buffer in the exported graph)."""
    sig = ep.graph_signature
    names = set(sig.buffers_to_mutate.values())
    state = {**sig.inputs_to_buffers, **sig.inputs_to_parameters}  # placeholder name -> fqn
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for i, arg in enumerate(schema.arguments):
            info = arg.alias_info
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if info is None or not info.is_write or not isinstance(value, torch.fx.Node):
                continue
            base = value
            while base.op == "call_function" and base.args and isinstance(base.args[0], torch.fx.Node):
                base_schema = getattr(base.target, "_schema", None)  # follow views back to their base
                if base_schema is None or not base_schema.returns or base_schema.returns[0].alias_info is None:
                    break
                base = base.args[0]
            if base.op == "placeholder" and base.name in state:
                names.add(state[base.name])
    return sorted(names)


def _to_tensor(i: int, x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = as_tensor(x)  # ml_dtypes bfloat16 arrays bit for bit (numpy has no bfloat16 of its own)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input {i} is a {type(x).__name__}; pass a torch tensor or a numpy array")
    return x.to(device)


def _unknown_ops(path: Path) -> list[str]:
    """``torch.ops`` targets the archive's programs call that this process has not registered (a
    custom op whose plugin is not loaded); torch.export.load only logs which one failed."""
    import re

    try:
        with zipfile.ZipFile(path) as z:
            text = " ".join(z.read(n).decode("utf-8", "replace") for n in z.namelist()
                            if "/models/" in n and n.endswith(".json"))
    except (OSError, zipfile.BadZipFile):
        return []
    missing = []
    for ns, name, overload in sorted(set(re.findall(r'"target":\s*"torch\.ops\.(\w+)\.(\w+)\.(\w+)"', text))):
        try:
            getattr(getattr(getattr(torch.ops, ns), name), overload)
        except (AttributeError, RuntimeError):
            missing.append(f"{ns}::{name}.{overload}")
    return missing


