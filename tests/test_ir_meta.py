"""GraphIR.meta is a declared contract (graphopt/ir/meta.py): after every pass, private keys and
keys of the wrong type fail the pass by name; undeclared keys are logged; plugins declare theirs."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.fx import register_meta_key
from graphopt.ir.meta import KEYS
from graphopt.plugins import get_plugin_manager


def _pass(name: str, key: str, value):
    class SetsMeta(graphopt.Pass):
        def run(self, ir, ctx):
            ir.meta[key] = value
            return graphopt.PassResult(ir, False)

    SetsMeta.name = name
    return SetsMeta


def _run(pass_cls):
    import types

    mod = types.ModuleType(pass_cls.name)
    mod.graphopt_register_passes = graphopt.hookimpl(lambda register: register(pass_cls))
    pm = get_plugin_manager()
    pm.register_plugin(mod, name=pass_cls.name)
    try:
        return graphopt.optimize(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),), pass_cls.name)
    finally:
        pm.unregister_plugin(pass_cls.name)


def test_a_private_key_fails_the_pass_by_name():
    with pytest.raises(graphopt.PassError, match="test-meta-private' left the private key '_cache'"):
        _run(_pass("test-meta-private", "_cache", {}))


def test_a_declared_key_of_the_wrong_type_fails_the_pass():
    with pytest.raises(graphopt.PassError, match=r"GraphIR.meta\['generation'\] as a str; it is a dict"):
        _run(_pass("test-meta-type", "generation", "yes"))


def test_undeclared_keys_are_logged_and_declared_ones_pass(caplog):
    with caplog.at_level("WARNING", logger="graphopt.ir.meta"):
        _run(_pass("test-meta-undeclared", "my_plugin_state", 1))
    assert "no plugin declared" in caplog.text
    register_meta_key("test_meta_declared", int, "test-meta-declared", "nobody", "a test key")
    try:
        caplog.clear()
        with caplog.at_level("WARNING", logger="graphopt.ir.meta"):
            _run(_pass("test-meta-declared", "test_meta_declared", 3))
        assert "test_meta_declared" not in caplog.text
        with pytest.raises(graphopt.PassError, match="is a int"):
            _run(_pass("test-meta-declared", "test_meta_declared", "three"))
        with pytest.raises(graphopt.PassError, match="generation.*kv-cache pass's"):
            register_meta_key("generation", dict, "someone else", "", "")
    finally:
        KEYS.pop("test_meta_declared", None)
