"""The ``onnx`` target: the optimized graph as an ONNX model, run by ONNX Runtime.

Lowering, step by step::

    GraphIR ──program_from_ir (no retrace)──▶ ExportedProgram ──torch.onnx.export(dynamo=True)──▶ ONNX (onnx_ir)
        ──rename dims to the IR's labels ("batch", "seq")──▶ ModelProto
        ──onnx-graphsurgeon: inputs/outputs named as in the IR, cleanup().toposort()──▶
        ──ir_version the installed onnxruntime loads──▶ onnx.checker ──▶ model.onnx (+ model.onnx.data)

Why these choices:

- The torch.onnx dynamo exporter (``torch.onnx.export(ExportedProgram, dynamo=True)``) is the
  maintained path; the TorchScript exporter is deprecated and cannot take an ExportedProgram.
- The optimized graph is not traced again: the ExportedProgram is built from it directly
  (:func:`~graphopt.backends.export.program_from_ir`: lifted weights shared, one symbolic
  fake-tensor propagation), and the exporter's own retrace (``run_decompositions``) is skipped
  when every op already has an ONNX translation. The two retraces were two thirds of the
  lowering's time on decoders. Graphs the direct build cannot take are re-exported with
  ``torch.export`` (the payload's ``program`` says which and why).
- Graph inputs and outputs carry the IR's names (``input_ids``, ``logits``), so the file is usable
  on its own (``onnxruntime``, ``trtexec``, Netron) and the runner can feed by name.
- onnx 1.23 stamps IR version 14 on new models, which onnxruntime 1.31 refuses: the file gets the
  highest IR version the *installed* onnxruntime loads (see :data:`ORT_MAX_IR_VERSION`), never
  less than the opset requires.
- The opset is the exporter's default (20) unless the graph holds an op with a standard fused ONNX
  op at a higher opset: ``scaled_dot_product_attention`` (what fuse-attention emits) exports as the
  opset-23 ``Attention`` op, so such graphs get opset 23 (:func:`resolve_opset`); graphs without
  fused ops keep the default, which older runtimes load. The ``opset`` option overrides both.
- ONNX Runtime's ``Attention`` kernel differs from the spec on masks (``finfo.min`` read as "masked
  out", no broadcast of the query dim); the masks are adjusted (:func:`graphopt.backends.onnx_fixups.prepare_attention_masks`).
- Protobuf cannot serialize more than 2 GB, so weights move to ``model.onnx.data`` once the
  initializers pass :data:`EXTERNAL_DATA_THRESHOLD`; smaller models stay one file.
- A bfloat16 graph (a model converted with ``.to(torch.bfloat16)``, or the precision pass's bf16)
  is computed in float32 (option ``bfloat16="float32"``, the default): ONNX Runtime's CPU provider
  has no bfloat16 kernels (``NOT_IMPLEMENTED: Could not find an implementation for MatMul(13)``).
  The graph is upcast on a copy before export (:func:`upcast_bfloat16`): weights converted once,
  dtype arguments of casts and factories and the graph's inputs/outputs mapped to float32. float32
  holds every bfloat16 value exactly and rounds each op far finer, so the result is at least as
  close to the model's exact (fp64) values; the cost is 2x the bfloat16 weights in the file and in
  memory. The payload records ``source_dtype``/``compute_dtype``; the runner widens bf16 inputs
  and rounds the outputs back to bf16, so callers see the model's own dtypes. ``bfloat16="keep"``
  writes the bf16 graph as it is, for runtimes with bf16 kernels (TensorRT, ONNX Runtime CUDA).

Loading reads protobuf only; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.backends.base import Backend, Lowered
from graphopt.backends.export import NotDirect, dim_label, export_program, program_from_ir
from graphopt.backends.onnx_fixups import cleanup
from graphopt.errors import ArtifactError, BackendError, first_line

if TYPE_CHECKING:
    import onnx

    from graphopt.ir.graph_ir import GraphIR
    from graphopt.runtime.onnx_runner import OnnxRuntimeRunner

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
STAGING_DIR = ".onnx-export"  # inside the artifact's temporary directory, removed after lowering
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


#: Translations registered with :func:`register_onnx_translation` by code that is not a plugin (a
#: script, a notebook): op overload → [(lowest opset, onnxscript function)]. Plugins register
#: theirs through the ``graphopt_register_onnx_translations`` hook: they belong to the plugin
#: (``PluginManager.onnx_translations``) and leave with it.
_TRANSLATIONS: dict[Any, list[tuple[int, Callable[..., Any]]]] = {}


def register_onnx_translation(op: Any, function: Callable[..., Any], *, min_opset: int = MIN_OPSET) -> None:
    """Teach the onnx target to translate ``op`` (e.g. ``torch.ops.mylib.my_op.default``) for the
    rest of the process, outside any plugin; a plugin implements the
    ``graphopt_register_onnx_translations(register)`` hook instead (same arguments).

    ``function`` builds the op's ONNX graph with onnxscript ops (the ``custom_translation_table``
    contract of ``torch.onnx.export``). An op may have several translations: the one with the
    highest ``min_opset`` not above the export opset is used (a standard op from opset 23, a
    decomposition below it). Registering again for the same ``min_opset`` replaces that entry.
    """
    entries = _TRANSLATIONS.setdefault(op, [])
    entries[:] = [(v, f) for v, f in entries if v != min_opset] + [(int(min_opset), function)]
    entries.sort(key=lambda e: e[0])


def translations() -> dict[Any, list[tuple[int, Callable[..., Any]]]]:
    """Every ONNX translation known now: the loaded plugins' (hook) and the directly registered
    ones (which win at equal ``min_opset``), op → [(lowest opset, function)] sorted by opset."""
    from graphopt.plugins import get_plugin_manager

    merged: dict[Any, dict[int, Callable[..., Any]]] = {}
    for op, entries in get_plugin_manager().onnx_translations.items():
        for v, f, _plugin in entries:
            merged.setdefault(op, {})[v] = f
    for op, plain in _TRANSLATIONS.items():
        for v, f in plain:
            merged.setdefault(op, {})[v] = f
    return {op: sorted(by.items(), key=lambda e: e[0]) for op, by in merged.items()}


def translation_table(opset: int) -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export`` at ``opset``."""
    table = {}
    for op, entries in translations().items():
        usable = [f for v, f in entries if v <= opset]
        if usable:
            table[op] = usable[-1]
    return table


