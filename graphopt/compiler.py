"""compile(): capture → passes (verified one by one) → lowering (verified) → artifact.

This module wires the pieces together and knows no optimization: passes and backends come from
the plugin registry only.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.artifact import FORMAT, SCHEMA_VERSION, ArtifactWriter
from graphopt.capture import capture, plan_dynamic
from graphopt.errors import InputError, VerificationError, first_line
from graphopt.ir.graph_ir import GraphIR
from graphopt.memory import PhaseTracker, release_memory
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import pipeline_text, resolve
from graphopt.plugins import get_plugin_manager
from graphopt.report import Report
from graphopt.runtime.arrays import raw_bit_dtypes
from graphopt.verify.lowering import LoweringCheck, verify_lowered
from graphopt.verify.verifier import Verifier, describe_inputs, make_verification_inputs, verification_plan

log = logging.getLogger(__name__)


@dataclass
class Artifact:
    """A compiled artifact on disk."""

    path: Path
    manifest: dict[str, Any]
    report: dict[str, Any]

    def load(self, **options: Any):
        from graphopt.runtime.engine import load

        return load(self.path, **options)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.manifest['target']!r})"


def library_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    def ver(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    from graphopt import __version__

    return {"graphopt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": ver("onnx"), "onnxruntime": ver("onnxruntime") or ver("onnxruntime-gpu"),
            "tensorrt": ver("tensorrt"), "transformers": ver("transformers")}


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Named arrays from an ``.npz`` (never unpickled), with clear errors for a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"inputs file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"inputs file {p} is not a readable .npz ({e}); write it with numpy.savez(name=array, ...)") from None


def load_inputs_npz(path: str | Path, ir: GraphIR) -> list[torch.Tensor]:
    """An ``.npz`` of named arrays → flat inputs in the graph's order (names must match)."""
    arrays = read_npz(path)
    missing = [n for n in ir.input_names if n not in arrays]
    if missing:
        raise InputError(f"inputs file {path} lacks {missing}; it must hold one array per input: {ir.input_names}")
    return [torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in ir.input_names]


