"""The systems the cases compare: torch eager and ``torch.compile``, ONNX Runtime on a plain
``torch.onnx`` export (and after its transformers optimizer, and int8), and graphopt artifacts.

Every builder returns a :class:`bench.harness.System` whose ``call()`` does exactly the work a
production caller would repeat — inputs are prepared (numpy arrays bound, tensors on the device)
before timing — and raises :class:`bench.harness.SkipSystem` when the system cannot run here.

Thread settings: torch uses ``torch.set_num_threads(threads)`` (set once by ``bench/run.py``);
every ONNX Runtime session gets ``intra_op_num_threads=threads``, one inter-op thread and no
spinning of idle threads (graphopt's ONNX Runtime artifacts too: ``spinning=False``), so a session
waiting for its next turn does not steal the cores of the system being timed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import GRAPHOPT, PEER, BenchContext, Candidate, SkipSystem, System

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def call_module(model: Any, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def on_device(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model itself on the CPU; a copy on another device (exporters and graphopt capture the
    CPU original, so moving it in place would pull it from under them)."""
    return model if device == "cpu" else copy.deepcopy(model).to(device)


def to_device(inputs: Any, device: str) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return tuple(v.to(device) for v in inputs)


# -- torch ---------------------------------------------------------------------------------------

def torch_eager(name: str, model: torch.nn.Module, inputs: Any, *, kind: str = PEER,
                extract: Callable[[Any], Any] = lambda o: o) -> System:
    def call() -> Any:
        with torch.inference_mode():
            return call_module(model, inputs)

    return System(name, call, kind=kind, extract=extract)


def torch_compiled(name: str, model: torch.nn.Module, inputs: Any, *,
                   extract: Callable[[Any], Any] = lambda o: o, **options: Any) -> System:
    """``torch.compile(model, **options)`` (default backend: inductor), compiled by a first call
    whose time is kept as ``compile_s``. A compiler failure propagates: the harness records it."""
    compiled = torch.compile(model, **options)

    def call() -> Any:
        with torch.inference_mode():
            return call_module(compiled, inputs)

    t0 = time.perf_counter()
    call()
    sys_ = System(name, call, extract=extract)
    sys_.info["compile_s"] = round(time.perf_counter() - t0, 2)
    sys_.info["backend"] = options.get("backend", "inductor")
    return sys_


# -- export helpers ------------------------------------------------------------------------------

def widen_for_export(inputs: Any, dynamic: dict | None) -> Any:
    """Example inputs with every dynamic dim of size 1 doubled: ``torch.export`` specializes a
    size-1 dim to the constant 1, so a batch-1 benchmark still compiles for its dynamic range."""
    if not dynamic:
        return inputs
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    names = _names(inputs, dynamic)
    out = []
    for name, v in zip(names, values):
        for d in (dynamic.get(name) or {}) if name else {}:
            if v.shape[int(d)] < 2:
                v = torch.cat([v, v], dim=int(d))
        out.append(v)
    return dict(zip(names, out)) if isinstance(inputs, dict) else tuple(out)


def export_dims(inputs: Any, dynamic: dict | None) -> Any:
    """``{input: {dim: (min, max)}}`` → ``torch.export`` dynamic shapes; dims with the same index
    and range share one ``Dim`` (batch and sequence of ``input_ids`` and ``attention_mask``)."""
    if not dynamic:
        return None
    dims: dict[tuple, Any] = {}

    def dim(d: int, lo: int, hi: int) -> Any:
        if (d, lo, hi) not in dims:
            base = {0: "batch", 1: "seq"}.get(d, f"d{d}")
            label = base if not any(k[0] == d for k in dims) else f"{base}{len(dims)}"
            dims[(d, lo, hi)] = torch.export.Dim(label, min=max(lo, 2), max=hi)
        return dims[(d, lo, hi)]

    spec = [{int(d): dim(int(d), int(r[0]), int(r[1])) for d, r in (dynamic.get(n) or {}).items()} or None
            for n in _names(inputs, dynamic)]
    return dict(zip(inputs, spec)) if isinstance(inputs, dict) else tuple(spec)


def _names(inputs: Any, dynamic: dict) -> list[str | None]:
    """Input names; positional inputs take the dynamic spec's names in order (factories list them
    in ``forward`` order), the rest none."""
    if isinstance(inputs, dict):
        return list(inputs)
    return (list(dynamic) + [None] * len(inputs))[: len(inputs)]