#: ATen ops that the torch.onnx exporter lowers to one standard ONNX op from some opset on, and
#: decomposes below it: ``aten.scaled_dot_product_attention`` → ``Attention`` (the canonical form
#: of graphopt-fusion's fuse-attention), ``aten.rms_norm`` → ``RMSNormalization``. Without an
#: ``opset`` option a graph that holds one of them (or an op with a registered translation) is
#: exported at the opset of its fused ops (capped by the exporter), see :func:`preferred_opset`.
STANDARD_OP_OPSETS: dict[str, int] = {
    "aten.scaled_dot_product_attention": 23,   # Attention
    "aten.rms_norm": 23,                       # RMSNormalization
}


def preferred_opset(ir: GraphIR) -> int | None:
    """The opset at which every op of ``ir`` lowers to its standard fused ONNX op: the highest
    :data:`STANDARD_OP_OPSETS` entry or registered translation ``min_opset`` among its ops, ``None``
    when it has none."""
    from graphopt.ir.graph_ir import op_name

    want = None
    known = translations()
    for node in ir.graph.nodes:
        if node.op != "call_function":
            continue
        opset = STANDARD_OP_OPSETS.get(op_name(node))
        entries = known.get(node.target)
        if entries:
            opset = max(opset or 0, entries[-1][0])
        if opset is not None and (want is None or opset > want):
            want = opset
    return want