def optimize(model: Any, example_inputs: Any = None, pipeline: str = "cleanup", *, dynamic: Any = None,
             verify: bool = True, dump_ir: str | None = None, repro_dir: str | None = None,
             extra_inputs: list[list[torch.Tensor]] | None = None, n_random: int = 1,
             progress: Callable[..., None] | None = None, model_spec: str | None = None,
             report: Report | None = None, artifact_dir: str | Path | None = None,
             tokenizer: str | Path | None = None, tracker: PhaseTracker | None = None, dtype: Any = None,
             layers: int | None = None) -> tuple[GraphIR, GraphIR, Report, Verifier | None]:
    """Capture (unless given a GraphIR) and run the pipeline with per-pass verification.

    Returns ``(original, optimized, report, verifier)``.
    """
    check_arguments(model=model, pipeline=pipeline, verify=verify, n_random=n_random, dump_ir=dump_ir,
                    progress=progress, extra_inputs=extra_inputs)
    pm = get_plugin_manager()
    passes = resolve(pipeline, pm.passes)
    text = pipeline_text_of(pipeline, passes)
    model, example_inputs, dynamic, tokenizer, model_spec = _resolve_model(
        model, example_inputs, dynamic, dtype=dtype, tokenizer=tokenizer, layers=layers, model_spec=model_spec)
    tracker = tracker or PhaseTracker(progress)
    if isinstance(model, GraphIR):
        _refuse_inputs_with_graph(example_inputs, dynamic)
        ir = model
    else:
        dynamic, notes = plan_dynamic(model, example_inputs, dynamic, passes)
        with tracker.phase("capture"):
            ir = capture(model, example_inputs, dynamic)
        ir.meta.setdefault("capture_notes", []).extend(notes)
    with tracker.phase("verify:setup"):
        original = ir.copy()  # weights shared with ``ir`` (copy-on-write), see GraphIR.copy
        report = report or Report(model=model_spec or ir.meta.get("model_class", ""), pipeline=text)
        report.data["pipeline"] = text
        report.set_original(original)
        report.data["verification"]["enabled"] = verify
        verifier = None
        if verify:
            plan = verification_plan(original, n_random)
            sets = make_verification_inputs(original, n_random=n_random, include_example=plan["include_example"],
                                            step=plan["step"], halve_long_dims=plan["halve_long_dims"],
                                            long_dim_divisor=plan["long_dim_divisor"])
            if ir.user_example_inputs is not None:  # capture widened a size-1 dim: check the user's own
                sets.append(list(ir.user_example_inputs))
            sets.extend(extra_inputs or [])
            verifier = Verifier(original, sets, plan)
            checked = describe_inputs(sets, original.input_names)
            if plan["large"]:
                checked += (f" (a model of {original.param_count() / 1e9:.2f}B parameters: random sets with short "
                            "dims one step from the example's and long ones at "
                            f"{'half' if plan['long_dim_divisor'] == 2 else 'a quarter'} of it, the example itself is "
                            "not rerun; more with n_random)")
            report.data["verification"]["inputs"] = checked
            if progress:
                progress("verification_inputs", text=checked)
        notes = list(ir.meta.get("capture_notes", []))
        if ir.meta.get("capture_widened"):
            notes.append(f"capture widened the example ({', '.join(ir.meta['capture_widened'])}): torch.export "
                         "makes size-1 dims static; the given example is verified as well")
        notes += [f"{p.name} inserted before {p.inserted_for} (it needs it)" for p in passes
                  if getattr(p, "inserted_for", None)]
        report.data["notes"] = notes
    ctx = PassContext(original=original, pipeline_text=text, verify=verify, verifier=verifier,
                      dump_ir=dump_ir, repro_dir=repro_dir, report=report, progress=progress)
    ctx.data["phases"] = tracker
    ctx.data["model_spec"] = model_spec
    # where the artifact goes (passes may reuse what a previous build left there, e.g. calibration
    # scales) and the model's tokenizer (passes that read text, e.g. calibrate)
    ctx.data["artifact_dir"] = str(artifact_dir) if artifact_dir is not None else None
    ctx.data["tokenizer"] = str(tokenizer) if tokenizer else None
    optimized = PassManager(passes, pm.hook).run(ir, ctx)
    return original, optimized, report, verifier


def _refuse_inputs_with_graph(example_inputs: Any, dynamic: Any) -> None:
    """A captured GraphIR carries its own example inputs and dynamic dims: refuse others beside it."""
    if example_inputs is not None or dynamic is not None:
        hint = (f"; {example_inputs!r} looks like a pipeline: pass pipeline={example_inputs!r}"
                if isinstance(example_inputs, str) else "")
        raise InputError("a captured GraphIR carries its example inputs and dynamic dims: pass neither "
                         f"example_inputs nor dynamic with it{hint}")


def _resolve_model(model: Any, example_inputs: Any, dynamic: Any, *, dtype: Any, tokenizer: Any, layers: Any,
                   model_spec: str | None) -> tuple[Any, Any, Any, Any, str | None]:
    """A checkpoint directory or ``path/to/file.py:factory`` loaded (graphopt.model_loader); any
    other model as it is, where ``dtype`` and ``layers`` (checkpoint options) are refused."""
    if isinstance(model, (str, Path)):
        from graphopt.model_loader import resolve_model_arg

        model_spec = model_spec or str(model)
        model, example_inputs, dynamic, tokenizer = resolve_model_arg(model, example_inputs, dynamic, dtype=dtype,
                                                                      tokenizer=tokenizer, layers=layers)
    elif dtype is not None or layers is not None:
        raise InputError(("dtype (--dtype)" if dtype is not None else "layers (--layers)") + " applies to a model "
                         "given as a checkpoint directory; cast or cut a module yourself (in the factory) instead")
    return model, example_inputs, dynamic, tokenizer, model_spec


