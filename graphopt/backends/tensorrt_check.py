"""Static TensorRT compatibility check of an ONNX model — no TensorRT, no GPU needed.

``graphopt check --target tensorrt[=VERSION] FILE.onnx`` and every ``tensorrt`` compile run it, so a
build pipeline learns that an engine build will fail (or silently run in the wrong precision)
before it reaches a GPU node. It reads only protobuf; nothing is executed.

Rules (``Finding.rule``), each one a function below, each finding naming the node and the fix:

============================  ===================================================================
``onnx-ir-version``           IR version newer than the parser's ONNX (warning: the parser warns)
``onnx-opset``                default-domain opset outside the release's documented range
``op-support``                operator unsupported, or supported only from a later release
``op-restriction``            documented restrictions that can be read off the graph (Attention
                              with a KV cache input, non-constant Reduce axes, TopK sorted=0, ...)
``custom-op``                 a node in a custom domain: needs a TensorRT plugin of that name
``io-dtype``                  a graph input/output of a type TensorRT has no binding for
``qdq-zero-point``            Q/DQ zero point not a constant 0 (TensorRT quantization is symmetric)
``qdq-scale``                 Q/DQ scale not > 0 and finite
``qdq-per-channel``           per-channel scales on an activation (only weights may be per-channel)
``qdq-block``                 block quantization of a type other than INT4 / FP4 / FP8, or INT4 on
                              an activation (INT4 is weight-only)
``precision-flags``           the build relies on a precision builder flag (FP16, INT8, ... removed
                              in TensorRT 11: strongly typed only, precision lives in the graph)
``profile-input``             profile names an input the model lacks, or misses a dynamic input
``profile-rank``              a profile shape's rank differs from the input's rank
``profile-order``             not 0 <= min <= opt <= max, or a static dim given another size
``tensorrt-version``          the asked-for version is outside the recorded data
============================  ===================================================================

The operator table and the per-release facts live in ``data/tensorrt_ops.json``, copied from
onnx-tensorrt's ``docs/operators.md`` and ``docs/Changelog.md`` and the TensorRT 10→11 migration
guide (the file names its sources); updating it for a new release is a data change.

Profiles (``profiles=``) take either one profile or several named ones::

    {"input_ids": {"min": [1, 1], "opt": [1, 64], "max": [4, 512]}, ...}           # one profile
    {"input_ids": ([1, 1], [1, 64], [4, 512]), ...}                                 # same, tuples
    {"prefill": {"input_ids": {...}}, "decode": {"input_ids": {...}}}               # named profiles
    [{"input_ids": {...}}, {"input_ids": {...}}]                                    # a list works too

``build_config=`` is the artifact's ``build.json`` (read from next to the file when not given);
the check looks in it for precision flags, a requested precision and profiles.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from graphopt.errors import ArtifactError, BackendError, InputError

if TYPE_CHECKING:
    import onnx

DATA_FILE = Path(__file__).parent / "data" / "tensorrt_ops.json"
DEFAULT_DOMAINS = ("", "ai.onnx")
BUILD_JSON = "build.json"
MODEL_FILE = "model.onnx"

ERROR, WARNING = "error", "warning"

#: ONNX tensor types a TensorRT network can bind as an input or output (TensorRT 10 DataType:
#: kFLOAT, kHALF, kBF16, kINT32, kINT64, kINT8, kUINT8, kBOOL, kFP8, kINT4, kFP4).
IO_DTYPES = {
    "FLOAT",
    "FLOAT16",
    "BFLOAT16",
    "INT32",
    "INT64",
    "INT8",
    "UINT8",
    "BOOL",
    "FLOAT8E4M3FN",
    "INT4",
    "FLOAT4E2M1",
}
LOW_PRECISION_FLOATS = {"FLOAT16", "BFLOAT16"}
QUANTIZED_TYPES = {
    "INT8",
    "UINT8",
    "INT4",
    "UINT4",
    "FLOAT8E4M3FN",
    "FLOAT8E4M3FNUZ",
    "FLOAT8E5M2",
    "FLOAT8E5M2FNUZ",
    "FLOAT4E2M1",
}


# -- public types --------------------------------------------------------------------------------
class NodeRef(NamedTuple):
    """The node a finding is about: ``(name, op_type)``; also usable as a plain tuple."""

    name: str
    op_type: str

    def __str__(self) -> str:
        if self.op_type.startswith("graph "):  # graph inputs/outputs: ("input_ids", "graph input")
            return f"{self.op_type} {self.name!r}"
        return f"node {self.name!r} ({self.op_type})"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: which rule, how bad, where, what, and how to fix it."""

    rule: str
    severity: str  # "error" | "warning"
    node: NodeRef | None
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "node": None if self.node is None else {"name": self.node.name, "op_type": self.node.op_type},
            "message": self.message,
            "fix": self.fix,
        }