class OnnxBackend(Backend):
    """ONNX (opset 18+) run by ONNX Runtime; the embedded default.

    Options (``lower``): ``opset`` (18 up to the highest the exporter supports, 23 with torch
    2.13; default: the exporter's default, or the opset of the graph's fused ops when higher: 23
    for ``scaled_dot_product_attention`` → ``Attention``, see :func:`resolve_opset`), ``external_data`` (``"auto"``, ``True``,
    ``False``), ``bfloat16`` (``"float32"``: compute a bf16 graph in float32, the default, since
    ONNX Runtime's CPU provider has no bf16 kernels; ``"keep"``: write it in bf16),
    ``exporter_optimizer`` (``"light"``, the default: the onnxscript optimizer's constant folding
    and clean-ups without its pattern rewriter, which is pure Python and grows with graph size x
    rules (50 s of a 0.5B model's lowering) for a few reshapes ONNX Runtime and TensorRT remove
    anyway; ``"full"``: torch.onnx's own ``optimize=True``), ``fold_attention`` (``True``, the
    default: ``Attention`` takes 3-D Q/K/V and the KV cache, without the per-layer reshapes,
    transposes and cache concatenations, see :func:`graphopt.backends.onnx_fixups.fold_attention_layout`; ``False``: the
    exporter's 4-D form, which the TensorRT lowering uses).
    Options (``load``): ``providers`` (onnxruntime execution providers, in order),
    ``threads`` (intra-op threads), ``spinning`` and ``disabled_optimizers`` (see
    :class:`~graphopt.runtime.onnx_runner.OnnxRuntimeRunner`).
    """

    name = "onnx"

    def lower(self, ir: GraphIR, out_dir: Path, options: dict[str, Any]) -> Lowered:
        import onnx

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        opset = resolve_opset(options.get("opset"), ir)
        bf16 = options.get("bfloat16", "float32")
        optimizer = options.get("exporter_optimizer", "light")
        fold_attention = options.get("fold_attention", True)
        if not isinstance(fold_attention, bool):
            raise BackendError(f"onnx option fold_attention={fold_attention!r} is not valid; use true (the default: "
                               "Attention takes 3-D Q/K/V and the KV cache) or false (the exporter's 4-D form)")
        if optimizer not in ("light", "full"):
            raise BackendError(f"onnx option exporter_optimizer={optimizer!r} is not valid; use 'light' (the "
                               "default) or 'full' (torch.onnx's optimize=True, slower on large graphs)")
        if bf16 not in ("float32", "keep"):
            raise BackendError(f"onnx option bfloat16={bf16!r} is not valid; use 'float32' (compute a bfloat16 "
                               "graph in float32: ONNX Runtime's CPU provider has no bfloat16 kernels) or 'keep'")
        t0 = time.perf_counter()
        upcast = upcast_bfloat16(ir) if bf16 == "float32" else None
        if upcast is not None:
            ir, added_bytes = upcast  # a copy: the compiler's IR keeps its bf16 graph and weights
        external = options.get("external_data", "auto")
        if external == "auto":
            external = ir_weight_bytes(ir) > EXTERNAL_DATA_THRESHOLD
        # Large models: the exporter streams the weights into a staging data file, tensor by tensor,
        # and everything after it works on a protobuf that only points into that file, so the
        # lowering adds no copy of the weights to the process (a ModelProto with the weights
        # inside, then graphsurgeon's export of it, would add two).
        staging = out_dir / STAGING_DIR if external else None
        try:
            try:
                ep, how = program_from_ir(ir), "direct"
            except NotDirect as e:
                log.info("onnx lowering: re-exporting the graph with torch.export (%s)", e)
                ep, how = export_program(ir), f"re-exported: {e}"
            t1 = time.perf_counter()
            model = to_onnx(ep, ir, opset, staging=staging, optimizer=optimizer, decompose="needed" if how == "direct" else "always")
            del ep
            t2 = time.perf_counter()
            model = cleanup(model, ir, base_dir=staging, fold_attention=fold_attention)
            if upcast is not None:
                _check_no_bfloat16(model)
            opset = _default_opset(model)
            model.ir_version = ir_version_for(opset)

            weight_bytes = _initializer_bytes(model)
            path = out_dir / MODEL_FILE
            for stale in (path, out_dir / DATA_FILE):
                stale.unlink(missing_ok=True)
            files = [MODEL_FILE]
            if external:
                write_with_external_data(model, staging, path, DATA_FILE)
                if (out_dir / DATA_FILE).exists():
                    files.append(DATA_FILE)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        if not external:
            if weight_bytes > (2 << 30) - (64 << 20):
                raise BackendError(f"the model's weights ({weight_bytes / 2**30:.1f} GiB) do not fit in one "
                                   "protobuf file (2 GB); lower with external_data='auto' or True")
            onnx.save_model(model, str(path))
        try:
            onnx.checker.check_model(str(path))  # by path: works for >2 GB models with external data
        except onnx.checker.ValidationError as e:
            raise BackendError(f"the exported ONNX model {path} fails onnx.checker: {first_line(str(e))}. "
                               "This is a bug in a pass or in the exporter; lower with fewer passes to "
                               "find which") from e
        log.debug("onnx lowering: export %.2fs, torch.onnx %.2fs, cleanup+save %.2fs",
                  t1 - t0, t2 - t1, time.perf_counter() - t2)
        notes = []
        if DATA_FILE in files:
            notes.append(f"weights ({weight_bytes / 2**30:.2f} GiB) are in {DATA_FILE}, beside {MODEL_FILE}")
        payload = {"format": "onnx", "file": MODEL_FILE, "opset": opset, "ir_version": model.ir_version,
                   "program": how,
                   "producer": f"{model.producer_name} {model.producer_version}".strip(),
                   "external_data": DATA_FILE if DATA_FILE in files else None}
        if upcast is not None:
            payload.update(source_dtype="bfloat16", compute_dtype="float32")
            notes.append(f"bf16 graph computed in fp32 on ONNX Runtime CPU (it has no bf16 kernels): weights "
                         f"converted once, +{added_bytes / 2**20:.1f} MiB; inputs and outputs stay bf16 for "
                         "callers (onnx option bfloat16='keep' writes the bf16 graph instead)")
        return Lowered(files=files, payload=payload, notes=notes)

    def load_for_verification(self, artifact_dir: Path, manifest: dict[str, Any]) -> OnnxRuntimeRunner:
        """The session of the compile's own check: ONNX Runtime memory-maps the external weights
        (aligned by :func:`write_with_external_data`); without prepacking it keeps no second,
        re-laid-out copy of every float GEMM weight. Same kernels and numerics, lower peak memory;
        the session is closed before the compile moves on. A graph whose float GEMM weights are
        small (``PREPACK_FLOAT_BYTES``: an int4-weight model, whose blocked int4 weights ONNX
        Runtime fuses into ``MatMulNBits``) keeps prepacking: that kernel runs ~5x slower on
        unpacked weights (13.5 s instead of ~3 s for the 1B shape's probes), and its packed copy
        is the size of the int4 weights."""
        payload = _payload(manifest)
        if _float_gemm_weight_bytes(Path(artifact_dir) / payload.get("file", MODEL_FILE)) <= PREPACK_FLOAT_BYTES:
            return self.load(artifact_dir, manifest)
        return self.load(artifact_dir, manifest, session_config={"session.disable_prepacking": "1"})

    def load(self, artifact_dir: Path, manifest: dict[str, Any], providers: list[str] | None = None,
             threads: int | None = None, spinning: bool | None = None,
             disabled_optimizers: list[str] | None = None, session_config: dict[str, str] | None = None,
             **_: Any) -> OnnxRuntimeRunner:
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
        output_dtypes = None
        if payload.get("compute_dtype") is not None and payload.get("compute_dtype") != payload.get("source_dtype"):
            # a bf16 graph computed in fp32: hand back the outputs the model returns in bf16 as bf16
            import torch

            output_dtypes = [torch.bfloat16 if s.get("dtype") == payload.get("source_dtype") == "bfloat16" else None
                             for s in manifest.get("outputs", [])]
        return OnnxRuntimeRunner(Path(artifact_dir) / file, providers=providers, threads=threads,
                                 spinning=spinning, disabled_optimizers=disabled_optimizers,
                                 output_dtypes=output_dtypes, session_config=session_config)


