"""Runs a serialized TensorRT engine (``model.plan``) on torch CUDA tensors.

Before anything is deserialized, :func:`graphopt.backends.tensorrt.check_plan` compares the plan's
magic and header with the manifest, the installed TensorRT version with the one that built it, and
the GPU's compute capability with the one it was built for; a mismatch is an
:class:`~graphopt.errors.ArtifactError` that says to rebuild, never a crash inside TensorRT.

Execution: the name-based tensor API of TensorRT 10/11 — ``set_input_shape`` and
``set_tensor_address`` per I/O tensor, then ``execute_async_v3`` on a CUDA stream. Inputs are torch
tensors (CPU tensors and numpy arrays are copied to the GPU); outputs are torch CUDA tensors.

Thread safety: TensorRT lets one execution context at a time use an optimization profile of a
dynamic-shape engine, so the build adds ``contexts`` copies of every profile (build.json) and the
runner keeps a pool per profile: one ``IExecutionContext`` (and CUDA stream) per copy, created on
first use and bound to its copy for good. A call takes a free context of the profile its shapes
fit, waits when all of that profile's contexts are busy, and gives it back when its work is
enqueued. The context's stream waits for the caller's stream before it reads the inputs, and the
caller's stream waits for it before anyone reads the outputs.

Engines with several profiles (KV-cache artifacts: ``prefill`` and ``decode``) run each call on
the first profile whose ranges hold the input shapes.

Failures while running are :class:`~graphopt.errors.RuntimeFailure` (a ``RuntimeError`` too) whose
message names the fix: out of GPU memory for a context's activations (fewer contexts, narrower
dynamic ranges), for the inputs and outputs of one call (a smaller batch or sequence), or an
execution error reported in the TensorRT log.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.backends.base import Runner
from graphopt.errors import ArtifactError, InputError, RuntimeFailure

log = logging.getLogger(__name__)


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    for name, td in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return td
    raise ArtifactError(f"the engine has an I/O tensor of TensorRT type {dt}, which graphopt cannot bind")


class TensorRTRunner(Runner):
    """A deserialized engine plus per-thread execution contexts.

    Args:
        plan_path: ``model.plan``.
        engine_facts: the manifest's ``payload.engine`` (TensorRT version, compute capability, header).
        manifest: the artifact manifest (input order).
        device: ``"cuda"`` / ``"cuda:N"`` (default: the current CUDA device).
        trt: the tensorrt module (default: imported).
    """

    def __init__(self, plan_path: str | Path, engine_facts: dict[str, Any], manifest: dict[str, Any], *,
                 device: str | None = None, trt: Any = None):
        from graphopt.backends.tensorrt import check_plan, gpu_compute_capability, import_tensorrt

        self.plan_path = Path(plan_path)
        if not self.plan_path.is_file():
            raise ArtifactError(f"TensorRT plan {self.plan_path} does not exist; run `graphopt build-engine "
                                f"{self.plan_path.parent}`")
        trt = trt if trt is not None else import_tensorrt(required=True)
        if not torch.cuda.is_available():
            raise ArtifactError("this artifact holds a TensorRT engine, which needs an NVIDIA GPU, and torch sees none; "
                                "load it on a GPU machine, or compile for --target onnx")
        self.trt = trt
        self.torch_device = torch.device(device or "cuda")
        self.device = "cuda"
        if self.torch_device.type != "cuda":
            raise InputError(f"device={device!r}: a TensorRT engine runs on a CUDA device (cuda, cuda:N)")
        check_plan(self.plan_path, engine_facts, trt_version=str(trt.__version__),
                   compute_capability=gpu_compute_capability(self.torch_device))
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if engine_facts.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True   # version-compatible plans embed the lean runtime
        with torch.cuda.device(self.torch_device):
            self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} could not deserialize {self.plan_path} (see its log); "
                                "if the log says the GPU is out of memory, free GPU memory (other processes, other "
                                "loaded engines) or use a GPU with more; otherwise rebuild it with "
                                f"`graphopt build-engine {self.plan_path.parent}`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [s["name"] for s in manifest["inputs"]]
        self.output_names = [s["name"] for s in manifest["outputs"]]
        missing = [n for n in self.input_names + self.output_names if n not in is_input]
        if missing:
            raise ArtifactError(f"the engine has no I/O tensor(s) {missing} that the manifest lists; rebuild it")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        n_physical = self.engine.num_optimization_profiles
        copies = int(engine_facts.get("contexts", 1) or 1)
        if copies < 1 or n_physical % copies:
            copies = 1  # an engine built without copies: one context per profile
        self.n_profiles = n_physical // copies
        self.profiles = [{n: self.engine.get_tensor_profile_shape(n, p) for n in self.input_names
                          if -1 in tuple(self.engine.get_tensor_shape(n))}
                         for p in range(self.n_profiles)]
        # profile → physical profile indices of its copies not in use / not created yet
        self._lock = threading.Condition()
        self._closed = False
        self._idle: dict[int, list[tuple[Any, torch.cuda.Stream]]] = {p: [] for p in range(self.n_profiles)}
        self._unused: dict[int, list[int]] = {p: [c * self.n_profiles + p for c in range(copies)]
                                              for p in range(self.n_profiles)}

    # -- contexts -----------------------------------------------------------------------------
    def _acquire(self, profile: int) -> tuple[Any, torch.cuda.Stream]:
        """A context bound to a copy of ``profile`` that no other call is using (waits for one)."""
        with self._lock:
            while not self._closed and not self._idle[profile] and not self._unused[profile]:
                self._lock.wait()
            if self._closed:
                raise ArtifactError(f"{self!r} was closed; load the artifact again to run it")
            if self._idle[profile]:
                return self._idle[profile].pop()
            physical = self._unused[profile].pop(0)
        try:
            stream = self._new_stream()
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise RuntimeFailure(
                    f"TensorRT could not create an execution context for {self.plan_path}: each context holds the "
                    f"activation memory of the largest shapes its profile allows ({self._activation_mib()}), and the "
                    "GPU has not that much free. Free GPU memory, build fewer concurrent contexts "
                    "(--target-option contexts=1), or narrow the dynamic ranges (--dynamic with smaller batch and "
                    "sequence maxima) and compile again")
            if self.engine.num_optimization_profiles > 1:
                ctx.set_optimization_profile_async(physical, stream.cuda_stream)
        except BaseException:
            with self._lock:
                self._unused[profile].insert(0, physical)
                self._lock.notify()
            raise
        return ctx, stream

    def _activation_mib(self) -> str:
        size = None
        for attr in ("device_memory_size_v2", "device_memory_size"):  # TensorRT 10.x / 11.x spellings
            try:
                size = getattr(self.engine, attr, None)
            except (RuntimeError, TypeError):  # a binding that raises on the deprecated name: try the next
                continue
            if isinstance(size, int):
                break
        return f"{size / 2 ** 20:.0f} MiB per context" if isinstance(size, int) else "size unknown"

    def _new_stream(self) -> Any:
        return torch.cuda.Stream(self.torch_device)

    def _release(self, profile: int, item: tuple[Any, torch.cuda.Stream]) -> None:
        with self._lock:
            if not self._closed:
                self._idle[profile].append(item)
            self._lock.notify()

    def _pick_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for p, ranges in enumerate(self.profiles):
            if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[n], mn, mx)) for n, (mn, _, mx) in ranges.items()):
                return p
        described = "; ".join(", ".join(f"{n}: {tuple(mn)}..{tuple(mx)}" for n, (mn, _, mx) in r.items())
                              for r in self.profiles)
        raise InputError(f"input shapes {shapes} fit none of the engine's optimization profiles ({described}); "
                         "recompile with a wider --dynamic range")

    # -- running ------------------------------------------------------------------------------
    def run(self, inputs: list[Any]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise InputError(f"the engine takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        with torch.cuda.device(self.torch_device):
            try:
                tensors = {n: self._to_device(n, x) for n, x in zip(self.input_names, inputs)}
            except torch.OutOfMemoryError as e:
                raise self._out_of_memory("copying the inputs to the GPU", inputs, e) from e
            profile = self._pick_profile({n: tuple(t.shape) for n, t in tensors.items()})
            item = self._acquire(profile)
            try:
                return self._enqueue(item, tensors)
            except torch.OutOfMemoryError as e:
                raise self._out_of_memory("allocating the outputs", inputs, e) from e
            finally:
                self._release(profile, item)

    def _out_of_memory(self, what: str, inputs: list[Any], e: BaseException) -> RuntimeFailure:
        shapes = {n: tuple(getattr(x, "shape", ())) for n, x in zip(self.input_names, inputs)}
        first = (str(e).strip().splitlines() or [""])[0]
        return RuntimeFailure(f"out of GPU memory on {self.torch_device} while {what} of {self.plan_path.name} for "
                              f"inputs {shapes} ({first}). Run a smaller batch or sequence, free GPU memory, or load "
                              "the engine with fewer concurrent contexts (--target-option contexts=1: each holds "
                              "its own activation memory)")

    def _enqueue(self, item: tuple[Any, torch.cuda.Stream], tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        ctx, stream = item
        caller = torch.cuda.current_stream(self.torch_device)
        stream.wait_stream(caller)   # inputs written on the caller's stream are ready
        keep = []
        for n, t in tensors.items():
            if not ctx.set_input_shape(n, tuple(t.shape)):
                raise InputError(f"TensorRT refused shape {tuple(t.shape)} for input {n!r}")
            buf = t if t.numel() else torch.empty(1, dtype=t.dtype, device=self.torch_device)  # no null address
            ctx.set_tensor_address(n, buf.data_ptr())
            buf.record_stream(stream)
            keep.append(buf)
        outs = []
        for n in self.output_names:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise ArtifactError(f"output {n!r} has a data-dependent shape {shape}, which this runner cannot "
                                    "allocate ahead of the run")
            out = torch.empty(shape, dtype=self.dtypes[n], device=self.torch_device)
            buf = out if out.numel() else torch.empty(1, dtype=out.dtype, device=self.torch_device)
            ctx.set_tensor_address(n, buf.data_ptr())
            out.record_stream(stream)
            keep.append(buf)
            outs.append(out)
        if not ctx.execute_async_v3(stream.cuda_stream):
            shapes = {n: tuple(t.shape) for n, t in tensors.items()}
            raise RuntimeFailure(
                f"TensorRT could not run {self.plan_path} on inputs {shapes} (execute_async_v3 failed; the TensorRT "
                "log above says why). When it reports GPU memory: run a smaller batch or sequence, or load the "
                "engine with fewer concurrent contexts (--target-option contexts=1)")
        caller.wait_stream(stream)   # outputs are ready for whoever reads them on the caller's stream
        return outs

    def _to_device(self, name: str, x: Any) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input {name!r} is a {type(x).__name__}; pass a torch tensor or a numpy array")
        want = self.dtypes[name]
        return x.to(device=self.torch_device, dtype=want, non_blocking=True).contiguous()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._idle = {p: [] for p in self._idle}
            self._unused = {p: [] for p in self._unused}
            self._lock.notify_all()  # waiting calls fail with a clear error instead of hanging
        self.engine = None

    def __repr__(self) -> str:
        return f"TensorRTRunner({self.plan_path.name}, device={self.torch_device})"
