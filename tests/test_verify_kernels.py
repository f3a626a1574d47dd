"""The faster few-row matrix products verification forwards run in (graphopt.verify.kernels), and
the fake-tensor cache setting of graphopt's symbolic propagation (graphopt.ir.shapes)."""

from __future__ import annotations

import pytest
import torch

from graphopt.verify import kernels


def _weight(out_features=1024, in_features=512, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [1, 3, 24, kernels.MAX_ROWS])
def test_few_row_products_are_the_same_products(rows):
    w, b = _weight(), torch.randn(1024)
    x = torch.randn(2, rows, 512)  # a linear on a 3-D activation: view + mm / addmm
    want, want_b = torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, w, b)
    calls = []

    class Counting(kernels.SmallRowsGemm):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                calls.append(kernels._eligible(*args[-2:]))
            return super().__torch_dispatch__(func, types, args, kwargs)

    with torch.no_grad(), Counting():
        got, got_b = torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, w, b)
    eligible = 2 * rows <= kernels.MAX_ROWS
    assert calls == [eligible, eligible]
    for g, want_ in ((got, want), (got_b, want_b)):
        assert g.shape == want_.shape and g.is_contiguous()
        # sums of 512 products of size ~22: fp32 summation order moves them by ~1e-5
        torch.testing.assert_close(g, want_, rtol=1e-5, atol=1e-4)
        assert not torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("case", ["float64", "many rows", "small weight", "contiguous right operand"])
def test_other_products_are_left_as_they_are(case):
    w, x = _weight(), torch.randn(8, 512)
    if case == "float64":
        w, x = w.double(), x.double()
    elif case == "many rows":
        x = torch.randn(kernels.MAX_ROWS + 1, 512)
    elif case == "small weight":
        w = _weight(16, 512)
    rhs = w.t().contiguous() if case == "contiguous right operand" else w.t()
    with torch.no_grad(), kernels.SmallRowsGemm():
        got = torch.mm(x, rhs)
    assert torch.equal(got, torch.mm(x, rhs))  # bit for bit: the op ran as it is


def test_the_choice_is_measured_or_forced(monkeypatch):
    kernels.transposed_is_faster.cache_clear()
    try:
        monkeypatch.setenv("GRAPHOPT_VERIFY_GEMM", "plain")
        assert not kernels.transposed_is_faster()
        assert not isinstance(kernels.verification_kernels(), kernels.SmallRowsGemm)
        kernels.transposed_is_faster.cache_clear()
        monkeypatch.setenv("GRAPHOPT_VERIFY_GEMM", "transposed")
        assert isinstance(kernels.verification_kernels(), kernels.SmallRowsGemm)
        kernels.transposed_is_faster.cache_clear()
        monkeypatch.delenv("GRAPHOPT_VERIFY_GEMM")
        assert kernels.transposed_is_faster() in (True, False)  # measured: either is a valid answer
    finally:
        kernels.transposed_is_faster.cache_clear()


def test_an_unchanged_graph_still_verifies_bit_for_bit(monkeypatch):
    """Original and candidate run under the same kernels: the exact policy still holds."""
    from graphopt import capture
    from graphopt.verify.policies import exact
    from graphopt.verify.verifier import Verifier, make_verification_inputs

    monkeypatch.setenv("GRAPHOPT_VERIFY_GEMM", "transposed")
    kernels.transposed_is_faster.cache_clear()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).eval()
        ir = capture(model, (torch.randn(4, 512),), dynamic={"input": {0: (1, 16)}})
        sets = make_verification_inputs(ir, n_random=1)
        verifier = Verifier(ir, sets)
        outcome, record = verifier.check(ir.copy(), exact())
        assert outcome.passed, outcome.message
        for inp, out in zip(sets, verifier.original_outputs):
            torch.testing.assert_close(out[0], model(*inp), rtol=1e-5, atol=1e-5)
    finally:
        kernels.transposed_is_faster.cache_clear()


def test_symbolic_propagation_runs_without_the_fake_tensor_cache():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from graphopt.ir.shapes import fake_tensor_cache_off

    with fake_tensor_cache_off():
        assert FakeTensorMode().cache_enabled is False
    mode = FakeTensorMode()
    was = mode.cache_enabled
    with fake_tensor_cache_off(mode):
        assert mode.cache_enabled is False
    assert mode.cache_enabled == was