# -- bfloat16 → float32 ---------------------------------------------------------------------------
def upcast_bfloat16(ir: GraphIR) -> tuple[GraphIR, int] | None:
    """A copy of ``ir`` that computes in float32 wherever ``ir`` computes in bfloat16, and the bytes
    its converted weights add; ``None`` when ``ir`` holds no bfloat16.

    On a copy (:meth:`GraphIR.copy`; ``ir`` and its weights are left as they are):
    every bf16 parameter, buffer and tensor constant is replaced by a float32 tensor (once per
    tensor, so tied weights stay tied); every ``torch.bfloat16`` argument (the ``dtype`` of
    ``_to_copy``, ``to``, ``arange``, ``full``, ``zeros``, ``ones``, ``empty``, ...) becomes
    ``torch.float32``; bf16 example inputs and input/output specs become float32. Casts down to
    bf16 (``x.to(bf16)`` after an fp32 norm) thereby become no-ops: the graph rounds less, never
    more.

    Raises:
        BackendError: the graph reinterprets bf16 bits (``view(dtype)``), which float32 cannot mimic;
            lower with ``bfloat16="keep"`` for a runtime with bf16 kernels, or use the torch target.
    """
    import torch

    bf16, f32 = torch.bfloat16, torch.float32
    bitcasts = {torch.ops.aten.view.dtype, torch.ops.prims.view_of_dtype.default}

    def bf16_arg(node: torch.fx.Node) -> bool:
        found = []
        torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(a is bf16))
        return any(found)

    def bf16_value(x: Any) -> bool:
        return getattr(x.meta.get("val") if isinstance(x, torch.fx.Node) else x, "dtype", None) == bf16

    gm = ir.graph_module
    holds = (any(t.dtype == bf16 for t in (*gm.parameters(), *gm.buffers()))
             or any(bf16_value(x) for x in ir.example_inputs)
             or any(s.dtype == "bfloat16" for s in (*ir.inputs, *ir.outputs))
             or any(bf16_arg(n) or bf16_value(n) for n in gm.graph.nodes))
    if not holds:
        return None
    for node in gm.graph.nodes:
        if node.target in bitcasts and (bf16_arg(node) or any(bf16_value(a) for a in node.all_input_nodes)):
            raise BackendError(f"the graph reinterprets bfloat16 bits at {node.format_node()}; computing it in float32 "
                               "would change the result. Lower with the onnx option bfloat16='keep' (for a runtime "
                               "with bf16 kernels) or use the torch target")

    low = ir.copy()  # new graph and specs; the weights converted below are replaced, never written into
    gm32 = low.graph_module
    converted: dict[int, torch.Tensor] = {}  # id(bf16 tensor) -> its float32 copy, made once
    added = 0

    def widened(t: torch.Tensor) -> torch.Tensor:
        nonlocal added
        if id(t) not in converted:
            converted[id(t)] = t.detach().to(f32)
            added += t.numel() * (f32.itemsize - bf16.itemsize)
        return converted[id(t)]

    for mod in gm32.modules():
        # the module's own tables, so that non-persistent buffers stay non-persistent
        for name, p in list(mod._parameters.items()):  # noqa: SLF001 - no public API replaces an entry in place
            if p is not None and p.dtype == bf16:
                mod._parameters[name] = torch.nn.Parameter(widened(p), requires_grad=False)  # noqa: SLF001
        for name, b in list(mod._buffers.items()):  # noqa: SLF001
            if b is not None and b.dtype == bf16:
                mod._buffers[name] = widened(b)  # noqa: SLF001
        for name, v in list(vars(mod).items()):  # tensor constants (get_attr targets)
            if isinstance(v, torch.Tensor) and v.dtype == bf16:
                setattr(mod, name, widened(v))
    for node in gm32.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, lambda a: f32 if a is bf16 else a)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: f32 if a is bf16 else a)
        if bf16_value(node):  # stale now; torch.export derives every value's meta again
            node.meta.pop("val", None)
            node.meta.pop("tensor_meta", None)
    gm32.recompile()

    for spec in (*low.inputs, *low.outputs):
        if spec.dtype == "bfloat16":
            spec.dtype = "float32"
    low.example_inputs = [x.to(f32) if bf16_value(x) else x for x in ir.example_inputs]
    return low, added