def check_arguments(**args: Any) -> None:
    """Typed errors for the arguments of :func:`compile` / :func:`optimize` (what a user passes
    wrongly first: a pipeline list of names, a bool given as a string, a negative count), each an
    :class:`InputError` that says what to pass instead."""
    from graphopt.passes.pipeline import PassSpec

    def bad(name: str, want: str) -> InputError:
        v = args[name]
        return InputError(f"{name}={v!r} ({type(v).__name__}) is not valid: {want}")

    model = args.get("model")
    if model is None or not (isinstance(model, (torch.nn.Module, GraphIR, str, Path))):
        raise bad("model", "pass a torch.nn.Module, a GraphIR, a checkpoint directory or 'path/to/file.py:factory'")
    pipeline = args.get("pipeline")
    if not (isinstance(pipeline, str) or (isinstance(pipeline, (list, tuple))
                                           and all(isinstance(p, (str, PassSpec)) for p in pipeline))):
        raise bad("pipeline", "pipeline text such as 'cleanup,fuse,kv-cache', or a list of PassSpec")
    if isinstance(pipeline, (list, tuple)) and any(isinstance(p, str) for p in pipeline):
        raise InputError(f"pipeline={pipeline!r} is a list of names; give the text "
                         f"{','.join(str(p) for p in pipeline)!r} (or PassSpec objects)")
    for flag in ("verify", "memory_check"):
        if flag in args and not isinstance(args[flag], bool):
            raise bad(flag, "True or False")
    n = args.get("n_random")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise bad("n_random", "a non-negative int (fresh random input sets for verification)")
    if "target" in args and not isinstance(args["target"], str):
        raise bad("target", "a target name: 'onnx', 'torch' or 'tensorrt'")
    for name in ("out", "dump_ir", "inputs"):
        if args.get(name) is not None and not isinstance(args[name], (str, Path)):
            raise bad(name, "a path (str or pathlib.Path)")
    if "report" in args and args["report"] not in ("html", "json", None):
        raise bad("report", "'html' (report.json + report.html), 'json' or None (report.json only)")
    if args.get("target_options") is not None and not isinstance(args["target_options"], dict):
        raise bad("target_options", "a dict of backend options, e.g. {'opset': 23}")
    if args.get("progress") is not None and not callable(args["progress"]):
        raise bad("progress", "a callable progress(event, **info), or None")
    extra = args.get("extra_inputs")
    if extra is not None and not (isinstance(extra, list) and all(isinstance(x, (list, tuple)) for x in extra)):
        raise bad("extra_inputs", "a list of input sets, each a list of tensors in the graph's input order")


def pipeline_text_of(pipeline: str, passes: list) -> str:
    return pipeline.strip() if isinstance(pipeline, str) else pipeline_text(pipeline)


