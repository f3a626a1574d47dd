"""The ``onnx`` target: the optimized graph as an ONNX model, run by ONNX Runtime.

Lowering, step by step::

    GraphIR ──export_program──▶ ExportedProgram ──torch.onnx.export(dynamo=True)──▶ ONNX (onnx_ir)
        ──rename dims to the IR's labels ("batch", "seq")──▶ ModelProto
        ──onnx-graphsurgeon: inputs/outputs named as in the IR, cleanup().toposort()──▶
        ──ir_version the installed onnxruntime loads──▶ onnx.checker ──▶ model.onnx (+ model.onnx.data)

Why these choices:

- The torch.onnx dynamo exporter (``torch.onnx.export(ExportedProgram, dynamo=True)``) is the
  maintained path; the TorchScript exporter is deprecated and cannot take an ExportedProgram.
- Graph inputs and outputs carry the IR's names (``input_ids``, ``logits``), so the file is usable
  on its own (``onnxruntime``, ``trtexec``, Netron) and the runner can feed by name.
- onnx 1.23 stamps IR version 14 on new models, which onnxruntime 1.31 refuses: the file gets the
  highest IR version the *installed* onnxruntime loads (see :data:`ORT_MAX_IR_VERSION`), never
  less than the opset requires.
- Protobuf cannot serialize more than 2 GB, so weights move to ``model.onnx.data`` once the
  initializers pass :data:`EXTERNAL_DATA_THRESHOLD`; smaller models stay one file.

Loading reads protobuf only; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from graphopt.backends.base import Backend, Lowered
from graphopt.backends.export import dim_label, export_program
from graphopt.errors import ArtifactError, BackendError

if TYPE_CHECKING:
    import onnx

    from graphopt.ir.graph_ir import GraphIR
    from graphopt.runtime.onnx_runner import OnnxRuntimeRunner

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MIN_OPSET = 18

#: Initializer bytes above which weights go to an external data file. Protobuf refuses messages
#: over 2 GB; 1 GiB leaves room for the graph itself and keeps single files quick to load.
EXTERNAL_DATA_THRESHOLD = 1 << 30

#: onnxruntime release (major, minor) → highest ONNX IR version it loads: the IR version of the onnx
#: release it bundles (onnxruntime checks ``model.ir_version`` against its onnx ``IR_VERSION`` and
#: refuses newer files: "Unsupported model IR version"). Each row starts at the first release known
#: to bundle that onnx; releases in between inherit the row before, so the table errs low where a
#: release is uncertain (too low only costs a lower stamp, too high makes files that do not load).
#: 1.31 → 13 was checked by hand (loads 13, refuses 14), and
#: tests/backends/test_onnx_backend.py re-checks the cap against the installed onnxruntime.
#: Releases newer than the last row load at least its version.
ORT_MAX_IR_VERSION: list[tuple[tuple[int, int], int]] = [
    ((1, 14), 8),    # onnx 1.13
    ((1, 15), 9),    # onnx 1.14
    ((1, 18), 10),   # onnx 1.16
    ((1, 22), 11),   # onnx 1.18 (opset 23)
    ((1, 24), 12),   # onnx 1.19
    ((1, 31), 13),   # onnx 1.20+; verified
]


#: Translations of ops that torch.onnx does not know (custom ops that passes insert), registered by
#: the plugins that define them: op overload → [(lowest opset, onnxscript function)], see
#: :func:`register_onnx_translation`.
_TRANSLATIONS: dict[Any, list[tuple[int, Callable[..., Any]]]] = {}


def register_onnx_translation(op: Any, function: Callable[..., Any], *, min_opset: int = MIN_OPSET) -> None:
    """Teach the onnx target to translate ``op`` (e.g. ``torch.ops.graphopt.rotary_embedding.default``).

    ``function`` builds the op's ONNX graph with onnxscript ops (the ``custom_translation_table``
    contract of ``torch.onnx.export``). An op may have several translations: the one with the
    highest ``min_opset`` not above the export opset is used (a standard op from opset 23, a
    decomposition below it). Registering again for the same ``min_opset`` replaces that entry.
    """
    entries = _TRANSLATIONS.setdefault(op, [])
    entries[:] = [(v, f) for v, f in entries if v != min_opset] + [(int(min_opset), function)]
    entries.sort(key=lambda e: e[0])


def translation_table(opset: int) -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export`` at ``opset``."""
    table = {}
    for op, entries in _TRANSLATIONS.items():
        usable = [f for v, f in entries if v <= opset]
        if usable:
            table[op] = usable[-1]
    return table


