"""Plugin discovery, isolation of broken plugins, blocking and strict mode."""

from __future__ import annotations

import types

import pytest
import torch

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


# -- ONNX translations belong to the plugin that registers them ---------------------------------
_LIB = torch.library.Library("gotest", "DEF")
_LIB.define("scale(Tensor x, float s) -> Tensor")
_LIB.impl("scale", lambda x, s: x * s, "CompositeExplicitAutograd")
torch.library.register_fake("gotest::scale", lambda x, s: torch.empty_like(x), lib=_LIB)


class UseScaleOp(graphopt.Pass):
    """mul(x, c) -> gotest.scale(x, c), a custom op only its plugin can lower."""

    name = "test-use-scale-op"

    def run(self, ir, ctx):
        n = 0
        for node in list(ir.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.aten.mul.Tensor \
                    and isinstance(node.args[1], float):
                node.target = torch.ops.gotest.scale.default
                n += 1
        return graphopt.PassResult(ir, n > 0, {"replaced": n})


def _scale_onnx(x, s: float):
    from onnxscript import opset18 as op

    return op.Mul(x, op.CastLike(op.Constant(value_float=s), x))


def _scale_plugin() -> types.ModuleType:
    mod = types.ModuleType("scale_plugin")
    mod.graphopt_register_passes = graphopt.hookimpl(lambda register: register(UseScaleOp))
    mod.graphopt_register_onnx_translations = graphopt.hookimpl(
        lambda register: register(torch.ops.gotest.scale.default, _scale_onnx, min_opset=18))
    return mod


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2.5


def test_a_plugin_lowers_its_custom_op_through_its_hook_and_takes_it_along(tmp_path):
    from graphopt.backends.onnx import translations
    from graphopt.plugins import get_plugin_manager

    pm = get_plugin_manager()
    assert pm.plugins["graphopt-fusion"].onnx_translations  # the built-in ones come through the hook too
    info = pm.register_plugin(_scale_plugin(), name="scale-plugin")
    try:
        assert info.status == "ok", info.error
        assert info.onnx_translations == ["gotest.scale.default (opset 18+)"]
        torch.manual_seed(0)
        model = _Scaled().eval()
        art = graphopt.compile(model, (torch.randn(3, 8),), pipeline="test-use-scale-op", target="onnx",
                               dynamic={"x": {0: (1, 16)}}, out=tmp_path / "art")
        assert art.report["passes"][0]["stats"]["replaced"] == 1
        engine = graphopt.load(art.path)
        x = torch.randn(5, 8)
        with torch.no_grad():
            torch.testing.assert_close(torch.as_tensor(engine(x)), model(x), rtol=1e-5, atol=1e-5)
    finally:
        pm.unregister_plugin("scale-plugin")
    assert torch.ops.gotest.scale.default not in translations()