def compile(model: Any, example_inputs: Any = None, pipeline: str = "cleanup", target: str = "onnx",
            out: str | Path | None = None, *, dynamic: Any = None, verify: bool = True,
            dump_ir: str | None = None, report: str | None = "html", inputs: str | Path | None = None,
            target_options: dict[str, Any] | None = None, n_random: int = 1,
            progress: Callable[..., None] | None = None, model_spec: str | None = None,
            tokenizer: str | Path | None = None, dtype: Any = None, memory_check: bool = True,
            layers: int | None = None) -> Artifact:
    """Compile ``model`` into an artifact directory at ``out``.

    Args:
        model: an ``nn.Module`` (captured with ``example_inputs``), a :class:`GraphIR`, or a model spec:
            a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json; its
            example inputs, dynamic dims and tokenizer come with it) or ``path/to/file.py:factory``.
        example_inputs: tuple of positional tensors or dict of keyword tensors.
        pipeline: pipeline text, e.g. ``"cleanup,fuse-attention"``.
        target: a registered backend (``onnx``, ``torch``, ...).
        out: artifact directory (written atomically). Default ``build/<model class>``.
        dynamic: ``{input: {dim: (min, max)}}``.
        verify: verify every pass and the lowered artifact against the original graph.
        dump_ir: directory for ``NNN_<pass>.txt`` IR dumps.
        report: ``"html"`` also writes report.html; ``None`` only report.json.
        inputs: an ``.npz`` of extra evaluation inputs (one array per input name).
        tokenizer: a tokenizers ``tokenizer.json`` to ship in the artifact (``graphopt generate
            --prompt`` uses it).
        dtype: ``float32`` / ``bfloat16`` / ``float16``: the dtype a checkpoint directory is loaded
            in (default: its config's).
        layers: a checkpoint directory's first N decoder layers only (``--layers``): a draft model
            for speculative decoding made from the target's own checkpoint.
    """
    t_start = time.perf_counter()
    pm = get_plugin_manager()
    check_arguments(model=model, pipeline=pipeline, verify=verify, n_random=n_random, dump_ir=dump_ir,
                    progress=progress, target=target, out=out, report=report, inputs=inputs,
                    target_options=target_options, memory_check=memory_check)
    backend = pm.backend(target)  # unknown target → error before any work
    passes = resolve(pipeline, pm.passes)  # unknown pass/option → error before capture
    for p in passes:
        if p.targets and target not in p.targets:
            raise InputError(f"pass {p.name!r} makes graphs only the {' / '.join(p.targets)} target can run "
                             f"(target {target!r} was asked for); compile with --target {p.targets[0]}")
    model, example_inputs, dynamic, tokenizer, model_spec = _resolve_model(
        model, example_inputs, dynamic, dtype=dtype, tokenizer=tokenizer, layers=layers, model_spec=model_spec)
    tracker = PhaseTracker(progress)
    estimate = None
    if not isinstance(model, GraphIR):
        estimate = check_memory(model, passes, verify=verify, target=target, enabled=memory_check)
    if isinstance(model, GraphIR):
        _refuse_inputs_with_graph(example_inputs, dynamic)
        ir = model
        captured_outputs = None  # a graph given as it is may have been rewritten since its capture
    else:
        dynamic, notes = plan_dynamic(model, example_inputs, dynamic, passes)
        with tracker.phase("capture"):
            ir = capture(model, example_inputs, dynamic)
        ir.meta.setdefault("capture_notes", []).extend(notes)
        captured_outputs = ir.captured_outputs  # the model's outputs on the examples (None when not run)
    if out is None:
        out = Path("build") / ir.meta.get("model_class", "model").rsplit(".", 1)[-1].lower()
    out = Path(out)
    extra = [load_inputs_npz(inputs, ir)] if inputs else []
    rep = Report(model=model_spec or ir.meta.get("model_class", ""), pipeline=str(pipeline), target=target)
    repro_dir = str(out.with_name(out.name + ".repro"))
    original, optimized, rep, verifier = optimize(
        ir, pipeline=pipeline, verify=verify, dump_ir=dump_ir, repro_dir=repro_dir, extra_inputs=extra,
        n_random=n_random, progress=progress, model_spec=model_spec, report=rep, artifact_dir=out,
        tokenizer=tokenizer, tracker=tracker)

    with ArtifactWriter(out) as w:
        if progress:
            progress("lower", target=target)
        t0 = time.perf_counter()
        with tracker.phase("lower"):
            lowered = backend.lower(optimized, w.dir, dict(target_options or {}))
        low = {"target": target, "time_s": round(time.perf_counter() - t0, 4), "nodes": optimized.node_count(),
               "files": lowered.files, "notes": lowered.notes, "verify": None}
        rep.data["lowering"] = low
        manifest = _manifest(optimized, original, target, lowered, rep, model_spec)
        write_phase = tracker.start("write")
        against_optimized = (optimized.meta.get("lowering_check") or {}).get("against") == "optimized"
        _save_examples(w.dir, optimized if against_optimized else original,
                       (optimized.meta.get("padding_removed") or {}).get("mask"),
                       outputs=None if against_optimized else captured_outputs)
        _save_pass_files(w.dir, optimized, manifest)
        from graphopt.memory import PhaseRecord

        tracker.end(PhaseRecord("write"), write_phase)
        if verify and lowered.payload.get("runnable", True):
            with tracker.phase("verify:lower"):
                check = LoweringCheck(backend, verifier, optimized)
                # the torch graphs are done with: what only they hold (rewritten weights) goes
                # before the runtime maps the artifact's weights (see LoweringCheck)
                del optimized, ir, verifier
                release_memory()
                low["verify"] = verify_lowered(backend, w.dir, manifest, check)
                del check
            low["notes"] += [f"dynamic range narrowed: {n}" for n in low["verify"].get("narrowed", [])]
            if progress:
                progress("lowered", record=low)
            if not low["verify"]["passed"]:
                rep.data["verification"].update(passed=False, failed_pass=f"lower:{target}")
                raise VerificationError(
                    f"the {target} artifact does not reproduce the original graph: {low['verify']['message']}\n"
                    f"  the optimized graph verified; the lowering to {target!r} changed the numerics. "
                    f"Report this with the pipeline {rep.data['pipeline']!r}", record=low["verify"])
        elif target == "torch" and manifest.get("generation"):
            # unverified, nothing probed the program's smallest sizes; generate starts from the
            # shortest past the manifest allows, so that one is tried (torch.export may refuse 0)
            low["notes"] += narrow_empty_past(backend, w.dir, manifest)
        if tokenizer:
            tok = Path(tokenizer)
            if not tok.is_file():
                raise InputError(f"tokenizer file {tok} does not exist")
            shutil.copyfile(tok, w.dir / "tokenizer.json")
            manifest["tokenizer"] = "tokenizer.json"
        rep.finish()
        rep.data["total_time_s"] = round(time.perf_counter() - t_start, 4)
        rep.data["memory"] = tracker.summary()
        if estimate is not None:
            rep.data["memory"]["estimate"] = {"peak_gib": round(estimate.peak_bytes / 2**30, 3),
                                              "weights_gib": round(estimate.weight_bytes / 2**30, 3),
                                              "text": estimate.describe()}
        rep.data["phases"] = rep.data["memory"]["phases"]
        manifest["verification"] = _verification_summary(rep)
        (w.dir / "report.json").write_text(rep.to_json() + "\n")
        if report == "html":
            from graphopt.report_html import render_html

            (w.dir / "report.html").write_text(render_html(rep.data))
        path = w.commit(manifest)
    return Artifact(path, manifest, rep.data)