def _check_no_bfloat16(model: onnx.ModelProto) -> None:
    """After an upcast, nothing in the ONNX graph may still be bf16 (ONNX Runtime CPU could not run
    it): initializers, graph inputs/outputs, ``Cast`` targets and constants."""
    import onnx

    BF16 = onnx.TensorProto.BFLOAT16
    g = model.graph
    left = [f"initializer {t.name}" for t in g.initializer if t.data_type == BF16]
    left += [f"graph value {v.name}" for v in (*g.input, *g.output, *g.value_info)
             if v.type.tensor_type.elem_type == BF16]
    for node in g.node:
        for a in node.attribute:
            if (a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == BF16) or (
                    a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16):
                left.append(f"node {node.name} ({node.op_type}) attribute {a.name}")
    if left:
        raise BackendError(f"the float32 upcast of a bfloat16 graph left bfloat16 in the ONNX model ({', '.join(left[:5])}"
                           f"{', ...' if len(left) > 5 else ''}); this is a bug in graphopt's upcast: lower with the "
                           "onnx option bfloat16='keep' on a runtime with bf16 kernels, or use the torch target")


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


def resolve_opset(requested: Any, ir: GraphIR | None = None) -> int:
    """The opset to export: ``requested`` (validated), else the exporter's default raised to
    :func:`preferred_opset` of ``ir`` (up to the highest the exporter writes).

    Why not always the highest: a graph without fused ops gains nothing from opset 23, and the
    default opset keeps its file loadable by older runtimes (TensorRT before 10.15, older ONNX
    Runtime builds); a graph with ``scaled_dot_product_attention`` needs 23 for the exporter to
    emit the standard ``Attention`` op instead of a MatMul/Softmax decomposition."""
    default, highest = exporter_opsets()
    if requested is None:
        opset = max(default, MIN_OPSET)
        wanted = preferred_opset(ir) if ir is not None else None
        if wanted is not None and wanted > opset:
            if wanted > highest:
                log.info("onnx lowering: the graph's fused ops want opset %d but this torch.onnx exporter "
                         "writes at most %d; they are decomposed", wanted, highest)
            opset = min(wanted, highest)
        return opset
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
def to_onnx(ep: Any, ir: GraphIR, opset: int, staging: Path | None = None, optimizer: str = "light",
            decompose: str = "always") -> onnx.ModelProto:
    """``torch.onnx.export`` of an ExportedProgram, quietly; symbolic dims renamed to the IR's labels.

    ``decompose="needed"`` (for programs from :func:`~graphopt.backends.export.program_from_ir`,
    whose graphs are already functional ATen): the exporter's ``run_decompositions``, a full
    retrace, runs only when a node's op has no ONNX translation or is in-place; otherwise the
    program is translated as it is.

    With ``staging`` (a directory), the program is saved there as ``export.onnx`` with its weights
    in ``export.onnx.data`` (written tensor by tensor from the torch tensors), and the returned
    ModelProto is read back without them: its initializers point into that file."""
    import onnx
    import torch

    stdout = io.StringIO()
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), \
                _decomposition(decompose) as decomposed:
            warnings.simplefilter("ignore")
            # An ExportedProgram is translated as it is: args and dynamic_shapes are not used.
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False,
                                        optimize=optimizer == "full", report=False, verify=False,
                                        custom_translation_table=translation_table(opset) or None)
            if optimizer == "light":
                _optimize_light(program.model)
    except Exception as e:
        raise BackendError(f"torch.onnx could not translate the graph to ONNX opset {opset}: "
                           f"{type(e).__name__}: {first_line(str(e))}\nhint: an op without an ONNX "
                           "translation (a custom op a pass inserted?) needs one registered by its plugin's "
                           "graphopt_register_onnx_translations hook (README: Writing a pass); run with GRAPHOPT_DEBUG=1 "
                           "for the full error") from e
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if stdout.getvalue().strip():
        log.debug("torch.onnx said:\n%s", stdout.getvalue())
    if decomposed:
        log.debug("onnx lowering: run_decompositions for %s", ", ".join(decomposed))
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
    try:
        if staging is None:
            return program.model_proto
        import onnx_ir

        staging.mkdir(parents=True, exist_ok=True)
        # the weights go to their final file name, 4 KiB-aligned: when the passes after this leave
        # them as they are, write_with_external_data moves the file instead of copying it
        _write_transposed_in_rows(program.model)
        # two writers: one transposes a weight (torch, GIL released) while the other writes one
        onnx_ir.save(program.model, str(staging / "export.onnx"), external_data=DATA_FILE, alignment=4096,
                     max_in_flight_bytes=256 << 20, max_workers=2)
        return onnx.load(str(staging / "export.onnx"), load_external_data=False)
    finally:
        _drop_torch_weights(program)


