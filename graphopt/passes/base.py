"""The Pass contract: what every pass, built-in or third-party, declares and returns.

A pass is a small class::

    class DropIdentity(graphopt.Pass):
        \"\"\"Remove aten.alias / no-op casts.\"\"\"      # first line: shown by `graphopt passes`
        name = "drop-identity"                         # kebab-case, used in pipeline text
        verification = graphopt.verify.exact()         # how it is checked against the original

        @dataclasses.dataclass
        class Options:                                 # parsed from `drop-identity(k=3)`
            k: int = 3

        def run(self, ir, ctx) -> graphopt.PassResult: ...

``requires`` / ``ensures`` are structural checks run before / after the pass; ``runs_after`` /
``runs_before`` order passes by name; ``fixpoint = True`` reruns the pass until it stops changing
the graph.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from graphopt.errors import PassOptionError

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR
    from graphopt.report import Report
    from graphopt.verify.policies import Policy

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) IR, whether it changed anything, and counters for
    the report (``{"attention_fused": 12}``)."""

    ir: GraphIR
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def after_rewrites(cls, ir: GraphIR, stats: dict[str, Any], changed: bool | None = None) -> PassResult:
        """The result of a pass that rewrote ``ir.graph`` in place: the graph recompiled when
        anything changed (``changed``, by default: any positive count in ``stats``), the counts as
        the report's stats."""
        if changed is None:
            changed = any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in stats.values())
        if changed:
            ir.recompile()
        return cls(ir, bool(changed), dict(stats))


@dataclass
class NoOptions:
    """A pass without options."""


@dataclass
class PassContext:
    """State shared by one pipeline run, handed to every pass and instrument.

    For passes: ``original`` (the captured graph, read-only), ``pipeline_text``, ``verify``,
    ``verification_inputs``, ``data`` (a dict passes may use to hand results to later passes,
    e.g. calibration scales), and :meth:`should_rewrite`, called before each individual rewrite so
    ``graphopt bisect`` can find the exact rewrite that broke a model; what was rewritten is then
    in ``pass_rewrites``. The other fields are the pass manager's and its instruments' (the
    position in the pipeline, limits, the verifier, the report): passes leave them alone.
    """

    original: GraphIR | None = None
    pipeline_text: str = ""
    passes: list[Pass] = field(default_factory=list)
    index: int = 0
    verify: bool = True
    verification_inputs: list[list[Any]] = field(default_factory=list)
    verifier: Any = None
    dump_ir: str | None = None
    pass_limit: int | None = None
    rewrite_limit: int | None = None
    rewrites: int = 0
    repro_dir: str | None = None
    report: Report | None = None
    progress: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    #: what :meth:`should_rewrite` allowed in the current pass, in order (the report and
    #: bisection name the rewrite that broke a model); the manager empties it before each pass
    pass_rewrites: list[str] = field(default_factory=list)

    @property
    def current(self) -> Pass | None:
        return self.passes[self.index] if 0 <= self.index < len(self.passes) else None

    @property
    def passes_before(self) -> list[str]:
        return [p.name for p in self.passes[: self.index]]

    def should_rewrite(self, what: str = "") -> bool:
        """Ask before each rewrite. False once the bisect rewrite limit is reached (the pass must
        then leave the match alone). Counts rewrites for the report."""
        if self.rewrite_limit is not None and self.rewrites >= self.rewrite_limit:
            log.debug("rewrite limit %d reached; skipping %s", self.rewrite_limit, what)
            return False
        self.rewrites += 1
        self.pass_rewrites.append(what)
        return True