def check_memory(model: Any, passes: list, *, verify: bool, target: str, enabled: bool = True):
    """Estimate the compile's peak memory before capture (:func:`graphopt.memory.estimate_compile_memory`)
    and refuse with a :class:`ResourceError` when it cannot fit, rather than be killed by the kernel
    minutes later. ``enabled=False`` or ``GRAPHOPT_MEMORY_CHECK=0`` only records the estimate."""
    import os

    from graphopt.errors import ResourceError
    from graphopt.memory import estimate_compile_memory, module_weight_bytes

    est = estimate_compile_memory(module_weight_bytes(model), passes, verify=verify, target=target)
    if est.fits or not enabled or os.environ.get("GRAPHOPT_MEMORY_CHECK", "1") == "0":
        return est
    names = {p.name for p in passes}
    ways = []
    if verify:
        ways.append("compile without verification (verify=False, --no-verify): no ONNX Runtime check of the weights")
    if any(p.dtype == torch.float32 for p in (model.parameters() if hasattr(model, "parameters") else ())):
        ways.append("load the model in a lower precision (--dtype bfloat16 for a checkpoint directory, or "
                    "model.to(torch.bfloat16)): half the weight bytes")
    if "merge-gemms" in names:
        ways.append("leave merge-gemms out (fuse-attention,fuse-norms,fuse-rope,fuse-activations instead of fuse)")
    ways.append("free memory, or run on a machine with more (GRAPHOPT_MEMORY_CHECK=0 / memory_check=False tries anyway)")
    raise ResourceError(f"this compile would not fit in memory: {est.describe()}.\n  ways to need less:\n    - "
                        + "\n    - ".join(ways))