@dataclasses.dataclass
class CheckReport:
    """All findings of one check. ``ok`` is True when none is an error."""

    findings: list[Finding]
    version: str  # the TensorRT version checked against, as asked ("10.15", "11")
    release: str  # the data row used ("10.15", "11.0")
    model: str  # file name or "<ModelProto>"
    opset: int | None = None
    ir_version: int | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def format(self) -> str:
        """Human-readable report: a summary line, then one block per finding."""
        ne, nw = len(self.errors), len(self.warnings)
        head = (
            f"TensorRT {self.version} check of {self.model} (opset {self.opset}, IR {self.ir_version}; "
            f"data row {self.release}): "
        )
        if not self.findings:
            return head + "ok, no findings"
        lines = [head + f"{ne} error{'s' * (ne != 1)}, {nw} warning{'s' * (nw != 1)}"]
        for f in sorted(self.findings, key=lambda f: f.severity != ERROR):
            where = f"{f.node}: " if f.node else ""
            lines.append(f"{f.severity:<7} [{f.rule}] {where}{f.message}")
            lines.append(f"        fix: {f.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": "tensorrt",
            "version": self.version,
            "release": self.release,
            "model": self.model,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
        }

    def raise_if_errors(self) -> None:
        """Raise :class:`TensorRTCheckError` (a BackendError, CLI exit 2) when there are errors."""
        if not self.ok:
            raise TensorRTCheckError(self)


class TensorRTCheckError(BackendError):
    """The model would not build with the target TensorRT version; carries the :class:`CheckReport`."""

    def __init__(self, report: CheckReport):
        super().__init__(report.format())
        self.report = report


# -- data ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_data() -> dict[str, Any]:
    """The operator table and per-release facts (``data/tensorrt_ops.json``)."""
    with open(DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def version_tuple(text: str, *, strict: bool = False) -> tuple[int, ...]:
    """``"10.15"`` / ``"10.15.1.29"`` / ``"11"`` → ``(10, 15, ...)``, the one version parser of the
    TensorRT code. Lenient (a version a library reports, ``"10.15.1.post1"``, ``"8.9+cuda"``): the
    leading numeric parts, ``(0,)`` for none. ``strict`` (a version a user wrote): every part a
    number, else :class:`InputError`."""
    parts = str(text).strip().split(".")
    if strict:
        try:
            nums = tuple(int(p) for p in parts)
        except ValueError:
            nums = ()
        if not nums or nums[0] < 0:
            raise InputError(f"TensorRT version {text!r} is not a version number: write it like 10.15 or 11")
        return nums
    out = []
    for part in parts:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out) or (0,)


def parse_version(text: str) -> tuple[int, ...]:
    """A TensorRT version a user wrote (``--target tensorrt=10.15``): :func:`version_tuple` strict."""
    return version_tuple(text, strict=True)


def _vkey(v: tuple[int, ...]) -> tuple[int, int, int, int]:
    return tuple((list(v) + [0, 0, 0, 0])[:4])  # type: ignore[return-value]


def latest_version() -> str:
    """The newest TensorRT release the data covers (the default target of a check)."""
    return load_data()["releases"][-1]["version"]


def known_releases() -> list[str]:
    return [r["version"] for r in load_data()["releases"]]


def parser_ir_version(opset: int, version: str | None = None) -> int:
    """The IR version to stamp on an ONNX file for TensorRT ``version``'s parser: the highest it was
    built against, but never below what ``opset`` needs. (graphopt's onnx backend stamps what the
    installed ONNX Runtime loads, which can be newer than the parser's and draws an
    ``onnx-ir-version`` warning.)"""
    import onnx

    row = _release_row(parse_version(version or latest_version()))
    need = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", int(opset))])
    return max(int(row["max_ir_version"]), need)


def _release_row(version: tuple[int, ...]) -> dict[str, Any]:
    rows = load_data()["releases"]
    older = [r for r in rows if _vkey(parse_version(r["version"])) <= _vkey(version)]
    if not older:
        raise InputError(
            f"TensorRT {'.'.join(map(str, version))} is older than the recorded data (first: "
            f"{rows[0]['version']}); check against {rows[0]['version']} or later"
        )
    return older[-1]


