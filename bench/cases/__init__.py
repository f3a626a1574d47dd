"""The benchmark cases, by name. Each module defines ``CASE``: its name, what it measures, its
parameters (a dataclass: the defaults are the full settings, ``quick`` the ``--quick`` overrides)
and ``run(ctx, params) -> CaseResult``. Add a case: write a module here and list it below.

Parameters are set from the command line with ``--set CASE.KEY=VALUE`` (e.g.
``--set minilm.batch=1 --set minilm.seq_len=16``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    name: str
    title: str
    measures: str  # one line for --list and the README
    params: type  # a dataclass; its defaults are the full settings
    run: Callable[..., Any]
    quick: dict[str, Any] = field(default_factory=dict)

    def make_params(self, quick: bool, overrides: dict[str, str]) -> Any:
        """The case's parameters: defaults, then ``--quick`` values, then ``--set`` overrides.

        Raises:
            ValueError: an unknown key or a value of the wrong type (the message lists the keys).
        """
        p = self.params(**(self.quick if quick else {}))
        hints = typing.get_type_hints(self.params)
        names = [f.name for f in dataclasses.fields(self.params)]
        for key, raw in overrides.items():
            if key not in names:
                raise ValueError(f"case {self.name!r} has no parameter {key!r}; its parameters: {', '.join(names)}")
            setattr(p, key, _convert(hints[key], raw, f"{self.name}.{key}"))
        return p


def _convert(kind: Any, raw: str, where: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise ValueError(f"--set {where}={raw}: expected {kind.__name__}") from None
    return raw


def all_cases() -> dict[str, Case]:
    from bench.cases import (
        compile_time,
        decode,
        minilm,
        parallel,
        prefill,
        prune,
        quant,
        scale,
        serve,
        speculative,
    )

    return {c.name: c for c in (minilm.CASE, prefill.CASE, decode.CASE, compile_time.CASE, prune.CASE, quant.CASE,
                                scale.CASE, serve.CASE, speculative.CASE, parallel.CASE)}