@contextlib.contextmanager
def _decomposition(mode: str):
    """Within it, torch.onnx's ``decompose_with_registry`` (``run_decompositions`` with the table
    of ops that have no ONNX translation) is skipped for programs that contain none of those ops
    and no in-place op (``mode="needed"``), and its type-promotion pass reads the fake tensors the
    program's nodes already carry instead of recomputing each one (it reruns only the nodes it
    changes). Yields the list of ops that made the decomposition run."""
    needed: list[str] = []
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
        from torch.onnx._internal.fx.passes import type_promotion
        original = _fx_passes.decompose_with_registry
        interpreter = type_promotion._TypePromotionInterpreter
        original_run_node = interpreter.run_node
    except (ImportError, AttributeError):  # another torch layout: the exporter as it is
        mode = "always"
    if mode == "always":
        yield needed
        return

    def decompose_if_needed(program, registry):
        import torch

        table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
        for n in program.graph.nodes:
            op = n.target
            if n.op == "call_function" and isinstance(op, torch._ops.OpOverload) and (
                    op in table or op._schema.is_mutable or not registry.is_registered(op)):
                needed.append(str(op))
        return original(program, registry) if needed else program

    def run_node(self, n):
        # the pass reruns every node only to know its inputs' dtypes; the program's nodes carry
        # fresh fake tensors (from the program build or run_decompositions), and the nodes it
        # promotes are rerun by the pass itself, which refreshes their ``val``
        if n.op != "call_function" or not _fake_val(n.meta.get("val")):
            return original_run_node(self, n)
        with self._set_current_node(n):
            if rule := type_promotion.get_type_promotion_rule(n, self.type_promotion_table):
                self._maybe_promote_node(n, rule)
        return n.meta["val"]

    _fx_passes.decompose_with_registry = decompose_if_needed
    interpreter.run_node = run_node
    try:
        yield needed
    finally:
        _fx_passes.decompose_with_registry = original
        interpreter.run_node = original_run_node