def onnx_export(model: torch.nn.Module, inputs: Any, dynamic: dict | None, path: Path,
                output_names: list[str] | None = None) -> Path:
    """A plain ``torch.onnx.export(dynamo=True)`` with the case's dynamic dims: the natural peer
    of graphopt's onnx target (same exporter, no graph passes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ex = widen_for_export(inputs, dynamic)
    args, kwargs = ((), ex) if isinstance(ex, dict) else (ex, None)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter's progress lines
        torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True,
                          dynamic_shapes=export_dims(ex, dynamic), output_names=output_names,
                          verbose=False)
    return path


# -- ONNX Runtime --------------------------------------------------------------------------------

def ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device != "cuda":
        return [CPU_EP]
    if CUDA_EP not in ort.get_available_providers():
        raise SkipSystem(f"this onnxruntime build has no {CUDA_EP} (install onnxruntime-gpu)")
    return [CUDA_EP, CPU_EP]


def ort_session(path: Path, ctx: BenchContext) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = ctx.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No spinning: systems run interleaved in one process, and an idle session's spinning threads
    # would steal the cores from whichever system runs next (torch eager included).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(ctx.device))


def numpy_inputs(inputs: Any, names: list[str]) -> dict[str, np.ndarray]:
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    keys = list(inputs) if isinstance(inputs, dict) else names
    by_name = {k: v.detach().cpu().numpy() for k, v in zip(keys, values)}
    if all(n in by_name for n in names):
        return {n: by_name[n] for n in names}
    return dict(zip(names, by_name.values()))  # positional inputs: session order


def ort_system(name: str, path: Path, inputs: Any, ctx: BenchContext, *,
               extract: Callable[[Any], Any] = lambda o: o) -> System:
    """An ONNX Runtime session over ``path``; ``call()`` returns the list of numpy outputs."""
    sess = ort_session(path, ctx)
    feed = numpy_inputs(inputs, [i.name for i in sess.get_inputs()])
    sys_ = System(name, lambda: sess.run(None, feed), extract=extract)
    sys_.info["providers"] = sess.get_providers()[:1]
    return sys_


def ort_transformers_optimize(src: Path, dst: Path, *, model_type: str, num_heads: int, hidden_size: int,
                              use_gpu: bool = False) -> dict[str, int]:
    """``onnxruntime.transformers.optimizer.optimize_model``; returns its fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    with contextlib.redirect_stdout(io.StringIO()):
        opt = optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                             use_gpu=use_gpu)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(dst))
    return stats


def ort_quantize_dynamic(src: Path, dst: Path) -> Path:
    """``onnxruntime.quantization.quantize_dynamic`` with int8 weights (per tensor)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    logging.disable(logging.WARNING)  # "consider pre-processing" goes to the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return dst


# -- graphopt ------------------------------------------------------------------------------------

def unregistered_passes(pipeline: str) -> list[str]:
    """Names in ``pipeline`` that no loaded plugin registers (aliases expanded)."""
    from graphopt.passes.pipeline import parse_pipeline
    from graphopt.plugins import get_plugin_manager

    reg = get_plugin_manager().passes
    missing: list[str] = []

    def walk(text: str, depth: int = 0) -> None:
        for spec in parse_pipeline(text):
            if spec.name in reg.aliases and depth < 8:
                walk(reg.aliases[spec.name][0], depth + 1)
            elif spec.name not in reg.passes and spec.name not in missing:
                missing.append(spec.name)

    walk(pipeline)
    return missing


def load_engine(path: Path, target: str, ctx: BenchContext) -> Any:
    import graphopt

    if target == "onnx":
        return graphopt.load(path, providers=ort_providers(ctx.device), threads=ctx.threads, spinning=False)
    if target == "torch":
        return graphopt.load(path, device=ctx.device)
    return graphopt.load(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "none"


def graphopt_candidates(ctx: BenchContext, pipelines: dict[str, str], model: torch.nn.Module, inputs: Any,
                        dynamic: dict | None, make_system: Callable[[str, Any], System], *,
                        case: str) -> list[Candidate]:
    """One candidate per (pipeline, target): ``graphopt.compile`` then ``graphopt.load``, then
    ``make_system(name, engine)``. A pipeline naming a pass no plugin registers yet is skipped
    (with that reason in the results), never an error."""
    targets = ctx.graphopt_targets
    out: list[Candidate] = []
    for label, pipeline in pipelines.items():
        for target in targets:
            name = label if len(targets) == 1 else f"{label} [{target}]"

            def build(name: str = name, pipeline: str = pipeline, target: str = target) -> System:
                import graphopt

                missing = unregistered_passes(pipeline)
                if missing:
                    raise SkipSystem(f"pipeline {pipeline!r}: pass(es) {', '.join(missing)} not registered yet")
                path = ctx.workdir / case / f"graphopt_{_slug(pipeline)}_{target}"
                t0 = time.perf_counter()
                art = graphopt.compile(model, widen_for_export(inputs, dynamic), pipeline=pipeline, target=target,
                                       out=path, dynamic=dynamic, report=None)
                compile_s = time.perf_counter() - t0
                engine = load_engine(art.path, target, ctx)
                sys_ = make_system(name, engine)
                sys_.kind = GRAPHOPT
                sys_.close = engine.close
                ver = art.manifest.get("verification") or {}
                stats = {r["spec"]: r["stats"] for r in art.report.get("passes", []) if r.get("stats")}
                sys_.info.update(compile_s=round(compile_s, 2), target=target, pipeline=art.manifest["pipeline"],
                                 verified=ver.get("passed"), lowering_error=ver.get("lowering_error_vs_original"))
                if stats:
                    sys_.info["pass_stats"] = stats
                return sys_

            out.append(Candidate(name, build, GRAPHOPT))
    return out
