"""Plugin discovery, isolation of broken plugins, blocking and strict mode."""

from __future__ import annotations

import types

import pytest

import graphopt
from graphopt.plugins import PluginManager


class Noop(graphopt.Pass):
    """Does nothing (test pass)."""

    name = "test-noop"

    def run(self, ir, ctx):
        return graphopt.PassResult(ir, False)


def _plugin(name: str, register) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.graphopt_register_passes = graphopt.hookimpl(register)
    return mod


def test_builtin_plugins_come_from_entry_points():
    pm = PluginManager().load_all()
    assert {"graphopt-backends", "graphopt-instruments", "graphopt-cleanup"} <= set(pm.plugins)
    for name in ("graphopt-backends", "graphopt-instruments", "graphopt-cleanup"):
        assert pm.plugins[name].status == "ok", pm.plugins[name].error
        assert pm.plugins[name].source.startswith("entry point")
    assert {"onnx", "torch"} <= set(pm.backends)
    assert "cleanup" in pm.passes.aliases


def test_register_and_unregister_a_plugin_in_a_test():
    pm = PluginManager().load_all()

    def register(register):
        register(Noop)

    info = pm.register_plugin(_plugin("noop_plugin", register), name="noop-plugin")
    assert info.status == "ok" and info.passes == ["test-noop"]
    assert pm.passes.get("test-noop").plugin == "noop-plugin"
    pm.unregister_plugin("noop-plugin")
    with pytest.raises(graphopt.UnknownPassError):
        pm.passes.get("test-noop")


def test_a_plugin_that_fails_to_register_is_skipped_and_shown():
    pm = PluginManager().load_all()

    def register(register):
        register(Noop)
        raise RuntimeError("boom while registering")

    info = pm.register_plugin(_plugin("bad", register), name="bad-plugin")
    assert info.status == "failed" and "boom while registering" in info.error
    # nothing it registered before failing survives
    with pytest.raises(graphopt.UnknownPassError):
        pm.passes.get("test-noop")
    assert "cleanup" in pm.passes.aliases  # the others are untouched


def test_a_plugin_that_fails_to_import_is_skipped(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_PLUGINS", "graphopt_no_such_plugin_module")
    pm = PluginManager().load_all()
    info = pm.plugins["graphopt_no_such_plugin_module"]
    assert info.status == "failed" and "ModuleNotFoundError" in info.error


def test_strict_mode_makes_failures_fatal(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_PLUGINS", "graphopt_no_such_plugin_module")
    monkeypatch.setenv("GRAPHOPT_STRICT_PLUGINS", "1")
    with pytest.raises(graphopt.PluginError, match="graphopt_no_such_plugin_module.*STRICT"):
        PluginManager().load_all()


def test_disable_plugins_blocks_by_name(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "graphopt-cleanup, other")
    pm = PluginManager().load_all()
    assert pm.plugins["graphopt-cleanup"].status == "blocked"
    assert "cleanup" not in pm.passes.aliases
    assert not any(info.plugin == "graphopt-cleanup" for info in pm.passes.passes.values())


def test_duplicate_pass_names_across_plugins_are_reported():
    pm = PluginManager().load_all()

    def register(register):
        register(Noop)

    pm.register_plugin(_plugin("a", register), name="plugin-a")
    info = pm.register_plugin(_plugin("b", register), name="plugin-b")
    # the same class from two plugins is idempotent; a different class with the same name is not
    assert info.status == "ok"

    class Other(Noop):
        pass

    def register_other(register):
        register(Other)

    info = pm.register_plugin(_plugin("c", register_other), name="plugin-c")
    assert info.status == "failed" and "already registered by plugin 'plugin-a'" in info.error