def _fake_val(val: Any) -> bool:
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(val, (list, tuple)):
        return len(val) > 0 and all(_fake_val(v) for v in val)
    return isinstance(val, (FakeTensor, torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _optimize_light(model: Any) -> None:
    """torch.onnx's ``optimize=True`` (onnxscript's ``optimize_ir`` + its opset-23 fusions) without
    the pattern rewriter: inlining, constant folding, unused-node removal, constant lifting,
    initializer deduplication, CSE, name fixes. The rewriter's rules (no-op Mul/Add/Cast, reshape
    and transpose chains) only tidy the exporter's shape plumbing, which ONNX Runtime's and
    TensorRT's own graph optimizations remove too; its pure-Python matching dominated the lowering
    of large graphs."""
    import onnx_ir
    import onnx_ir.passes.common as common
    import onnxscript.rewriter.onnx_fusions
    from onnxscript.optimizer import _constant_folding as folding

    loop = onnx_ir.passes.PassManager(
        [folding.FoldConstantsPass(shape_inference=True, input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                   output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
         common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
        steps=2, early_stop=True)
    onnx_ir.passes.Sequential(
        common.InlinePass(), loop, common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass(),
    )(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)


#: float GEMM weight bytes up to which the compile's check session prepacks (load_for_verification)
PREPACK_FLOAT_BYTES = 256 << 20


def _float_gemm_weight_bytes(model_file: Path) -> int:
    """Bytes of the float initializers that feed a ``MatMul`` or ``Gemm`` (what prepacking would
    copy), read from the graph without its external weights; a large number when unreadable."""
    import onnx

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # noqa: BLE001 - the check's own load reports a broken file
        return 1 << 62
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    sizes = {}
    for t in model.graph.initializer:
        if t.data_type in floats:
            n = 1
            for d in t.dims:
                n *= d
            sizes[t.name] = n * {onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT: 4}.get(t.data_type, 2)
    used = {i for node in model.graph.node if node.op_type in ("MatMul", "Gemm") for i in node.input}
    return sum(size for name, size in sizes.items() if name in used)


#: columns per tile of the blocked transposition in :func:`_write_transposed_in_rows`
TILE_COLUMNS = 512


def _write_transposed_in_rows(model: Any) -> int:
    """The exporter writes ``linear`` as ``MatMul(x, Transpose(W))`` and constant folding turns
    ``Transpose(W)`` into a numpy VIEW of the torch weight (no copy, good), which numpy's
    ``tofile`` then writes element by element: 12 s of a 0.5B model's 13 s save. Such
    initializers are written in contiguous blocks of rows instead (a 64 MiB buffer at a time,
    transposed by torch).
    Returns how many were wrapped."""
    import numpy as np
    import onnx_ir

    plain = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16,
                                   np.int32, np.uint32, np.int64, np.uint64, np.bool_)}

    import torch

    class RowBlocks(onnx_ir.Tensor):
        def tofile(self, file) -> None:
            a = self.raw
            rows = max(1, (64 << 20) // max(1, a[0].nbytes))
            for i in range(0, a.shape[0], rows):
                try:  # torch's strided copy is blocked and threaded: ~3x numpy's on a transposed view
                    src = torch.from_numpy(a[i:i + rows])
                except TypeError:  # a dtype torch does not take from numpy
                    file.write(np.ascontiguousarray(a[i:i + rows]).data)
                    continue
                # in tiles of 512 columns: a block of a wide transposed view (a tied lm_head's,
                # [hidden, vocab]) copied at once writes to every one of its rows for each source
                # row, 4x slower (2.4 s instead of 0.5 s for the 0.5B shape's 151936 x 896)
                block = torch.empty(src.shape, dtype=src.dtype)
                for c in range(0, src.shape[-1], TILE_COLUMNS):
                    block[..., c:c + TILE_COLUMNS].copy_(src[..., c:c + TILE_COLUMNS])
                file.write(block.numpy().data)

    wrapped = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            raw = getattr(tensor, "raw", None)
            if (isinstance(raw, np.ndarray) and raw.ndim >= 1 and raw.shape[0] > 0 and not raw.flags["C_CONTIGUOUS"]
                    and raw.dtype in plain and raw.dtype == tensor.dtype.numpy()):
                value.const_value = RowBlocks(raw, dtype=tensor.dtype, name=tensor.name)
                wrapped += 1
    return wrapped


def _drop_torch_weights(program: Any) -> None:
    """Unlink the exporter's ONNX graphs from the torch weight tensors they wrap, which are the
    optimized graph's (merge-gemms' stacked weights, say): the compile frees those before its ONNX
    Runtime check. onnxscript's rewrite rules are module-level objects whose matchers keep the
    last node and graph they looked at (``_current_node``, ``_graph``: onnxscript 0.7), and so the
    whole exported graph with its weights, after the export returns; that state is cleared here."""
    import gc

    for graph in (program.model.graph, *program.model.graph.subgraphs()):
        for value in graph.initializers.values():
            value.const_value = None
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, PatternMatcher):
            for attr in ("_current_node", "_graph", "_match", "_tracer"):
                if getattr(obj, attr, None) is not None:
                    setattr(obj, attr, None)


def ir_weight_bytes(ir: GraphIR) -> int:
    """Bytes of the tensors (parameters, buffers, constants) the graph module holds, each once."""
    from graphopt.ir.graph_ir import shared_tensors

    seen, total = set(), 0
    for t in shared_tensors(ir.graph_module).values():
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        except (RuntimeError, NotImplementedError):  # meta/fake tensors have no storage
            key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def write_with_external_data(model: onnx.ModelProto, src_dir: Path | None, path: Path, data_name: str,
                             *, threshold: int = 1024, align: int = 4096) -> int:
    """Save ``model`` to ``path`` with every initializer of ``threshold`` bytes or more in
    ``data_name`` beside it, streaming: tensors that already point into an external file (under
    ``src_dir``) are copied range by range, tensors held in the protobuf are written out and
    emptied. Offsets are aligned to ``align`` bytes (ONNX Runtime memory-maps aligned external
    initializers instead of copying them). Unreferenced bytes of the source file are left behind.
    Returns the bytes written."""
    import onnx

    def set_external_data(tensor, location: str, offset: int, length: int) -> None:
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def append_raw(out, tensor, written: int) -> int:
        """Write an initializer held in the protobuf at the next aligned offset; empty it."""
        pad = (-written) % align
        out.write(b"\0" * pad)
        written += pad
        raw = tensor.raw_data
        out.write(raw)
        tensor.ClearField("raw_data")
        set_external_data(tensor, data_name, offset=written, length=len(raw))
        return written + len(raw)

    data_path = path.parent / data_name
    if src_dir is not None and _reuse_external_file(model, Path(src_dir) / data_name, data_name, align):
        # the source file is already laid out as wanted (aligned, nothing unreferenced): move it,
        # then append what the protobuf holds
        os.replace(Path(src_dir) / data_name, data_path)
        written = data_path.stat().st_size
        with open(data_path, "ab") as out:
            for tensor in _all_tensors(model):
                if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.HasField("raw_data") \
                        and len(tensor.raw_data) >= threshold:
                    written = append_raw(out, tensor, written)
        onnx.save_model(model, str(path))
        return written
    written = 0
    with open(data_path, "wb") as out:
        for tensor in _all_tensors(model):
            ext = {e.key: e.value for e in tensor.external_data}
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                if src_dir is None:
                    raise BackendError(f"initializer {tensor.name} points to external data but no source folder was given")
                src = Path(src_dir) / ext["location"]
                offset, length = int(ext.get("offset", 0)), int(ext.get("length", src.stat().st_size))
                pad = (-written) % align
                out.write(b"\0" * pad)
                written += pad
                with open(src, "rb") as f:
                    f.seek(offset)
                    left = length
                    while left:
                        chunk = f.read(min(left, 64 << 20))
                        if not chunk:
                            raise BackendError(f"external data of {tensor.name} ends early in {src}")
                        out.write(chunk)
                        left -= len(chunk)
                set_external_data(tensor, data_name, offset=written, length=length)
                written += length
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
                written = append_raw(out, tensor, written)
    onnx.save_model(model, str(path))
    if written == 0:
        data_path.unlink(missing_ok=True)
    return written


def _reuse_external_file(model: onnx.ModelProto, src: Path, data_name: str, align: int) -> bool:
    """Whether ``src`` can become the artifact's data file as it is: every external initializer
    points into it (under ``data_name``), the large ones at ``align``-ed offsets, and they
    reference at least 90 % of its bytes (a pass that replaced weights, int4 packing say, leaves
    dead ranges: then the data is copied compactly instead)."""
    import onnx

    if not src.is_file():
        return False
    referenced = 0
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in tensor.external_data}
        if ext.get("location") != data_name:
            return False
        offset, length = int(ext.get("offset", 0)), int(ext.get("length", 0))
        if length >= (1 << 20) and offset % align:
            return False
        referenced += length
    return referenced >= 0.9 * src.stat().st_size


def _all_tensors(model: onnx.ModelProto):
    """Initializers of the graph and its subgraphs (weights live there after torch.onnx)."""
    stack = [model.graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.g is not None and a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


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


