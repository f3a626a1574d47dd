"""Pipelines: text (``cleanup,my-pass(k=3)``) or a TOML build config → ordered Pass instances.

Grammar of the text form::

    pipeline := item ("," item)*
    item     := name [ "(" key "=" value ("," key "=" value)* ")" ]

Values are converted to each option's declared type (int, float, bool, str, Literal, list with
``|`` separators). Aliases (``cleanup``) expand to their pipelines. Passes are then ordered by their
declared ``runs_after`` / ``runs_before`` constraints, keeping the written order wherever the
constraints allow; a cycle is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import tomllib

from graphopt.errors import PassOptionError, PipelineError
from graphopt.passes.base import Pass
from graphopt.passes.registry import PassRegistry


@dataclass
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.options.items()) + ")"


def parse_pipeline(text: str) -> list[PassSpec]:
    """Split pipeline text into specs (no registry lookup yet)."""
    specs: list[PassSpec] = []
    i, n = 0, len(text)

    def error(msg: str) -> PipelineError:
        return PipelineError(f"pipeline {text!r}: {msg} at column {i + 1}\n  {text}\n  {' ' * i}^")

    while i < n:
        while i < n and text[i] in " \t\n,":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and (text[i].isalnum() or text[i] in "-_"):
            i += 1
        name = text[start:i]
        if not name:
            raise error(f"expected a pass name, found {text[i]!r}")
        while i < n and text[i] in " \t":
            i += 1
        options: dict[str, Any] = {}
        if i < n and text[i] == "(":
            i += 1
            depth_start = i
            depth = 1
            while i < n and depth:
                if text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                i += 1
            if depth:
                i = depth_start - 1
                raise error(f"unclosed '(' after {name!r}")
            body = text[depth_start: i - 1]
            for part in _split_top(body):
                if not part.strip():
                    continue
                if "=" not in part:
                    raise PipelineError(f"pipeline {text!r}: option {part.strip()!r} of pass {name!r} must be key=value")
                k, v = part.split("=", 1)
                k, v = k.strip(), v.strip()
                if not k:
                    raise PipelineError(f"pipeline {text!r}: empty option name in pass {name!r}")
                if k in options:
                    raise PipelineError(f"pipeline {text!r}: option {k!r} given twice to pass {name!r}")
                options[k] = v.strip("'\"")
        while i < n and text[i] in " \t\n":
            i += 1
        if i < n and text[i] != ",":
            raise error(f"expected ',' or '(' after {name!r}")
        specs.append(PassSpec(name, options))
    return specs


def _split_top(body: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def pipeline_text(specs: list[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)


def expand_aliases(specs: list[PassSpec], registry: PassRegistry, _seen: tuple[str, ...] = ()) -> list[PassSpec]:
    out: list[PassSpec] = []
    for s in specs:
        if s.name in registry.aliases:
            if s.options:
                raise PassOptionError(f"{s.name!r} is a pipeline alias for {registry.aliases[s.name][0]!r} "
                                      "and takes no options; spell its passes out to set options")
            if s.name in _seen:
                raise PipelineError(f"pipeline alias cycle: {' -> '.join(_seen + (s.name,))}")
            out.extend(expand_aliases(parse_pipeline(registry.aliases[s.name][0]), registry, _seen + (s.name,)))
        else:
            out.append(s)
    return out


def resolve(specs: list[PassSpec] | str, registry: PassRegistry) -> list[Pass]:
    """Specs (or text) → ordered Pass instances; unknown names/options raise with valid names."""
    if isinstance(specs, str):
        specs = parse_pipeline(specs)
    passes = [registry.get(s.name).cls.from_options(s.options) for s in expand_aliases(specs, registry)]
    return order_passes(insert_required_passes(passes, registry))


def insert_required_passes(passes: list[Pass], registry: PassRegistry) -> list[Pass]:
    """Put each pass's ``requires_passes`` in front of it when none of them runs earlier:
    ``cleanup,kv-cache`` becomes ``cleanup,fuse-attention,kv-cache``. Inserted passes carry
    ``inserted_for`` (the pass that needed them) so the report and the CLI can say so."""
    out: list[Pass] = []
    for p in passes:
        need = tuple(getattr(p, "requires_passes", ()) or ())
        if need and not any(q.name in need for q in out):
            if need[0] not in registry.passes:
                raise PipelineError(f"pass {p.name!r} needs one of {list(need)} before it, and no plugin "
                                    f"registers {need[0]!r}; install it or put one of them in the pipeline")
            extra = registry.get(need[0]).cls.from_options({})
            extra.inserted_for = p.name
            out.append(extra)
        out.append(p)
    return out


def order_passes(passes: list[Pass]) -> list[Pass]:
    """Stable topological order honouring ``runs_after`` / ``runs_before`` between passes present.

    ``A.runs_after = ("b",)``: every A comes after the first b. ``A.runs_before = ("b",)``: every A
    comes before the last b.
    """
    g = nx.DiGraph()
    g.add_nodes_from(range(len(passes)))
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, p in enumerate(passes):
        first.setdefault(p.name, i)
        last[p.name] = i
    for i, p in enumerate(passes):
        for dep in p.runs_after:
            if dep in first and first[dep] != i:
                g.add_edge(first[dep], i, why=f"{p.name} runs after {dep}")
        for dep in p.runs_before:
            if dep in last and last[dep] != i:
                g.add_edge(i, last[dep], why=f"{p.name} runs before {dep}")
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda i: i))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        chain = " ; ".join(g.edges[u, v]["why"] for u, v in cycle)
        names = " -> ".join([passes[u].name for u, _ in cycle] + [passes[cycle[0][0]].name])
        raise PipelineError(f"pass ordering constraints form a cycle: {names} ({chain}); "
                            "remove one of the passes or fix its runs_after/runs_before") from None
    return [passes[i] for i in order]


@dataclass
class BuildConfig:
    """A build.toml: everything `graphopt compile` takes, checked in next to the model."""

    pipeline: str = "cleanup"
    target: str | None = None
    out: str | None = None
    model: str | None = None
    dynamic: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    verify: bool = True
    inputs: str | None = None
    target_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    path: str | None = None


_CONFIG_KEYS = {"pipeline", "passes", "target", "out", "model", "dynamic", "verify", "inputs", "target_options",
                "tokenizer"}


def load_config(path: str | Path) -> BuildConfig:
    """Read a build.toml. Relative paths inside it are relative to the file."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"build config {str(p)!r} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"build config {str(p)!r} is not valid TOML: {e}") from None
    data = data.get("build", data)
    unknown = set(data) - _CONFIG_KEYS
    if unknown:
        raise PipelineError(f"build config {str(p)!r}: unknown key(s) {sorted(unknown)}; "
                            f"valid keys: {sorted(_CONFIG_KEYS)}")
    cfg = BuildConfig(path=str(p))
    if "pipeline" in data and "passes" in data:
        raise PipelineError(f"build config {str(p)!r}: give either 'pipeline' or [[passes]], not both")
    if "pipeline" in data:
        pl = data["pipeline"]
        cfg.pipeline = pl if isinstance(pl, str) else ",".join(str(x) for x in pl)
    elif "passes" in data:
        parts = []
        for entry in data["passes"]:
            entry = dict(entry)
            name = entry.pop("name", None) or entry.pop("pass", None)
            if not name:
                raise PipelineError(f"build config {str(p)!r}: every [[passes]] entry needs name = \"...\"")
            parts.append(str(PassSpec(name, {k: _toml_value(v) for k, v in entry.items()})))
        cfg.pipeline = ",".join(parts)
    base = p.parent
    cfg.target = data.get("target")
    cfg.out = str(base / data["out"]) if data.get("out") else None
    cfg.inputs = str(base / data["inputs"]) if data.get("inputs") else None
    cfg.tokenizer = str(base / data["tokenizer"]) if data.get("tokenizer") else None
    if data.get("model"):
        m = str(data["model"])
        file, _, factory = m.rpartition(":")
        cfg.model = f"{base / file}:{factory}" if file else m
    cfg.verify = bool(data.get("verify", True))
    cfg.target_options = dict(data.get("target_options", {}))
    for name, dims in data.get("dynamic", {}).items():
        try:
            cfg.dynamic[name] = {int(d): (int(r[0]), int(r[1])) for d, r in dims.items()}
        except (TypeError, ValueError, IndexError, AttributeError):
            raise PipelineError(f"build config {str(p)!r}: dynamic.{name} must map dims to [min, max], "
                                f"e.g. dynamic.{name} = {{1 = [1, 512]}}") from None
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "|".join(str(x) for x in v)
    return str(v)