class OnnxBackend(Backend):
    """ONNX (opset 18+) run by ONNX Runtime; the embedded default.

    Options (``lower``): ``opset`` (default: the torch.onnx exporter's default; 18 up to the
    highest the exporter supports, 23 with torch 2.13), ``external_data`` (``"auto"``, ``True``,
    ``False``). Options (``load``): ``providers`` (onnxruntime execution providers, in order),
    ``threads`` (intra-op threads).
    """

    name = "onnx"

    def lower(self, ir: GraphIR, out_dir: Path, options: dict[str, Any]) -> Lowered:
        import onnx

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        opset = resolve_opset(options.get("opset"))
        t0 = time.perf_counter()
        ep = export_program(ir)
        t1 = time.perf_counter()
        model = to_onnx(ep, ir, opset)
        t2 = time.perf_counter()
        model = _cleanup(model, ir)
        opset = _default_opset(model)
        model.ir_version = ir_version_for(opset)

        weight_bytes = _initializer_bytes(model)
        external = options.get("external_data", "auto")
        if external == "auto":
            external = weight_bytes > EXTERNAL_DATA_THRESHOLD
        path = out_dir / MODEL_FILE
        for stale in (path, out_dir / DATA_FILE):
            stale.unlink(missing_ok=True)
        files = [MODEL_FILE]
        if external:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE, size_threshold=1024, convert_attribute=False)
            if (out_dir / DATA_FILE).exists():
                files.append(DATA_FILE)
        else:
            if weight_bytes > (2 << 30) - (64 << 20):
                raise BackendError(f"the model's weights ({weight_bytes / 2**30:.1f} GiB) do not fit in one "
                                   "protobuf file (2 GB); lower with external_data='auto' or True")
            onnx.save_model(model, str(path))
        try:
            onnx.checker.check_model(str(path))  # by path: works for >2 GB models with external data
        except onnx.checker.ValidationError as e:
            raise BackendError(f"the exported ONNX model {path} fails onnx.checker: {_first_line(str(e))}. "
                               "This is a bug in a pass or in the exporter; lower with fewer passes to "
                               "find which") from e
        log.debug("onnx lowering: export %.2fs, torch.onnx %.2fs, cleanup+save %.2fs",
                  t1 - t0, t2 - t1, time.perf_counter() - t2)
        notes = []
        if DATA_FILE in files:
            notes.append(f"weights ({weight_bytes / 2**30:.2f} GiB) are in {DATA_FILE}, beside {MODEL_FILE}")
        return Lowered(
            files=files,
            payload={"format": "onnx", "file": MODEL_FILE, "opset": opset, "ir_version": model.ir_version,
                     "producer": f"{model.producer_name} {model.producer_version}".strip(),
                     "external_data": DATA_FILE if DATA_FILE in files else None},
            notes=notes)

    def load(self, artifact_dir: Path, manifest: dict[str, Any], providers: list[str] | None = None,
             threads: int | None = None, **_: Any) -> OnnxRuntimeRunner:
        from graphopt.runtime.onnx_runner import OnnxRuntimeRunner

        payload = _payload(manifest)
        file = payload.get("file", MODEL_FILE)
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise ArtifactError(f"manifest names ONNX file {file!r}; it must be a file name inside the "
                                "artifact directory")
        data = payload.get("external_data")
        if data is not None and (not isinstance(data, str) or Path(data).name != data):
            raise ArtifactError(f"manifest names external data file {data!r}; it must be a file name "
                                "inside the artifact directory")
        return OnnxRuntimeRunner(Path(artifact_dir) / file, providers=providers, threads=threads)