def _manifest(ir: GraphIR, original: GraphIR, target: str, lowered: Any, rep: Report, model_spec: str | None) -> dict:
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "graphopt_version": library_versions()["graphopt"], "versions": library_versions(),
        "target": target, "payload": lowered.payload,
        "pipeline": rep.data["pipeline"], "passes": [r["spec"] for r in rep.passes],
        "model": {"class": original.meta.get("model_class"), "spec": model_spec, "capture": original.meta.get("capture")},
        "call_convention": original.call_convention,
        "inputs": [s.to_json() for s in ir.inputs], "outputs": [s.to_json() for s in ir.outputs],
        "out_structure": ir.out_structure,
        "examples": {"inputs": "example_inputs.npz", "outputs": "expected_outputs.npz",
                     # whose outputs: the original module's, or the optimized graph's after a lossy
                     # pass that asked the artifact to reproduce its result (pruning)
                     "outputs_of": "optimized" if (ir.meta.get("lowering_check") or {}).get("against") == "optimized"
                     else "original",
                     # examples of dtypes numpy lacks (bfloat16) are stored as their raw bits (uint16);
                     # their real dtype, by name (see graphopt.runtime.arrays)
                     "dtypes": raw_bit_dtypes(ir if (ir.meta.get("lowering_check") or {}).get("against") == "optimized"
                                              else original)},
        "generation": ir.meta.get("generation"),
        "sparsity": ir.meta.get("sparsity"),  # set by prune (2:4 / unstructured masks): backends may use it
        # set by remove-padding: {"mask": input, "outputs": [...]}; those outputs are 0 where mask == 0
        "padding_removed": ir.meta.get("padding_removed"),
        # set by tensor-parallel: {"world_size": N, "sharded_inputs"/"sharded_outputs": {name: dim}, ...};
        # the specs above are the whole model's, each rank's program takes 1/N of the sharded dims
        "tensor_parallel": ir.meta.get("tensor_parallel"),
        "files": {},
    }


def _save_examples(d: Path, original: GraphIR, padding_mask: str | None = None,
                   outputs: list | None = None) -> None:
    """Example inputs and the ORIGINAL model's outputs on them: `graphopt run DIR` replays them.
    (After a lossy pass that declared it, e.g. pruning: the optimized graph's outputs. After
    remove-padding: with the padded positions zeroed, as the artifact computes them.)

    Tensors of dtypes numpy lacks (bfloat16) are stored as their raw bits; the manifest's
    ``examples.dtypes`` (:func:`~graphopt.runtime.arrays.raw_bit_dtypes`) names their real dtype, and
    ``Engine.example_inputs()`` reads them back as torch tensors of that dtype."""
    from graphopt.errors import ArtifactError
    from graphopt.runtime.arrays import to_storable

    recorded = raw_bit_dtypes(original)

    def arrays(specs: list, tensors: list) -> dict[str, np.ndarray]:
        out = {}
        for spec, t in zip(specs, tensors):
            out[spec.name], raw = to_storable(t)
            if raw != recorded.get(spec.name):  # the manifest's dtypes come from the specs: they must agree
                raise ArtifactError(f"example {spec.name!r} is a {t.dtype} tensor but its spec says {spec.dtype}; "
                                    "a pass left the IR's specs stale (re-derive them after rewriting)")
        return out

    np.savez(d / "example_inputs.npz", **arrays(original.inputs, original.example_inputs))
    # ``outputs``: the model's own on these inputs, computed at capture (a 0.5B model's forward
    # is a second on a CPU); else the original graph is run
    outs = list(outputs) if outputs is not None and len(outputs) == len(original.outputs) else original.run()
    if padding_mask:
        from graphopt.verify.policies import zero_padding

        outs = zero_padding([outs], [list(original.example_inputs)], original.input_names, padding_mask)[0]
    np.savez(d / "expected_outputs.npz", **arrays(original.outputs, outs))