class Pass:
    """Base class of every optimization pass. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    verification: ClassVar[Policy | None] = None  # None → graphopt.verify.allclose()
    runs_after: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    fixpoint: ClassVar[bool] = False
    max_iterations: ClassVar[int] = 8
    #: passes this one needs earlier in the pipeline (any one of them); when none is there,
    #: the pipeline resolver inserts the first right before this pass and says so in the report
    #: (kv-cache: ``("fuse-attention",)``, which makes attention canonical)
    requires_passes: ClassVar[tuple[str, ...]] = ()
    #: at most this fraction of the model's weight bytes the pass adds in new tensors (the
    #: compile's up-front memory estimate, graphopt.memory.estimate_compile_memory)
    weight_memory: ClassVar[float] = 0.0
    #: the only targets this pass's result can be lowered to (empty: any); ``compile`` refuses another
    #: target before capture (tensor-parallel: ``("torch",)``, whose programs carry collectives)
    targets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def from_options(cls, raw: dict[str, Any]) -> Pass:
        return cls(parse_options(cls, raw))

    def capture_requirements(self, inputs: dict[str, Any], declared: dict[str, dict[int, tuple[int, int]]],
                             module: Any = None) -> dict[str, dict[int, tuple[int, int]]]:
        """Dynamic dims this pass needs from capture, ``{input: {dim: (min, max)}}``, given the
        example inputs by name, the ranges the user ``declared`` and the module (for its config).

        ``compile`` adds them where the user declared nothing (declared ranges win; a declared
        range the pass cannot work with is an :class:`~graphopt.errors.InputError`) and widens
        example dims of size 1, which torch.export would otherwise make static. Default: none."""
        return {}

    def requires(self, ir: GraphIR) -> None:
        """Raise :class:`graphopt.PassError` if ``ir`` is not something this pass can run on."""

    def ensures(self, ir: GraphIR) -> None:
        """Raise :class:`graphopt.PassError` if the result breaks a promise of this pass."""

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} ({type(self).__name__}) does not implement run()")

    def spec(self) -> str:
        """Pipeline text that recreates this pass with its options, e.g. ``prune(amount=0.5)``."""
        if not dataclasses.is_dataclass(self.options):
            return self.name
        defaults = self.Options()
        changed = [(f.name, getattr(self.options, f.name)) for f in dataclasses.fields(self.options)
                   if getattr(self.options, f.name) != getattr(defaults, f.name)]
        if not changed:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_format_value(v)}" for k, v in changed) + ")"

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def option_fields(pass_cls: type[Pass]) -> list[dataclasses.Field]:
    opts = pass_cls.Options
    return list(dataclasses.fields(opts)) if dataclasses.is_dataclass(opts) else []


def describe_options(pass_cls: type[Pass]) -> list[str]:
    """``["k: int = 3", ...]`` for ``graphopt passes``. An option whose type hint does not resolve
    is listed with its annotation as written and ``(unresolved type)``; parsing it raises."""
    out = []
    try:
        hints = _hints(pass_cls)
    except PassOptionError:
        hints = {f.name: f"{f.type} (unresolved type)" for f in option_fields(pass_cls)}
    for f in option_fields(pass_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        out.append(f"{f.name}: {_type_name(hints.get(f.name, f.type))} = {default!r}")
    return out


def _hints(pass_cls: type[Pass]) -> dict[str, Any]:
    """The resolved type of every option. Annotations are strings under ``from __future__ import
    annotations`` and resolve in the Options' module. One that does not (a name imported only under
    ``TYPE_CHECKING``, a class local to a function) raises: converting values with an unknown type
    would hand the pass raw strings."""
    opts = pass_cls.Options
    if not dataclasses.is_dataclass(opts):
        return {}
    try:
        return typing.get_type_hints(opts)
    except Exception:  # NameError, AttributeError, SyntaxError, TypeError: found and named below
        pass
    for f in dataclasses.fields(opts):  # find the option at fault and say why
        try:
            typing.get_type_hints(type("_One", (), {"__annotations__": {f.name: f.type},
                                                    "__module__": opts.__module__}))
        except Exception as e:
            raise PassOptionError(
                f"pass {pass_cls.name!r}: the type of option {f.name!r} ({f.type!r}) cannot be resolved "
                f"({type(e).__name__}: {e}); import that type at module level in {opts.__module__} "
                "(not only under TYPE_CHECKING) or write a builtin type (int, float, str, bool, Literal[...])"
            ) from None
    raise PassOptionError(f"pass {pass_cls.name!r}: the type hints of its Options cannot be resolved")


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def parse_options(pass_cls: type[Pass], raw: dict[str, Any]) -> Any:
    """Build ``pass_cls.Options`` from pipeline-text strings (or TOML values), converting each
    value to the field's declared type. Unknown names and bad values raise PassOptionError."""
    fields = {f.name: f for f in option_fields(pass_cls)}
    hints = _hints(pass_cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        valid = ", ".join(describe_options(pass_cls)) or "none"
        raise PassOptionError(f"pass {pass_cls.name!r} has no option {unknown[0]!r}; valid options: {valid}")
    values = {}
    for k, v in raw.items():
        values[k] = _convert(pass_cls.name, k, v, hints.get(k, fields[k].type))
    try:
        return pass_cls.Options(**values)
    except TypeError as e:
        raise PassOptionError(f"pass {pass_cls.name!r}: {e}") from e
    except ValueError as e:  # __post_init__ validation
        raise PassOptionError(f"pass {pass_cls.name!r}: {e}") from e


def _convert(pass_name: str, key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for a in non_none:
            try:
                return _convert(pass_name, key, value, a)
            except PassOptionError:
                continue
        raise PassOptionError(f"pass {pass_name!r}: option {key}={value!r} is not a {_type_name(typ)}")
    if origin is typing.Literal:
        for a in args:
            if str(a) == str(value):
                return a
        raise PassOptionError(f"pass {pass_name!r}: option {key}={value!r} must be one of "
                              + ", ".join(str(a) for a in args))
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [x for x in str(value).split("|") if x]
        inner = args[0] if args else str
        conv = [_convert(pass_name, key, x, inner) for x in items]
        return conv if origin is list else tuple(conv)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if typ is Any:
            return value
        if isinstance(typ, type):  # Path, an Enum, a class taking the text: convert, never hand over the string
            return value if isinstance(value, typ) else typ(value)
    except (TypeError, ValueError):
        raise PassOptionError(f"pass {pass_name!r}: option {key}={value!r} is not a {_type_name(typ)}") from None
    if origin is not None and isinstance(value, origin):  # dict[...] given as a TOML table
        return value
    raise PassOptionError(f"pass {pass_name!r}: option {key} is declared as {_type_name(typ)}, which pipeline text "
                          "cannot give; declare it as int, float, str, bool, Literal[...], list[...] or a class "
                          "built from a string")