# -- opset and IR version -----------------------------------------------------------------------
def exporter_opsets() -> tuple[int, int]:
    """(default, highest) ai.onnx opset of the installed torch.onnx exporter."""
    # torch exposes these only in a private module; read them in this one place.
    try:
        from torch.onnx import _constants
    except ImportError:  # pragma: no cover - layout of a future torch
        return MIN_OPSET, MIN_OPSET
    default = int(getattr(_constants, "ONNX_DEFAULT_OPSET", MIN_OPSET))
    return default, int(getattr(_constants, "ONNX_MAX_OPSET", default))


def resolve_opset(requested: Any) -> int:
    """The opset to export: ``requested`` (validated) or the exporter's default."""
    default, highest = exporter_opsets()
    if requested is None:
        return max(default, MIN_OPSET)
    try:
        opset = int(requested)
    except (TypeError, ValueError):
        raise BackendError(f"onnx option opset={requested!r} is not an integer; use {MIN_OPSET}..{highest}") from None
    if not MIN_OPSET <= opset <= highest:
        raise BackendError(f"onnx option opset={opset} is outside what this torch.onnx exporter writes "
                           f"({MIN_OPSET}..{highest}, default {default})")
    return opset


def ir_version_for_opset(opset: int) -> int:
    """The lowest ONNX IR version that can carry ai.onnx ``opset`` (from onnx's release table)."""
    import onnx

    for row in onnx.helper.VERSION_TABLE:  # (onnx release, IR version, ai.onnx opset, ai.onnx.ml, ...)
        if row[2] >= opset:
            return int(row[1])
    return int(onnx.IR_VERSION)


def ort_max_ir_version(ort_version: str | None = None) -> int:
    """The highest ONNX IR version onnxruntime ``ort_version`` (default: the installed one) loads."""
    if ort_version is None:
        import onnxruntime

        ort_version = onnxruntime.__version__
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in ort_version.split(".")[:2]]
    key = (parts[0], parts[1] if len(parts) > 1 else 0)
    cap = ORT_MAX_IR_VERSION[0][1]
    for since, ir_version in ORT_MAX_IR_VERSION:
        if key >= since:
            cap = ir_version
    return cap


def ir_version_for(opset: int) -> int:
    """The IR version to stamp: the highest both the installed onnx writes and the installed
    onnxruntime loads, and at least what ``opset`` needs."""
    import onnx
    import onnxruntime

    needed = ir_version_for_opset(opset)
    cap = min(int(onnx.IR_VERSION), ort_max_ir_version())
    if needed > cap:
        raise BackendError(f"opset {opset} needs ONNX IR version {needed}, but onnxruntime "
                           f"{onnxruntime.__version__} loads IR <= {cap}; lower with a smaller opset or "
                           "upgrade onnxruntime")
    return cap


