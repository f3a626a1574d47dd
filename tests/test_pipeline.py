"""Pipeline text / TOML parsing, option conversion, aliases and ordering constraints."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

import graphopt
from graphopt.errors import PassOptionError, PipelineError, UnknownPassError
from graphopt.passes.pipeline import load_config, order_passes, parse_pipeline, resolve
from graphopt.passes.registry import PassRegistry


class _Base(graphopt.Pass):
    def run(self, ir, ctx):
        return graphopt.PassResult(ir, False)


class MyPass(_Base):
    """A pass with options."""

    name = "my-pass"

    @dataclasses.dataclass
    class Options:
        k: int = 3
        scale: float = 1.0
        mode: Literal["fast", "slow"] = "fast"
        enabled: bool = True
        tag: str | None = None


class First(_Base):
    name = "first"


class Second(_Base):
    name = "second"
    runs_after = ("first",)


class Loop(_Base):
    name = "loop"
    runs_before = ("first",)
    runs_after = ("second",)


@pytest.fixture
def registry():
    r = PassRegistry()
    for cls in (MyPass, First, Second, Loop):
        r.add(cls, "test")
    r.add_alias("both", "first,second", "test")
    return r


def test_parse_text_with_options():
    specs = parse_pipeline("cleanup, my-pass(k=5, mode=slow) ,quantize(scheme=int8,calib=samples/calib.txt)")
    assert [s.name for s in specs] == ["cleanup", "my-pass", "quantize"]
    assert specs[1].options == {"k": "5", "mode": "slow"}
    assert specs[2].options == {"scheme": "int8", "calib": "samples/calib.txt"}


@pytest.mark.parametrize("text, fragment", [
    ("my-pass(k=3", "unclosed"),
    ("my-pass(k)", "key=value"),
    ("my-pass(k=1,k=2)", "twice"),
    ("a b", "expected ','"),
    ("my-pass!(", "expected ','"),
])
def test_parse_errors_point_at_the_problem(text, fragment):
    with pytest.raises(PipelineError, match=fragment):
        parse_pipeline(text)


def test_options_are_converted_to_declared_types(registry):
    (p,) = resolve("my-pass(k=7,scale=0.5,mode=slow,enabled=false,tag=none)", registry)
    assert p.options == MyPass.Options(k=7, scale=0.5, mode="slow", enabled=False, tag=None)
    assert p.spec() == "my-pass(k=7,scale=0.5,mode=slow,enabled=false)"


@pytest.mark.parametrize("text, fragment", [
    ("my-pass(k=abc)", "k='abc' is not a int"),
    ("my-pass(mode=medium)", "must be one of fast, slow"),
    ("my-pass(nope=1)", "has no option 'nope'; valid options: k: int = 3"),
    ("my-pass(enabled=maybe)", "is not a bool"),
])
def test_bad_options_name_the_valid_ones(registry, text, fragment):
    with pytest.raises(PassOptionError, match=fragment):
        resolve(text, registry)


def test_unknown_pass_lists_valid_names(registry):
    with pytest.raises(UnknownPassError) as e:
        resolve("first,my-pas", registry)
    assert "valid names: both, first, loop, my-pass, second" in str(e.value)
    assert "did you mean 'my-pass'" in str(e.value)
    assert isinstance(e.value, KeyError)


def test_alias_expands(registry):
    assert [p.name for p in resolve("both,my-pass", registry)] == ["first", "second", "my-pass"]
    with pytest.raises(PassOptionError, match="alias"):
        resolve("both(k=1)", registry)


def test_ordering_constraints_reorder_stably(registry):
    # second runs after first: written the other way round, the manager fixes the order
    assert [p.name for p in resolve("my-pass,second,first", registry)] == ["my-pass", "first", "second"]
    # unconstrained passes keep the written order
    assert [p.name for p in resolve("first,my-pass,second", registry)] == ["first", "my-pass", "second"]


def test_ordering_cycle_is_named(registry):
    with pytest.raises(PipelineError, match="cycle") as e:
        resolve("first,second,loop", registry)
    msg = str(e.value)
    assert "loop runs before first" in msg and "second runs after first" in msg


def test_order_passes_with_duplicates():
    passes = [Second(), First(), Second()]
    assert [p.name for p in order_passes(passes)] == ["first", "second", "second"]


def test_toml_config(tmp_path, registry):
    cfg = tmp_path / "build.toml"
    cfg.write_text("""
model = "models/m.py:build"
target = "torch"
out = "build/x"

[[passes]]
name = "first"

[[passes]]
name = "my-pass"
k = 4
enabled = false

[dynamic.input_ids]
1 = [1, 512]
""")
    c = load_config(cfg)
    assert c.pipeline == "first,my-pass(k=4,enabled=false)"
    assert c.target == "torch"
    assert c.out == str(tmp_path / "build/x")
    assert c.model == f"{tmp_path / 'models/m.py'}:build"
    assert c.dynamic == {"input_ids": {1: (1, 512)}}
    assert [p.spec() for p in resolve(c.pipeline, registry)] == ["first", "my-pass(k=4,enabled=false)"]


@pytest.mark.parametrize("body, fragment", [
    ("pipeline = 'a'\nbogus = 1", "unknown key"),
    ("pipeline = 'a'\n[[passes]]\nname='b'", "not both"),
    ("[dynamic]\nx = 3", "dynamic.x must map dims"),
    ("pipeline = [", "not valid TOML"),
])
def test_bad_toml_config(tmp_path, body, fragment):
    cfg = tmp_path / "build.toml"
    cfg.write_text(body)
    with pytest.raises(PipelineError, match=fragment):
        load_config(cfg)


def test_registry_rejects_bad_passes():
    r = PassRegistry()

    class NoName(_Base):
        name = "Bad_Name"

    class NoRun(graphopt.Pass):
        name = "no-run"

    with pytest.raises(graphopt.PluginError, match="kebab-case"):
        r.add(NoName, "p")
    with pytest.raises(graphopt.PluginError, match="does not implement run"):
        r.add(NoRun, "p")
    r.add(First, "p1")

    class Other(_Base):
        name = "first"

    with pytest.raises(graphopt.PluginError, match="already registered by plugin 'p1'"):
        r.add(Other, "p2")
