"""Tests for graphopt.testing: random models through ``check_pass``, and proof that the harness
catches a wrong pass (``tests/plugins/broken_add.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings

import graphopt
from graphopt.testing import RandomModel, check_pass, random_models
from tests.plugins import broken_add


class _Identity(graphopt.Pass):
    """Change nothing (stands in for `cleanup` until the cleanup plugin registers it)."""

    name = "test-identity"
    verification = graphopt.verify.exact()

    def run(self, ir, ctx):
        return graphopt.PassResult(ir, False, {})


class _IdentityPlugin:
    @staticmethod
    @graphopt.hookimpl
    def graphopt_register_passes(register):
        register(_Identity)


@pytest.fixture(scope="module")
def cleanup_pipeline():
    """``"cleanup"``, or an identity pass while the cleanup plugin does not register it yet (the
    harness itself is still exercised end to end: capture, verification, lint, fresh inputs)."""
    pm = graphopt.get_plugin_manager()
    if "cleanup" in pm.passes.aliases or "cleanup" in pm.passes.passes:
        yield "cleanup"
        return
    warnings.warn("the 'cleanup' pipeline is not registered (plugins/graphopt_cleanup); "
                  "testing the harness with an identity pass instead", stacklevel=1)
    pm.register_plugin(_IdentityPlugin, name="test-identity-plugin")
    try:
        yield "test-identity"
    finally:
        pm.unregister_plugin("test-identity-plugin")


@given(rm=random_models())
@settings(max_examples=15, deadline=None)
def test_cleanup_keeps_random_models_exact(cleanup_pipeline, rm: RandomModel):
    report = check_pass(cleanup_pipeline, rm.module, rm.example_inputs)
    assert report["verification"]["passed"] is not False
    assert report["harness"]["fresh_input_sets"] == 2
    assert all(r["verify"]["passed"] for r in report["passes"])


@given(rm=random_models(max_blocks=3, dynamic=True))
@settings(max_examples=5, deadline=None)
def test_cleanup_on_dynamic_random_models(cleanup_pipeline, rm: RandomModel):
    check_pass(cleanup_pipeline, rm.module, rm.example_inputs, dynamic=rm.dynamic)


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(x + self.lin(x))


@pytest.fixture
def break_add_plugin():
    pm = graphopt.get_plugin_manager()
    info = pm.register_plugin(broken_add, name="test-broken-add")
    assert info.error is None, info.error
    try:
        yield
    finally:
        pm.unregister_plugin("test-broken-add")
    assert "break-add" not in pm.passes.passes


def test_harness_catches_a_wrong_pass(break_add_plugin):
    model = _Residual().eval()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    ir = graphopt.capture(model, (x,))
    add = next(n for n in ir.graph.nodes if n.target is torch.ops.aten.add.Tensor)

    with pytest.raises(graphopt.VerificationError) as info:
        check_pass("break-add", model, (x,))

    msg = str(info.value)
    assert "'break-add'" in msg
    assert f"%{add.name}" in msg and "aten.sub.Tensor" in msg  # the first diverging node, as rewritten
    assert info.value.record["first_divergence"]["node"] == add.name


def test_harness_rejects_unknown_pass():
    with pytest.raises(graphopt.UnknownPassError, match="no-such-pass"):
        check_pass("no-such-pass", _Residual().eval(), (torch.randn(1, 2, 8),))