# -- export ---------------------------------------------------------------------------------------
def to_onnx(ep: Any, ir: GraphIR, opset: int) -> onnx.ModelProto:
    """``torch.onnx.export`` of an ExportedProgram, quietly; symbolic dims renamed to the IR's labels."""
    import torch

    stdout = io.StringIO()
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout):
            warnings.simplefilter("ignore")
            # An ExportedProgram is translated as it is: args and dynamic_shapes are not used.
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False,
                                        optimize=True, report=False, verify=False,
                                        custom_translation_table=translation_table(opset) or None)
    except Exception as e:
        raise BackendError(f"torch.onnx could not translate the graph to ONNX opset {opset}: "
                           f"{type(e).__name__}: {_first_line(str(e))}\nhint: an op without an ONNX "
                           "translation (a custom op a pass inserted?) needs a translation registered with "
                           "graphopt.backends.onnx.register_onnx_translation; run with GRAPHOPT_DEBUG=1 for the full error") from e
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if stdout.getvalue().strip():
        log.debug("torch.onnx said:\n%s", stdout.getvalue())
    inputs = list(program.model.graph.inputs)
    if len(inputs) != len(ir.inputs):
        raise BackendError(f"the ONNX graph has {len(inputs)} inputs but the IR has {len(ir.inputs)} "
                           f"({', '.join(ir.input_names)}); the exporter dropped or added an input")
    rename: dict[str, str] = {}
    for value, spec in zip(inputs, ir.inputs):
        for d in spec.dynamic:
            sym = value.shape[d] if value.shape is not None and d < len(value.shape) else None
            name = getattr(sym, "value", None)
            if isinstance(name, str):
                rename[name] = dim_label(spec.name, d, spec.shape[d])
    if rename:
        program.rename_axes(rename)
    return program.model_proto


def _cleanup(model: onnx.ModelProto, ir: GraphIR) -> onnx.ModelProto:
    """Name graph inputs/outputs as in the IR, then ``cleanup().toposort()`` with graphsurgeon."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    _name_io(graph, ir.input_names, ir.output_names)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.doc_string = model.doc_string
    for prop in model.metadata_props:
        out.metadata_props.add(key=prop.key, value=prop.value)
    return out


def _name_io(graph: Any, input_names: list[str], output_names: list[str]) -> None:
    """Give graph inputs and outputs the IR's names without clashing with inner value names.

    An output that is also an input, a constant, or another output gets its own value through an
    Identity node, since one value cannot carry two names."""
    import onnx_graphsurgeon as gs

    if len(graph.outputs) != len(output_names):
        raise BackendError(f"the ONNX graph has {len(graph.outputs)} outputs but the IR has "
                           f"{len(output_names)} ({', '.join(output_names)})")
    seen: set[int] = {id(t) for t in graph.inputs}
    for i, var in enumerate(list(graph.outputs)):
        if id(var) in seen or isinstance(var, gs.Constant):
            copy = gs.Variable(f"{output_names[i]}__graphopt_identity", dtype=var.dtype, shape=var.shape)
            graph.nodes.append(gs.Node("Identity", inputs=[var], outputs=[copy]))
            graph.outputs[i] = copy
            var = copy
        seen.add(id(var))
    wanted = {id(t): n for t, n in zip(list(graph.inputs) + list(graph.outputs), input_names + output_names)}
    taken = set(wanted.values())
    if len(taken) != len(wanted):
        raise BackendError(f"graph input/output names are not unique: {input_names + output_names}")
    tensors = graph.tensors(check_duplicates=False).values()
    used = {t.name for t in tensors} | taken
    for t in tensors:
        if id(t) not in wanted and t.name in taken:
            k = 1
            while f"{t.name}_{k}" in used:
                k += 1
            t.name = f"{t.name}_{k}"
            used.add(t.name)
    for t in list(graph.inputs) + list(graph.outputs):
        t.name = wanted[id(t)]


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise BackendError("the exported ONNX model imports no ai.onnx opset")


def _initializer_bytes(model: onnx.ModelProto) -> int:
    import numpy as np
    import onnx

    total = 0
    for init in model.graph.initializer:
        if init.HasField("raw_data"):
            total += len(init.raw_data)
            continue
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        except (KeyError, TypeError):
            itemsize = 4
        total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total


def _payload(manifest: dict[str, Any]) -> dict[str, Any]:
    """The backend's payload facts, whether the manifest nests them under ``payload`` or not."""
    if isinstance(manifest.get("payload"), dict):
        return manifest["payload"]
    return manifest


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""
