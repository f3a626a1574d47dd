"""graphopt.load(dir) → Engine: validate the artifact, pick its runner, call it like the model.

Loading checks the manifest (format, schema version, required keys) and the sha256 of every
payload file BEFORE any payload is deserialized, and refuses with an :class:`ArtifactError` that
says what to do. Calls validate inputs (names, dtypes, ranks, static dims, dynamic ranges) against
the manifest so a bad input gets a clear message, not an error from deep inside a runtime.
"""

from __future__ import annotations

import difflib
import inspect
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.artifact import read_manifest, verify_checksums
from graphopt.errors import ArtifactError, InputError, UnknownBackendError
from graphopt.ir.graph_ir import NamedIO, TensorSpec, dtype_from_name
from graphopt.ir.structure import unflatten
from graphopt.runtime.arrays import ML_DTYPES, from_stored

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
              "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
              **ML_DTYPES}  # bfloat16 as ml_dtypes' numpy dtype (numpy has none); runners read it bit for bit


class Engine(NamedIO):
    """A loaded artifact. ``engine(*inputs, **kw_inputs)`` returns the original module's outputs
    (tensor / tuple / dict) as torch tensors. Thread-safe for concurrent calls."""

    def __init__(self, path: Path, manifest: dict[str, Any], runner: Any):
        self.path = Path(path)
        self.manifest = manifest
        self.runner = runner
        self.inputs = [TensorSpec.from_json(s) for s in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in manifest["outputs"]]
        #: tensor-parallel artifacts: this process's rank and the number of ranks (else 0 and 1)
        self.rank, self.world_size = int(getattr(runner, "rank", 0)), 1
        tp = manifest.get("tensor_parallel")
        if tp:  # one rank's program: the sharded inputs and outputs (its KV heads' cache) are 1/N as large
            from graphopt.parallel import local_specs

            self.world_size = int(tp["world_size"])
            self.inputs = local_specs(self.inputs, tp.get("sharded_inputs", {}), self.world_size)
            self.outputs = local_specs(self.outputs, tp.get("sharded_outputs", {}), self.world_size)
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        return f"Engine({str(self.path)!r}, target={self.target!r}, inputs=[{ins}])"

    # -- calling -------------------------------------------------------------------------
    def bind(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Positional and keyword inputs → flat list in manifest order, validated."""
        names = self.input_names
        if len(args) > len(names):
            raise InputError(f"got {len(args)} positional inputs but the artifact takes {len(names)}: {names}")
        bound: dict[str, Any] = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise InputError(f"unknown input {k!r}; the artifact takes {names}")
            if k in bound:
                raise InputError(f"input {k!r} given both positionally and by keyword")
            bound[k] = v
        missing = [n for n in names if n not in bound]
        if missing:
            raise InputError(f"missing input(s) {missing}; the artifact takes {names}")
        return [self._check(spec, bound[spec.name]) for spec in self.inputs]

    def _check(self, spec: TensorSpec, value: Any) -> Any:
        if not isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
            raise InputError(f"input {spec.name!r} must be a torch.Tensor or numpy array ({spec}), got "
                             f"{type(value).__name__}; wrap it, e.g. torch.tensor(...)")
        if isinstance(value, torch.Tensor):
            want = dtype_from_name(spec.dtype)
            if value.dtype != want:
                value = _cast(spec, value, value.dtype.is_floating_point, want)
            shape = tuple(value.shape)
        else:
            arr = np.asarray(value)
            want_np = _NP_DTYPES.get(spec.dtype)
            if want_np is not None and arr.dtype != want_np:
                arr = _cast(spec, arr, np.issubdtype(arr.dtype, np.floating), want_np)
            value, shape = arr, arr.shape
        if len(shape) != len(spec.shape):
            raise InputError(f"input {spec.name!r} has rank {len(shape)} (shape {shape}) but the artifact expects "
                             f"rank {len(spec.shape)} ({spec})")
        for d, (size, want_size) in enumerate(zip(shape, spec.shape)):
            if d in spec.dynamic:
                lo, hi = spec.dynamic[d]
                if not lo <= size <= hi:
                    raise InputError(f"input {spec.name!r} dim {d} is {size}, outside its compiled dynamic range "
                                     f"[{lo}, {hi}]; recompile with a wider --dynamic range")
            elif isinstance(want_size, int) and size != want_size:
                raise InputError(f"input {spec.name!r} dim {d} is {size} but the artifact was compiled for {want_size} "
                                 f"({spec}); recompile with that dim dynamic")
        return value

    def run_flat(self, flat: list[Any]) -> list[torch.Tensor]:
        return self.runner.run(flat)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.bind(*args, **kwargs)
        outs = self.runner.run(flat)
        return unflatten(self.manifest["out_structure"], list(outs))

    # -- examples ------------------------------------------------------------------------
    def example_inputs(self) -> dict[str, np.ndarray | torch.Tensor]:
        """The stored example inputs by name: numpy arrays, or torch tensors for dtypes numpy lacks
        (bfloat16), read back from their raw bits (``manifest["examples"]["dtypes"]``). On a rank of a
        tensor-parallel artifact: this rank's slices of the sharded ones."""
        ex = self.manifest.get("examples") or {}
        return self._local(_read_npz(self.path / ex.get("inputs", "example_inputs.npz"), ex.get("dtypes")),
                           "sharded_inputs")

    def expected_outputs(self) -> dict[str, np.ndarray | torch.Tensor]:
        """The original module's outputs on the example inputs, typed the same way (whole, also on a
        rank of a tensor-parallel artifact: :func:`graphopt.parallel.gather_outputs` makes a rank's
        outputs whole)."""
        ex = self.manifest.get("examples") or {}
        return _read_npz(self.path / ex.get("outputs", "expected_outputs.npz"), ex.get("dtypes"))

    def _local(self, named: dict[str, Any], key: str) -> dict[str, Any]:
        tp = self.manifest.get("tensor_parallel")
        if not tp:
            return named
        from graphopt.parallel import shard_named

        return shard_named(named, tp.get(key, {}), self.rank, self.world_size)

    # -- generation ------------------------------------------------------------------------
    def generate(self, ids: Any, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
                 eos_token_id: int | list[int] | None = None, attention_mask: Any = None, seed: int | None = None,
                 truncate: bool = False, speculative: Any = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled decoding; returns prompt + new tokens [B, T + n] (int64).

        ``ids`` is an integer tensor / numpy array [B, T] (or [T]). The request must fit the artifact:
        T + ``max_new_tokens`` may not exceed the longest sequence it was compiled for (the kv-cache
        ``max_len``, or the token-id input's dynamic sequence maximum; ``graphopt inspect`` shows it),
        else :class:`InputError` before anything runs. ``truncate=True`` stops at that limit instead.

        The returned tensor says why decoding stopped: ``out.stop_reason`` is ``"eos"`` (every row
        produced ``eos_token_id``), ``"length"`` (the artifact's limit, only with ``truncate=True``)
        or ``"max_new_tokens"``; ``out.stop_reasons`` gives it per row. Rows that end early are padded
        with ``eos_token_id`` (first one when a list). The attributes live on this tensor object only:
        slicing or arithmetic returns plain tensors.

        ``speculative`` turns on speculative decoding (kv-cache artifacts): ``"prompt-lookup"``, a
        draft artifact directory or loaded Engine over the same vocabulary, or
        :class:`graphopt.speculative.PromptLookup` / :class:`graphopt.speculative.Draft` with
        options. The tokens are the same (greedy) or identically distributed (sampling);
        ``out.speculation`` says how many drafts were proposed and accepted.
        """
        from graphopt.runtime.generation import STOP_LENGTH, mark

        req, steps = self._start(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                 eos_token_id=eos_token_id, attention_mask=attention_mask, seed=seed,
                                 truncate=truncate, speculative=speculative)
        last = None
        for seq in steps:
            last = seq
        if last is None:  # truncate=True and the prompt already fills the artifact
            last = mark(req.ids.clone(), torch.zeros(req.ids.shape[0], dtype=torch.bool), STOP_LENGTH)
        return last

    def stream(self, ids: Any, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
               eos_token_id: int | list[int] | None = None, attention_mask: Any = None, seed: int | None = None,
               truncate: bool = False, speculative: Any = None) -> Iterator[torch.Tensor]:
        """Yield the growing sequence [B, T + i] after every new token (arguments as :meth:`generate`).

        The arguments are checked when ``stream`` is called, before the first step. Every yielded
        tensor has ``stop_reason`` (``None`` until the last one, which carries the reason) and
        ``stop_reasons`` (per row; ``"eos"`` for rows that already ended). With ``truncate=True`` and
        a prompt that already fills the artifact, nothing is yielded.

        Artifacts compiled with the ``kv-cache`` pass prefill the prompt once and then feed one
        token per step with the cache (kept in bound OrtValues for ONNX Runtime). Artifacts without
        a cache recompute the whole prefix each step (correct, O(T^2)). ``attention_mask`` marks
        left padding for prompts of different lengths. With ``speculative`` (see :meth:`generate`)
        a step may add several tokens; each is still yielded on its own.
        """
        return self._start(ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_token_id=eos_token_id,
                           attention_mask=attention_mask, seed=seed, truncate=truncate, speculative=speculative)[1]

    def _start(self, ids: Any, max_new_tokens: Any, speculative: Any = None, **kw: Any
               ) -> tuple[Any, Iterator[torch.Tensor]]:
        from graphopt.runtime.generation import prepare, stream_cached, stream_full_prefix

        temperature = kw.get("temperature")
        if self.world_size > 1 and isinstance(temperature, (int, float)) and temperature > 0 and kw.get("seed") is None:
            raise InputError(f"sampling on {self.world_size} tensor-parallel ranks needs seed=: every rank must draw "
                             "the same tokens (each rank's own random state would feed the ranks different ones)")
        req = prepare(self, ids, max_new_tokens, **kw)
        if speculative is not None:
            from graphopt.speculative import check_draft, resolve, stream_speculative

            opts = resolve(speculative)
            if req.limits.kind != "kv-cache":
                raise InputError("speculative decoding checks drafts with the model's KV cache, and this artifact "
                                 "was compiled without one; compile with --pipeline cleanup,fuse,kv-cache")
            if self.target == "tensorrt":
                raise InputError("speculative decoding needs multi-token steps after a cache, and a TensorRT engine's "
                                 "step profile takes one token; compile for the onnx or torch target to speculate")
            if hasattr(opts, "engine"):
                check_draft(self, opts.engine)
            return req, stream_speculative(self, req, opts)
        fn = stream_cached if req.limits.kind == "kv-cache" else stream_full_prefix
        return req, fn(self, req)

    def close(self) -> None:
        self.runner.close()


def _cast(spec: TensorSpec, value: Any, is_float: bool, want: Any) -> Any:
    want_float = spec.dtype.startswith(("float", "bfloat"))
    if is_float != want_float:
        kind = "floating-point" if want_float else ("boolean" if spec.dtype == "bool" else "integer")
        raise InputError(f"input {spec.name!r} must be {kind} ({spec.dtype}), got {getattr(value, 'dtype', type(value))}")
    return value.to(want) if isinstance(value, torch.Tensor) else value.astype(want)


def _read_npz(path: Path, dtypes: dict[str, str] | None = None) -> dict[str, np.ndarray | torch.Tensor]:
    """Named arrays of an artifact's ``.npz`` (never unpickled); those named in ``dtypes`` hold raw
    bits and come back as torch tensors of that dtype (see :mod:`graphopt.runtime.arrays`)."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing from the artifact")
    dtypes = dtypes or {}
    with np.load(path, allow_pickle=False) as z:
        return {k: from_stored(k, z[k], dtypes.get(k)) for k in z.files}


def load(path: str | Path, **options: Any) -> Engine:
    """Load an artifact directory written by ``graphopt.compile`` / ``graphopt compile``.

    ``options`` go to the backend's runner (e.g. ``providers=[...]``, ``threads=2`` for ONNX
    Runtime, ``device="cuda"`` for torch). An option no installed backend takes (a misspelling) is
    an :class:`InputError`; a missing, malformed or tampered artifact an :class:`ArtifactError`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"graphopt.load takes the artifact directory as a str or Path, got {type(path).__name__}")
    p = Path(path)
    manifest = read_manifest(p)
    verify_checksums(p, manifest)
    from graphopt.plugins import get_plugin_manager

    try:
        backend = get_plugin_manager().backend(manifest["target"])
    except UnknownBackendError:
        raise ArtifactError(f"artifact {p} needs target {manifest['target']!r}, which no installed plugin "
                            "provides; install the plugin that built it") from None
    _check_options(p, manifest["target"], backend, options)
    runner = backend.load(p, manifest, **options)
    return Engine(p, manifest, runner)


def _load_options(backend_cls: type) -> tuple[list[str], bool]:
    """The keyword options ``backend_cls.load`` names, and whether it reads arbitrary ``**options``
    (a catch-all named ``_`` means "ignored": the built-in backends take each other's options)."""
    params = list(inspect.signature(backend_cls.load).parameters.values())[3:]  # self, artifact_dir, manifest
    named = [q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
    reads_any = any(q.kind is q.VAR_KEYWORD and q.name != "_" for q in params)
    return named, reads_any


def _check_options(path: Path, target: str, backend: Any, options: dict[str, Any]) -> None:
    """A misspelled option (``provider=`` for ``providers=``) is an error, not silently ignored.
    Options another installed backend takes (``device=``, ``threads=``) are accepted, so one call
    can load artifacts of any target."""
    if not options:
        return
    own, reads_any = _load_options(type(backend))
    if reads_any:
        return
    from graphopt.plugins import get_plugin_manager

    known = set(own)
    for cls, _ in get_plugin_manager().backends.values():
        known.update(_load_options(cls)[0])
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown load option {unknown[0]!r}{hint}; the {target} runner of {path} takes "
                         f"{', '.join(own) or 'no options'}")