def _save_pass_files(d: Path, ir: GraphIR, manifest: dict) -> None:
    """Files passes ask to ship in the artifact: ``ir.meta["artifact_files"] = {name: text}`` (e.g. the
    calibration scales of graphopt-quant, reused on rebuild). Plain names only; listed in the
    manifest under ``pass_files`` and checksummed like every other file."""
    files = ir.meta.get("artifact_files") or {}
    for name, text in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or (d / name).exists():
            raise InputError(f"a pass asked to write artifact file {name!r}: it must be a new plain file name")
        (d / name).write_text(text)
    if files:
        manifest["pass_files"] = sorted(files)


def narrow_empty_past(backend: Any, path: Path, manifest: dict) -> list[str]:
    """For an unverified torch-target decoder artifact (torch.export programs may refuse a size; ONNX
    Runtime takes any): run its prefill at an empty past and at a past of one slot
    (batch 2, 2 tokens); when only the second runs, the past's dynamic minimum becomes 1 in the
    manifest (generate then starts with one masked slot, which changes nothing). Returns the note."""
    from graphopt.ir.graph_ir import TensorSpec
    from graphopt.runtime.generation import empty_cache_input

    gen = manifest["generation"]
    labels = {(spec["shape"][int(d)]) for spec in manifest["inputs"] if spec["name"] in gen["cache_inputs"]
              for d, rng in spec["dynamic"].items() if rng[0] == 0 and isinstance(spec["shape"][int(d)], str)}
    if len(labels) != 1:
        return []
    label = labels.pop()
    specs = [TensorSpec.from_json(s) for s in manifest["inputs"]]

    def feeds(past: int) -> list[torch.Tensor]:
        out = []
        for spec in specs:
            if spec.name in (gen["ids"], gen["attention_mask"]):
                out.append(torch.ones(2, 2, dtype=torch.int64))
            elif spec.name in gen["cache_inputs"]:
                t = empty_cache_input(spec, 2)
                shape = [past if spec.shape[i] == label else n for i, n in enumerate(t.shape)]
                out.append(torch.zeros(shape, dtype=t.dtype))
            else:
                out.append(torch.zeros(1, dtype=torch.int64))  # a static cache's position
        return out

    # a tensor-parallel artifact's ranks are spawned for it (whole inputs in, sliced per rank)
    runner = getattr(backend, "load_for_verification", backend.load)(path, manifest)
    try:
        try:
            runner.run(feeds(0))
            return []
        except InputError as e:
            why = first_line(str(e))
        except Exception:  # noqa: BLE001 - not a size refusal: claim nothing (verification would say more)
            return []
        try:
            runner.run(feeds(1))
        except Exception:  # noqa: BLE001 - refused for another reason too: claim nothing
            return []
    finally:
        runner.close()
    for spec in manifest["inputs"]:
        for d, rng in spec["dynamic"].items():
            if spec["shape"][int(d)] == label and rng[0] == 0:
                rng[0] = 1
    return [f"dynamic range narrowed: {label} >= 1 (the lowered program rejects {label} = 0: {why})"]


def _verification_summary(rep: Report) -> dict:
    v = rep.data["verification"]
    errs = [r["verify"]["error_vs_original"] for r in rep.passes
            if r.get("verify") and isinstance(r["verify"].get("error_vs_original"), float)]
    low = (rep.data.get("lowering") or {}).get("verify") or {}
    return {"enabled": v.get("enabled", True), "passed": v.get("passed"), "passes_verified":
            sum(1 for r in rep.passes if (r.get("verify") or {}).get("passed")),
            "worst_pass_error_vs_original": max(errs) if errs else None,
            "lowering_error_vs_original": low.get("error_vs_original"),
            "input_sets": low.get("input_sets")}