# -- entry point ---------------------------------------------------------------------------------
def check_onnx(
    model_or_path: onnx.ModelProto | str | Path,
    *,
    version: str | None = None,
    profiles: Mapping[str, Any] | list | None = None,
    build_config: Mapping[str, Any] | None = None,
) -> CheckReport:
    """Check an ONNX model (a ModelProto, a ``.onnx`` file, or an artifact directory holding
    ``model.onnx``) against TensorRT ``version`` (default: the newest release in the data).

    ``profiles``: optimization profiles to validate (see the module docstring for the forms).
    ``build_config``: the builder settings (``build.json``); when None and a ``build.json`` lies
    next to the file, that one is read. Raises :class:`~graphopt.errors.InputError` /
    :class:`~graphopt.errors.ArtifactError` for unusable arguments; problems of the model itself
    come back as findings.
    """
    model, name, base_dir = _load_model(model_or_path)
    if build_config is None and base_dir is not None and (base_dir / BUILD_JSON).is_file():
        try:
            build_config = json.loads((base_dir / BUILD_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(
                f"{base_dir / BUILD_JSON} is not valid JSON ({e}); fix or delete it"
            ) from None
    if build_config is not None and not isinstance(build_config, Mapping):
        raise InputError(
            f"build_config must be a dict (the build.json contents), not {type(build_config).__name__}"
        )
    if profiles is None and build_config:
        profiles = build_config.get("profiles") or build_config.get("optimization_profiles")

    asked = version or latest_version()
    ctx = _Context(model, parse_version(asked), build_config or {}, base_dir)
    findings = list(ctx.version_findings)
    for rule in RULES:
        findings.extend(rule(ctx))
    if profiles:
        findings.extend(_check_profiles(ctx, _normalize_profiles(profiles)))
    return CheckReport(
        findings=findings,
        version=str(asked),
        release=ctx.release["version"],
        model=name,
        opset=ctx.opset,
        ir_version=model.ir_version,
    )


def _load_model(model_or_path: Any) -> tuple[onnx.ModelProto, str, Path | None]:
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<ModelProto>", None
    if not isinstance(model_or_path, (str, Path)):
        raise InputError(
            f"check_onnx takes an onnx.ModelProto, a .onnx path or an artifact directory, "
            f"not {type(model_or_path).__name__}"
        )
    path = Path(model_or_path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ArtifactError(
                f"{path} is a directory without {MODEL_FILE}: give the .onnx file, or an artifact "
                f"directory compiled with --target onnx or --target tensorrt"
            )
        path = path / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file; give the path of a .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=False)  # values are read on demand (_to_numpy)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise ArtifactError(
            f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
            f"give a .onnx file written by onnx.save or graphopt compile"
        ) from None
    return model, str(path), path.parent


# -- the model, indexed once ---------------------------------------------------------------------
class _Context:
    """What the rules need: the release row, every node (subgraphs included), constants, types."""

    def __init__(
        self,
        model: onnx.ModelProto,
        version: tuple[int, ...],
        build_config: Mapping[str, Any],
        base_dir: Path | None = None,
    ):
        self.model = model
        self.base_dir = base_dir  # where external data lives (values are read from it on demand)
        self.version = version
        self.build_config = build_config
        self.data = load_data()
        self.version_findings: list[Finding] = []
        self.release = self._pick_release(version)
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
        self.nodes: list[onnx.NodeProto] = list(_walk_nodes(model.graph))
        # tensor name -> TensorProto of a build-time constant (initializers, Constant nodes); values are
        # decoded on demand (value()), so a multi-GB model is not copied to check a few Q/DQ scales
        self.constants: dict[str, onnx.TensorProto] = {}
        self._values: dict[str, Any] = {}
        self.elem_types: dict[str, int] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        for g in _walk_graphs(model.graph):
            for init in g.initializer:
                self.elem_types[init.name] = init.data_type
                self.constants[init.name] = init
            for vi in list(g.input) + list(g.output) + list(g.value_info):
                if vi.type.HasField("tensor_type"):
                    self.elem_types.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for node in self.nodes:
            for out in node.output:
                self.producers[out] = node
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.elem_types[node.output[0]] = attr.t.data_type
                        self.constants[node.output[0]] = attr.t
        self.initializer_names = {i.name for g in _walk_graphs(model.graph) for i in g.initializer}

    def _pick_release(self, version: tuple[int, ...]) -> dict[str, Any]:
        rows = self.data["releases"]
        shown = ".".join(map(str, version))
        row = _release_row(version)
        if version[0] > parse_version(rows[-1]["version"])[0]:
            self.version_findings.append(
                Finding(
                    "tensorrt-version",
                    WARNING,
                    None,
                    f"TensorRT {shown} is newer than the recorded data; checked against {row['version']}",
                    f"add a row for {shown} to {DATA_FILE.name} from its docs/operators.md",
                )
            )
        return row

    def at_least(self, release: str) -> bool:
        return _vkey(self.version) >= _vkey(parse_version(release))

    def value(self, name: str) -> Any:
        """The numpy value of a constant; None when not a constant or not readable (external data)."""
        if name not in self._values:
            proto = self.constants.get(name)
            self._values[name] = None if proto is None else _to_numpy(proto, self.base_dir)
        return self._values[name]

    def is_const(self, name: str) -> bool:
        return name in self.constants

    def is_weight(self, name: str) -> bool:
        """A build-time constant, possibly behind a chain of Q/DQ/Cast/Transpose/Reshape of constants."""
        seen = 0
        while seen < 8:
            if name in self.constants:
                return True
            node = self.producers.get(name)
            if node is None or node.op_type not in (
                "QuantizeLinear",
                "DequantizeLinear",
                "Cast",
                "Transpose",
                "Reshape",
                "Identity",
                "Unsqueeze",
                "Squeeze",
            ):
                return False
            name, seen = node.input[0], seen + 1
        return False

    def dtype(self, name: str) -> str | None:
        import onnx

        t = self.elem_types.get(name)
        return onnx.TensorProto.DataType.Name(t) if t else None


def _walk_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node or attr.g.name:
                yield from _walk_graphs(attr.g)
            for g in attr.graphs:
                yield from _walk_graphs(g)


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in _walk_graphs(graph):
        yield from g.node


def _to_numpy(tensor: onnx.TensorProto, base_dir: Path | None) -> Any:
    import onnx
    from onnx import external_data_helper, numpy_helper

    try:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if base_dir is None:
                return None
            tensor_copy = onnx.TensorProto()
            tensor_copy.CopyFrom(tensor)
            external_data_helper.load_external_data_for_tensor(tensor_copy, str(base_dir))
            tensor = tensor_copy
        return numpy_helper.to_array(tensor)
    except Exception:  # unreadable external data, exotic types: treat as an unknown constant
        return None


def _ref(node: onnx.NodeProto, index: int | None = None) -> NodeRef:
    return NodeRef(
        node.name or f"<unnamed {node.op_type}{'' if index is None else f' #{index}'}>", node.op_type
    )


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _output(node: onnx.NodeProto, i: int) -> str:
    return node.output[i] if len(node.output) > i else ""


# -- rules: model level --------------------------------------------------------------------------
def rule_ir_version(ctx: _Context) -> list[Finding]:
    # onnx-tensorrt's ModelImporter only warns on a newer IR version ("ONNX model has a newer
    # ir_version ... than this parser was built against"); IR < 3 has no opset imports at all.
    ir, cap = ctx.model.ir_version, ctx.release["max_ir_version"]
    if ir < 3:
        return [
            Finding(
                "onnx-ir-version",
                ERROR,
                None,
                f"ONNX IR version {ir} predates opset imports (IR 3)",
                "re-export the model with a current exporter (graphopt compile --target tensorrt)",
            )
        ]
    if ir > cap:
        return [
            Finding(
                "onnx-ir-version",
                WARNING,
                None,
                f"ONNX IR version {ir} is newer than the {cap} the TensorRT {ctx.release['version']} parser "
                f"was built against; it parses with a warning, and features of the newer IR may fail",
                f"stamp IR version {cap} (model.ir_version = {cap}; tensorrt_check.parser_ir_version(opset, "
                f"version) gives it): graphopt's onnx backend stamps what ONNX Runtime loads",
            )
        ]
    return []


def rule_opset(ctx: _Context) -> list[Finding]:
    lo, hi = ctx.release["opset_min"], ctx.release["opset_max"]
    if ctx.opset is None:
        return [
            Finding(
                "onnx-opset",
                ERROR,
                None,
                "the model imports no default-domain (ai.onnx) opset",
                "re-export with an opset_import for the default domain",
            )
        ]
    if lo <= ctx.opset <= hi:
        return []
    newer = [r["version"] for r in ctx.data["releases"] if r["opset_min"] <= ctx.opset <= r["opset_max"]]
    fix = f"export at an opset in {lo}..{hi} (compile with target_options = {{opset = {min(max(ctx.opset, lo), hi)}}})"
    if newer and ctx.opset > hi:
        fix += f", or build with TensorRT >= {newer[0]}"
    return [
        Finding(
            "onnx-opset",
            ERROR,
            None,
            f"opset {ctx.opset} is outside the range TensorRT {ctx.release['version']} documents ({lo}..{hi})",
            fix,
        )
    ]


def rule_io_dtypes(ctx: _Context) -> list[Finding]:
    out = []
    g = ctx.model.graph
    for kind, values in (("input", g.input), ("output", g.output)):
        for vi in values:
            if vi.name in ctx.initializer_names or not vi.type.HasField("tensor_type"):
                continue
            dt = ctx.dtype(vi.name)
            if dt and dt not in IO_DTYPES:
                fix = (
                    "cast to float32 inside the model (TensorRT casts DOUBLE down, clamping to ±FLT_MAX)"
                    if dt == "DOUBLE"
                    else "give the model a numeric tensor type at its boundary"
                )
                out.append(
                    Finding(
                        "io-dtype",
                        ERROR,
                        NodeRef(vi.name, f"graph {kind}"),
                        f"graph {kind} {vi.name!r} is {dt}, which TensorRT cannot bind",
                        fix,
                    )
                )
    return out


# -- rules: operators ----------------------------------------------------------------------------
def rule_op_support(ctx: _Context) -> list[Finding]:
    table = ctx.data["operators"]
    out: list[Finding] = []
    reported_custom: set[tuple[str, str]] = set()
    for i, node in enumerate(ctx.nodes):
        if node.domain not in DEFAULT_DOMAINS:
            key = (node.domain, node.op_type)
            if key not in reported_custom:
                reported_custom.add(key)
                out.append(
                    Finding(
                        "custom-op",
                        ERROR,
                        _ref(node, i),
                        f"{node.domain}::{node.op_type} is not an ONNX operator; the TensorRT parser only takes it "
                        f"through a plugin registered under that name",
                        f"lower it to standard ONNX ops (an ONNX translation from its plugin's graphopt_register_onnx_translations hook), or "
                        f"register a TensorRT plugin named {node.op_type!r} (plugin namespace {node.domain!r})",
                    )
                )
            continue
        entry = table.get(node.op_type)
        if entry is None:
            out.append(
                Finding(
                    "op-support",
                    ERROR,
                    _ref(node, i),
                    f"{node.op_type} is not in the TensorRT operator table",
                    "rewrite it with supported operators, or provide a TensorRT plugin for it",
                )
            )
        elif not entry["supported"]:
            hint = entry.get("restrictions") or ""
            out.append(
                Finding(
                    "op-support",
                    ERROR,
                    _ref(node, i),
                    f"{node.op_type} is not supported by the TensorRT ONNX parser"
                    + (f" ({hint})" if hint else ""),
                    _UNSUPPORTED_FIX.get(
                        node.op_type,
                        "rewrite it with supported operators before lowering, or provide a TensorRT plugin",
                    ),
                )
            )
        elif "since" in entry and not ctx.at_least(entry["since"]):
            out.append(
                Finding(
                    "op-support",
                    ERROR,
                    _ref(node, i),
                    f"{node.op_type} is supported from TensorRT {entry['since']} on, not in "
                    f"{'.'.join(map(str, ctx.version))}",
                    f"build with TensorRT >= {entry['since']}"
                    + _OLDER_FIX.get(node.op_type, ", or lower without the fused operator"),
                )
            )
        else:
            for check in OP_RESTRICTIONS.get(node.op_type, ()):
                msg = check(ctx, node)
                if msg:
                    out.append(Finding("op-restriction", ERROR, _ref(node, i), msg[0], msg[1]))
    return out


_OLDER_FIX = {
    "Attention": ", or compile without fuse-attention (or with target_options = {opset = 20}) so attention stays "
    "MatMul/Softmax/MatMul",
    "RMSNormalization": ", or compile without fuse-norms so RMSNorm stays Pow/ReduceMean/Sqrt/Div",
    "RotaryEmbedding": ", or compile without fuse-rope so RoPE stays Mul/Slice/Concat",
    "TensorScatter": ", or use a dynamic KV cache (kv-cache without static=true)",
}
_UNSUPPORTED_FIX = {
    "DynamicQuantizeLinear": "use static Q/DQ with calibrated scales (the quantize pass), not dynamic quantization",
    "MatMulInteger": "express integer matmuls as DequantizeLinear → MatMul (QDQ form), which TensorRT fuses",
    "ConvInteger": "express integer convolutions as DequantizeLinear → Conv (QDQ form)",
    "QLinearMatMul": "use the QDQ form (QuantizeLinear/DequantizeLinear around MatMul) instead of QOperator form",
    "QLinearConv": "use the QDQ form (QuantizeLinear/DequantizeLinear around Conv) instead of QOperator form",
}


def _const_or_missing(ctx: _Context, name: str) -> bool:
    return not name or ctx.is_const(name)


def _attention_restrictions(ctx: _Context, node: onnx.NodeProto) -> tuple[str, str] | None:
    bad_in = [n for i, n in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")) if _input(node, i)]
    bad_out = [
        n for i, n in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")) if _output(node, i)
    ]
    bad_attr = [a for a in ("softcap", "qk_matmul_output_mode") if _attr(node, a)]
    if bad_in or bad_out or bad_attr:
        what = ", ".join(
            [f"input {n}" for n in bad_in]
            + [f"output {n}" for n in bad_out]
            + [f"attribute {n}" for n in bad_attr]
        )
        return (
            f"TensorRT's Attention does not support {what}",
            "keep the KV cache outside Attention (graphopt's kv-cache pass concatenates past and new K/V "
            "before Attention), and drop softcap/qk_matmul_output_mode",
        )
    return None


def _reduce_axes(ctx: _Context, node: onnx.NodeProto) -> tuple[str, str] | None:
    axes = _input(node, 1)
    if axes and not ctx.is_const(axes):
        return (
            f"{node.op_type} axes {axes!r} are computed at run time; TensorRT needs them as an initializer",
            "make the axes a constant (fold-constants, or onnx-graphsurgeon fold_constants())",
        )
    return None


def _topk(ctx: _Context, node: onnx.NodeProto) -> tuple[str, str] | None:
    if _attr(node, "sorted", 1) != 1:
        return "TopK with sorted=0 is unsupported by TensorRT", "use sorted=1 (the default)"
    k = _input(node, 1)
    kv = ctx.value(k) if k else None
    if kv is not None and kv.size and int(kv.max()) >= 3840:
        return f"TopK with K={int(kv.max())}; TensorRT needs K < 3840", "lower K below 3840"
    return None


def _scatter_nd(ctx: _Context, node: onnx.NodeProto) -> tuple[str, str] | None:
    red = _attr(node, "reduction", b"none")
    red = red.decode() if isinstance(red, bytes) else red
    if red != "none":
        return f"ScatterND with reduction={red!r} is unsupported by TensorRT", "use reduction='none'"
    return None


def _first_output_only(ctx: _Context, node: onnx.NodeProto) -> tuple[str, str] | None:
    extra = [o for o in node.output[1:] if o]
    if extra:
        return (
            f"{node.op_type} outputs beyond the first ({', '.join(extra)}) are unsupported by TensorRT",
            "use only the first output",
        )
    return None


def _rotary(ctx: _Context, node: onnx.NodeProto) -> tuple[str, str] | None:
    pos = _input(node, 3)
    if pos and ctx.dtype(pos) not in (None, "INT64"):
        return (
            f"RotaryEmbedding position_ids {pos!r} is {ctx.dtype(pos)}; TensorRT needs INT64",
            "cast position_ids to int64 before the node",
        )
    return None


def _dropout(ctx: _Context, node: onnx.NodeProto) -> tuple[str, str] | None:
    training = _input(node, 2)
    if training and not (ctx.value(training) is not None and not bool(ctx.value(training))):
        return (
            "Dropout's training_mode must be a constant False for TensorRT",
            "export in eval mode (model.eval()); remove-noops drops eval dropout",
        )
    return None


#: op_type -> checks of documented restrictions that the graph shows (None = fine).
OP_RESTRICTIONS: dict[str, tuple[Callable[[_Context, Any], tuple[str, str] | None], ...]] = {
    "Attention": (_attention_restrictions,),
    "RotaryEmbedding": (_rotary,),
    "TopK": (_topk,),
    "ScatterND": (_scatter_nd,),
    "LayerNormalization": (_first_output_only,),
    "MaxPool": (_first_output_only,),
    "Dropout": (_dropout,),
    **{
        op: (_reduce_axes,)
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSumSquare",
        )
    },
    # ReduceSum took axes as an input from opset 13 on, the others from 18: same rule either way.
    "ReduceSum": (_reduce_axes,),
}


# -- rules: quantization -------------------------------------------------------------------------
def _quantized_type(ctx: _Context, node: onnx.NodeProto) -> str | None:
    """The low-precision type of a Q/DQ pair: DQ's x, Q's output_dtype / zero point (ONNX default UINT8)."""
    import onnx

    if node.op_type == "DequantizeLinear":
        return ctx.dtype(node.input[0]) or (ctx.dtype(_input(node, 2)) if _input(node, 2) else None)
    od = _attr(node, "output_dtype", 0)
    if od:
        return onnx.TensorProto.DataType.Name(od)
    if _input(node, 2):
        return ctx.dtype(_input(node, 2))
    return "UINT8"  # ONNX: no zero point and no output_dtype means uint8


def rule_qdq(ctx: _Context) -> list[Finding]:
    import numpy as np

    qtypes = ctx.data["quantization"]
    out: list[Finding] = []
    for i, node in enumerate(ctx.nodes):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in DEFAULT_DOMAINS:
            continue
        ref = _ref(node, i)
        x, scale, zp = node.input[0], _input(node, 1), _input(node, 2)
        qtype = _quantized_type(ctx, node)
        # zero point: symmetric only
        if qtype == "UINT8":
            out.append(
                Finding(
                    "qdq-zero-point",
                    ERROR,
                    ref,
                    f"{'quantizes to' if node.op_type == 'QuantizeLinear' else 'dequantizes'} UINT8 "
                    f"(asymmetric); TensorRT quantization is signed and symmetric",
                    "quantize to INT8 with a zero point of 0 (int8 zero-point tensor, or output_dtype=INT8; "
                    "graphopt's quantize pass: activations=int8, its default)",
                )
            )
        elif zp:
            val = ctx.value(zp)
            if not ctx.is_const(zp):
                out.append(
                    Finding(
                        "qdq-zero-point",
                        ERROR,
                        ref,
                        f"zero point {zp!r} is not a constant",
                        "make the zero point a constant 0 initializer (symmetric quantization)",
                    )
                )
            elif val is not None and np.any(np.asarray(val, dtype=np.float64) != 0):
                out.append(
                    Finding(
                        "qdq-zero-point",
                        ERROR,
                        ref,
                        f"zero point {zp!r} is nonzero (max |zp| {np.abs(val.astype(np.float64)).max():g}); "
                        f"TensorRT supports symmetric quantization only",
                        "recalibrate symmetrically (scale = amax / 127 for int8) so the zero point is 0",
                    )
                )
        # scale: > 0 and finite
        if scale and ctx.value(scale) is not None:
            s = np.asarray(ctx.value(scale), dtype=np.float64)
            bad = ~np.isfinite(s) | (s <= 0)
            if bad.any():
                out.append(
                    Finding(
                        "qdq-scale",
                        ERROR,
                        ref,
                        f"scale {scale!r} has {int(bad.sum())} of {s.size} values that are not > 0 and "
                        f"finite (min {np.nanmin(s):g})",
                        "clamp the calibrated amax to a small positive value (e.g. 1e-8) before "
                        "computing scale = amax / qmax",
                    )
                )
            granular = s.size > 1
        elif scale:
            granular = False
            out.append(
                Finding(
                    "qdq-scale",
                    WARNING,
                    ref,
                    f"scale {scale!r} is computed at run time; its sign cannot be checked statically",
                    "make the scale a constant initializer",
                )
            )
        else:
            granular = False
        block = int(_attr(node, "block_size", 0) or 0)
        weight = ctx.is_weight(x)
        # block quantization: INT4 / FP4 / FP8 only
        if block:
            data = ctx.value(x)
            fits = ""
            if qtype == "INT8" and data is not None and data.size and -8 <= data.min() and data.max() <= 7:
                fits = f" (its values, {int(data.min())}..{int(data.max())}, are INT4 held in INT8)"
            if qtype not in qtypes["block_quantization_types"]:
                out.append(
                    Finding(
                        "qdq-block",
                        ERROR,
                        ref,
                        f"block quantization (block_size={block}) of {qtype}; TensorRT supports blocked "
                        f"scales only for {', '.join(qtypes['block_quantization_types'])}" + fits,
                        "store the weight as an INT4 initializer (onnx.TensorProto.INT4) so TensorRT "
                        "block-dequantizes it as INT4"
                        if fits
                        else "use per-channel (axis) scales for INT8, or quantize the weights to INT4/FP8",
                    )
                )
        elif granular and not weight:
            out.append(
                Finding(
                    "qdq-per-channel",
                    ERROR,
                    ref,
                    f"per-channel scales ({int(np.asarray(ctx.value(scale)).size)} values) on "
                    f"{x!r}, which is an activation; TensorRT allows per-channel scales only on weights",
                    "use one per-tensor scale for activations (calibrate a single amax)",
                )
            )
        if qtype in qtypes["weight_only_types"] and not weight:
            out.append(
                Finding(
                    "qdq-block",
                    ERROR,
                    ref,
                    f"{qtype} quantization of the activation {x!r}; TensorRT supports {qtype} for "
                    f"weights only",
                    "quantize activations to INT8 or FP8, or keep them in float",
                )
            )
    return out


# -- rules: precision flags (TensorRT 11: strongly typed only) -----------------------------------
def _requested_flags(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(flag, where) for every precision flag the build config asks for, however it is spelled."""
    removed = load_data()["removed_precision_flags"]
    names = {f.upper() for f in removed["builder_flags"]}
    trtexec = set(removed["trtexec"])
    found: list[tuple[str, str]] = []

    def norm(s: str) -> str:
        s = s.strip().upper()
        for prefix in ("TRT.BUILDERFLAG.", "BUILDERFLAG.", "BUILDERFLAG::", "K"):
            if s.startswith(prefix) and s[len(prefix) :] in names:
                s = s[len(prefix) :]
        return s

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                key = norm(str(k))
                if key in ("PRECISION", "DTYPE"):  # a requested precision, not a flag: rule_precision_flags
                    continue
                if key in names and v not in (False, None, 0, "", "false", "off"):
                    found.append((key, f"{where}.{k}" if where else str(k)))
                elif key in ("INT8_CALIBRATOR", "CALIBRATOR") and v:
                    found.append(("int8_calibrator", f"{where}.{k}" if where else str(k)))
                else:
                    walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(obj, (list, tuple)):
            for j, v in enumerate(obj):
                walk(v, f"{where}[{j}]")
        elif isinstance(obj, str):
            if norm(obj) in names:
                found.append((norm(obj), where))
            elif "trtexec" in obj or obj.startswith("--"):
                for tok in obj.replace("=", " ").split():
                    if tok in trtexec:
                        found.append((tok, where))

    walk(cfg, "")
    return found


def _graph_float_types(ctx: _Context) -> set[str]:
    types = {ctx.dtype(n) for n in ctx.elem_types}
    for node in ctx.nodes:
        if node.op_type == "Cast":
            import onnx

            to = _attr(node, "to")
            if to:
                types.add(onnx.TensorProto.DataType.Name(to))
    return {t for t in types if t}


def _flag_fix(flag: str) -> str:
    f = flag.upper().lstrip("-")
    if f in ("FP16", "BF16", "BEST"):
        dt = "bf16" if f == "BF16" else "fp16"
        return (
            f"remove the flag and put the precision in the graph: compile with the precision(dtype={dt}) pass "
            f"(casts with fp32 islands), which a strongly typed network builds as written"
        )
    if f in ("INT8", "FP8", "INT4", "FP4", "INT8_CALIBRATOR", "CALIB"):
        return (
            "remove the flag (and any calibrator): quantize in the graph with Q/DQ nodes (the quantize pass "
            "calibrates and inserts them), which a strongly typed network builds as written"
        )
    return "remove the flag: strongly typed networks always obey the graph's types"


def rule_precision_flags(ctx: _Context) -> list[Finding]:
    cfg = ctx.build_config
    if not cfg:
        return []
    removed_since = ctx.data["removed_precision_flags"]["since"]
    strongly_typed_only = bool(ctx.release.get("strongly_typed_only"))
    types = _graph_float_types(ctx)
    has_low = bool(types & LOW_PRECISION_FLOATS)
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in ctx.nodes)
    graph_desc = (
        "the graph is float32 everywhere (no float16/bfloat16 tensors, no Q/DQ), so the engine would run "
        "in fp32"
        if not (has_low or has_qdq)
        else "the graph already carries its precision"
    )
    out: list[Finding] = []
    for flag, where in _requested_flags(cfg):
        fix = _flag_fix(flag)
        msg = (
            f"the build config asks for precision flag {flag} (at {where}); TensorRT {removed_since} removed it "
            f"(strongly typed networks only); {graph_desc}"
        )
        if strongly_typed_only:
            out.append(Finding("precision-flags", ERROR, None, msg, fix))
        elif cfg.get("strongly_typed", True):
            out.append(
                Finding(
                    "precision-flags",
                    ERROR if not (has_low or has_qdq) else WARNING,
                    None,
                    f"the build config asks for precision flag {flag} (at {where}) on a strongly typed "
                    f"network, where TensorRT takes precision from the graph; the flag is removed in "
                    f"TensorRT {removed_since}; {graph_desc}",
                    fix,
                )
            )
        else:
            out.append(
                Finding(
                    "precision-flags",
                    WARNING,
                    None,
                    f"the build relies on precision flag {flag} (at {where}), deprecated in TensorRT 10 and "
                    f"removed in {removed_since}",
                    fix,
                )
            )
    graph = cfg.get("graph") if isinstance(cfg.get("graph"), Mapping) else {}  # graphopt's build.json
    wanted = str(cfg.get("precision") or cfg.get("dtype") or graph.get("precision") or "").lower()
    if wanted in ("fp16", "float16", "half", "bf16", "bfloat16") and not (has_low or has_qdq):
        out.append(
            Finding(
                "precision-flags",
                ERROR,
                None,
                f"the build config asks for {wanted} precision but the graph is float32 everywhere; a "
                f"strongly typed build (the only kind in TensorRT {removed_since}) would run it in fp32",
                f"run the precision(dtype={'bf16' if 'b' in wanted else 'fp16'}) pass in the pipeline "
                f"so the ONNX carries the casts",
            )
        )
    return out


# -- rules: optimization profiles ----------------------------------------------------------------
def _is_shape_triple(v: Any) -> bool:
    if isinstance(v, Mapping):
        return set(v) >= {"min", "opt", "max"}
    return isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(s, (list, tuple)) for s in v)


def _normalize_profiles(profiles: Any) -> list[tuple[str, dict[str, tuple[list, list, list]]]]:
    """Every accepted form → [(profile name, {input: (min, opt, max)})]."""
    if isinstance(profiles, Mapping) and profiles and all(_is_shape_triple(v) for v in profiles.values()):
        named = [("profile 0", profiles)]
    elif isinstance(profiles, Mapping):
        named = [(str(k), v) for k, v in profiles.items()]
    elif isinstance(profiles, (list, tuple)):
        named = [(f"profile {i}", p) for i, p in enumerate(profiles)]
    else:
        raise InputError(f"profiles must be a dict or a list of dicts, not {type(profiles).__name__}")
    out = []
    for pname, prof in named:
        if isinstance(prof, Mapping) and "shapes" in prof and isinstance(prof["shapes"], Mapping):
            prof = prof["shapes"]
        if not isinstance(prof, Mapping):
            raise InputError(f"optimization profile {pname!r} must map input names to min/opt/max shapes")
        shapes = {}
        for inp, triple in prof.items():
            if not _is_shape_triple(triple):
                raise InputError(
                    f"profile {pname!r}, input {inp!r}: give {{'min': [...], 'opt': [...], 'max': [...]}} "
                    f"or a (min, opt, max) tuple of shapes, not {triple!r}"
                )
            mn, op, mx = (
                (triple["min"], triple["opt"], triple["max"]) if isinstance(triple, Mapping) else triple
            )
            try:
                shapes[str(inp)] = ([int(d) for d in mn], [int(d) for d in op], [int(d) for d in mx])
            except (TypeError, ValueError):
                raise InputError(
                    f"profile {pname!r}, input {inp!r}: shapes must be lists of integers"
                ) from None
        out.append((pname, shapes))
    return out


def _check_profiles(
    ctx: _Context, profiles: list[tuple[str, dict[str, tuple[list, list, list]]]]
) -> list[Finding]:
    g = ctx.model.graph
    inputs = {vi.name: vi for vi in g.input if vi.name not in ctx.initializer_names}
    dims: dict[str, list[int | None]] = {}
    for name, vi in inputs.items():
        shape = vi.type.tensor_type.shape if vi.type.HasField("tensor_type") else None
        dims[name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim] if shape else []
    dynamic = [n for n, ds in dims.items() if any(d is None for d in ds)]
    out: list[Finding] = []
    for pname, shapes in profiles:
        for inp, (mn, op, mx) in shapes.items():
            ref = NodeRef(inp, "graph input")
            if inp not in inputs:
                out.append(
                    Finding(
                        "profile-input",
                        ERROR,
                        ref,
                        f"{pname} gives shapes for {inp!r}, which is not an input of the model "
                        f"(inputs: {', '.join(inputs) or 'none'})",
                        "name the model's inputs in the profile",
                    )
                )
                continue
            rank = len(dims[inp])
            bad_rank = [k for k, s in (("min", mn), ("opt", op), ("max", mx)) if len(s) != rank]
            if bad_rank:
                out.append(
                    Finding(
                        "profile-rank",
                        ERROR,
                        ref,
                        f"{pname}: {'/'.join(bad_rank)} shape of {inp!r} has rank "
                        f"{len({'min': mn, 'opt': op, 'max': mx}[bad_rank[0]])}, the input has rank {rank} "
                        f"({_fmt_dims(dims[inp])})",
                        f"give {rank} dims for every one of min/opt/max",
                    )
                )
                continue
            for axis in range(rank):
                a, b, c = mn[axis], op[axis], mx[axis]
                if not 0 <= a <= b <= c:
                    out.append(
                        Finding(
                            "profile-order",
                            ERROR,
                            ref,
                            f"{pname}: dim {axis} of {inp!r} has min {a}, opt {b}, max {c}; TensorRT needs "
                            f"0 <= min <= opt <= max",
                            "order the shapes so min <= opt <= max in every dim",
                        )
                    )
                elif dims[inp][axis] is not None and not a == b == c == dims[inp][axis]:
                    out.append(
                        Finding(
                            "profile-order",
                            ERROR,
                            ref,
                            f"{pname}: dim {axis} of {inp!r} is static ({dims[inp][axis]}) in the model but "
                            f"the profile gives {a}/{b}/{c}",
                            f"use {dims[inp][axis]} for min, opt and max, or export that dim as dynamic",
                        )
                    )
        for inp in dynamic:
            if inp not in shapes:
                out.append(
                    Finding(
                        "profile-input",
                        ERROR,
                        NodeRef(inp, "graph input"),
                        f"{pname} has no shapes for the dynamic input {inp!r} ({_fmt_dims(dims[inp])}); "
                        f"TensorRT needs every dynamic input in every profile",
                        f"add min/opt/max shapes for {inp!r} to {pname}",
                    )
                )
    return out


def _fmt_dims(ds: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in ds) + "]"


#: The model-level and per-node rules, in report order (profiles run when profiles are given).
RULES: list[Callable[[_Context], list[Finding]]] = [
    rule_ir_version,
    rule_opset,
    rule_io_dtypes,
    rule_op_support,
    rule_qdq,
    rule_precision_flags,
]

__all__ = [
    "CheckReport",
    "Finding",
    "NodeRef",
    "TensorRTCheckError",
    "check_onnx",
    "known_releases",
    "latest_version",
    "load_data",
    "parse_version",
    "parser_ir_version",
]
