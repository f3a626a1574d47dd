"""graphopt.passes.manager + graphopt.instruments: provenance, fixpoints, pass errors, ensures,
instrument hooks, IR dumps, the pass limit and the report.

The passes are defined here and registered as a plugin on the process-wide plugin manager, like a
third-party plugin would be; the fixture unregisters them afterwards.
"""

from __future__ import annotations

import types

import pytest
import torch

import graphopt
from graphopt.compiler import optimize
from graphopt.ir.graph_ir import PROVENANCE
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager, StopPipeline
from graphopt.passes.pipeline import resolve
from graphopt.report import Report

aten = torch.ops.aten
PLUGIN = "test-pass-manager-plugin"
HOOKS = "test-pass-manager-hooks"


# -- passes ----------------------------------------------------------------------------------------
class Noop(graphopt.Pass):
    """Changes nothing."""

    name = "test-noop"
    verification = graphopt.verify.exact()

    def run(self, ir, ctx):
        return graphopt.PassResult(ir, False)


class Rewrite(graphopt.Pass):
    """relu(a) → relu(relu(a)) (a new node) and a * 2 → a + a (rewritten in place); same values."""

    name = "test-rewrite"
    verification = graphopt.verify.exact()

    def run(self, ir, ctx):
        g = ir.graph
        relu = next(n for n in g.nodes if n.target == aten.relu.default)
        with g.inserting_after(relu):
            again = g.call_function(aten.relu.default, (relu,))
        relu.replace_all_uses_with(again, delete_user_cb=lambda u: u is not again)
        mul = next(n for n in g.nodes if n.target == aten.mul.Tensor)
        mul.target, mul.args = aten.add.Tensor, (mul.args[0], mul.args[0])
        return graphopt.PassResult(ir, True, {"rewritten": 2})


class DropDoubleNeg(graphopt.Pass):
    """neg(neg(x)) → x, one pair per run, so it needs a fixpoint."""

    name = "test-drop-double-neg"
    fixpoint = True
    verification = graphopt.verify.exact()

    def run(self, ir, ctx):
        for n in ir.graph.nodes:
            if n.target == aten.neg.default and getattr(n.args[0], "target", None) == aten.neg.default:
                inner = n.args[0]
                n.replace_all_uses_with(inner.args[0])
                ir.graph.erase_node(n)
                if not inner.users:
                    ir.graph.erase_node(inner)
                return graphopt.PassResult(ir, True, {"removed": 1, "last": "pair"})
        return graphopt.PassResult(ir, False)


class AlwaysChanged(graphopt.Pass):
    """Claims a change every time: bounded by max_iterations."""

    name = "test-always-changed"
    fixpoint = True
    max_iterations = 4
    verification = graphopt.verify.exact()

    def run(self, ir, ctx):
        return graphopt.PassResult(ir, True, {"runs": 1})


class BadReturn(graphopt.Pass):
    name = "test-bad-return"

    def run(self, ir, ctx):
        return {"ir": ir}


class Raises(graphopt.Pass):
    name = "test-raises"

    def run(self, ir, ctx):
        raise ValueError("boom in the pass")


class BrokenEnsures(graphopt.Pass):
    name = "test-broken-ensures"

    def run(self, ir, ctx):
        return graphopt.PassResult(ir, False)

    def ensures(self, ir):
        if any(n.target == aten.relu.default for n in ir.graph.nodes):
            raise graphopt.PassError(f"pass {self.name!r} promised no aten.relu is left")


class AssertingEnsures(BrokenEnsures):
    name = "test-asserting-ensures"

    def ensures(self, ir):
        raise AssertionError("ensures does not hold")


class ChangesNumerics(graphopt.Pass):
    """a * 2 → a * 3: caught by verification."""

    name = "test-changes-numerics"
    verification = graphopt.verify.exact()

    def run(self, ir, ctx):
        mul = next(n for n in ir.graph.nodes if n.target == aten.mul.Tensor)
        mul.args = (mul.args[0], 3)
        return graphopt.PassResult(ir, True)


PASSES = (Noop, Rewrite, DropDoubleNeg, AlwaysChanged, BadReturn, Raises, BrokenEnsures, AssertingEnsures,
          ChangesNumerics)


@pytest.fixture(scope="module", autouse=True)
def test_passes(request):
    pm = graphopt.get_plugin_manager()
    mod = types.ModuleType("test_pass_manager_plugin")

    def graphopt_register_passes(register):
        for cls in PASSES:
            register(cls)

    mod.graphopt_register_passes = graphopt.hookimpl(graphopt_register_passes)
    info = pm.register_plugin(mod, name=PLUGIN)
    assert info.status == "ok", info.error
    request.addfinalizer(lambda: pm.unregister_plugin(PLUGIN))
    return pm


class Recorder:
    """A plugin whose instrument hooks record every call."""

    def __init__(self):
        self.calls: list[tuple] = []

    @graphopt.hookimpl
    def graphopt_before_pass(self, pass_, ir, ctx):
        self.calls.append(("before", pass_.name, ctx.index, ir.node_count()))

    @graphopt.hookimpl
    def graphopt_after_pass(self, pass_, ir, result, ctx):
        self.calls.append(("after", pass_.name, ctx.index, result.changed, result.ir is ir))

    @graphopt.hookimpl
    def graphopt_pass_failed(self, pass_, ir, error, ctx):
        self.calls.append(("failed", pass_.name, ctx.index, type(error).__name__, str(error)))


@pytest.fixture()
def recorder(request):
    pm = graphopt.get_plugin_manager()
    rec = Recorder()
    pm.register_plugin(rec, name=HOOKS)
    request.addfinalizer(lambda: pm.unregister_plugin(HOOKS))
    return rec


# -- models ----------------------------------------------------------------------------------------
class ReluMul(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x - 1) * 2 + 1


class FourNegs(torch.nn.Module):
    def forward(self, x):
        return torch.neg(torch.neg(torch.neg(torch.neg(x * 2)))) + 1


def _x():
    return (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),)


# -- provenance ------------------------------------------------------------------------------------
def test_new_and_rewritten_nodes_are_stamped_with_the_pass_name():
    original, optimized, report, _ = optimize(ReluMul(), _x(), pipeline="test-rewrite")
    prov = {n.name: n.meta.get(PROVENANCE) for n in optimized.graph.nodes}
    new = [n for n in optimized.graph.nodes if n.name not in {m.name for m in original.graph.nodes}]
    assert [n.target for n in new] == [aten.relu.default]
    assert prov[new[0].name] == "test-rewrite"          # created by the pass
    assert prov["mul"] == "test-rewrite"                 # rewritten in place (target + args)
    assert prov["sub"] == "capture" and prov["relu"] == "capture" and prov["add"] == "capture"
    assert prov["x"] == "capture"
    assert all(n.meta.get(PROVENANCE) == "capture" for n in original.graph.nodes)
    text = optimized.format()
    assert f"%{new[0].name}:" in text and "# test-rewrite" in text
    assert report.passes[0]["stats"] == {"rewritten": 2}
    torch.testing.assert_close(optimized.run()[0], original.run()[0], rtol=0, atol=0)


def test_a_pass_that_changes_nothing_stamps_nothing():
    _, optimized, report, _ = optimize(ReluMul(), _x(), pipeline="test-noop")
    assert all(n.meta.get(PROVENANCE) == "capture" for n in optimized.graph.nodes)
    assert report.passes[0]["changed"] is False


# -- fixpoint --------------------------------------------------------------------------------------
def test_fixpoint_pass_reruns_until_unchanged():
    original, optimized, report, _ = optimize(FourNegs(), _x(), pipeline="test-drop-double-neg")
    assert original.op_counts()["aten.neg"] == 4
    assert "aten.neg" not in optimized.op_counts()
    rec = report.passes[0]
    # two pairs removed, then one run that finds nothing
    assert rec["stats"] == {"removed": 2, "last": "pair", "iterations": 3}
    assert rec["changed"] is True


def test_fixpoint_is_bounded_by_max_iterations():
    _, _, report, _ = optimize(ReluMul(), _x(), pipeline="test-always-changed")
    assert report.passes[0]["stats"] == {"runs": 4, "iterations": 4}


def test_a_non_fixpoint_pass_runs_once():
    _, _, report, _ = optimize(ReluMul(), _x(), pipeline="test-rewrite")
    assert "iterations" not in report.passes[0]["stats"]


# -- errors ----------------------------------------------------------------------------------------
def test_returning_something_else_than_a_pass_result_is_a_pass_error():
    with pytest.raises(graphopt.PassError, match=r"pass 'test-bad-return' returned dict; run\(\) must return "
                                                 r"graphopt.PassResult"):
        optimize(ReluMul(), _x(), pipeline="test-bad-return")


def test_a_pass_that_raises_names_itself_and_the_passes_before_it():
    with pytest.raises(graphopt.PassError) as ei:
        optimize(ReluMul(), _x(), pipeline="test-noop,test-rewrite,test-raises")
    msg = str(ei.value)
    assert "pass 'test-raises' (#3) raised ValueError: boom in the pass" in msg
    assert "passes before it: test-noop, test-rewrite" in msg
    assert isinstance(ei.value.__cause__, ValueError)


def test_a_first_pass_that_raises_has_no_passes_before_it():
    with pytest.raises(graphopt.PassError, match="passes before it: none"):
        optimize(ReluMul(), _x(), pipeline="test-raises")


def test_ensures_violation_is_an_error():
    with pytest.raises(graphopt.PassError, match="promised no aten.relu is left"):
        optimize(ReluMul(), _x(), pipeline="test-broken-ensures")
    # a plain exception from ensures is wrapped, naming the pass
    with pytest.raises(graphopt.PassError, match=r"pass 'test-asserting-ensures' \(#2\) raised AssertionError: "
                                                 r"ensures does not hold") as ei:
        optimize(ReluMul(), _x(), pipeline="test-noop,test-asserting-ensures")
    assert "passes before it: test-noop" in str(ei.value)


def test_verification_failure_names_the_pass(tmp_path):
    rep = Report()
    with pytest.raises(graphopt.VerificationError) as ei:
        optimize(ReluMul(), _x(), pipeline="test-noop,test-changes-numerics", report=rep,
                 repro_dir=str(tmp_path / "repro"))
    assert "test-changes-numerics" in str(ei.value)
    assert ei.value.record["passed"] is False
    assert ei.value.record["first_divergence"]["node"] == "mul"
    assert rep.data["verification"]["failed_pass"] == "test-changes-numerics"
    assert rep.passes[1]["verify"]["policy"] == "exact"
    assert rep.passes[1]["error"].startswith("VerificationError")


# -- hooks -----------------------------------------------------------------------------------------
def test_instrument_hooks_are_called_in_order_with_their_arguments(recorder):
    optimize(ReluMul(), _x(), pipeline="test-noop,test-rewrite")
    n = 4  # sub, relu, mul, add
    assert recorder.calls == [
        ("before", "test-noop", 0, n), ("after", "test-noop", 0, False, True),
        ("before", "test-rewrite", 1, n), ("after", "test-rewrite", 1, True, True),
    ]


def test_pass_failed_hook_gets_the_error(recorder):
    with pytest.raises(graphopt.PassError):
        optimize(ReluMul(), _x(), pipeline="test-noop,test-raises")
    assert recorder.calls == [
        ("before", "test-noop", 0, 4), ("after", "test-noop", 0, False, True),
        ("before", "test-raises", 1, 4), ("failed", "test-raises", 1, "ValueError", "boom in the pass"),
    ]


def test_a_failing_pass_failed_hook_does_not_hide_the_error(request):
    pm = graphopt.get_plugin_manager()

    class Broken:
        @graphopt.hookimpl
        def graphopt_pass_failed(self, pass_, ir, error, ctx):
            raise RuntimeError("hook bug")

    pm.register_plugin(Broken(), name="test-broken-hook")
    request.addfinalizer(lambda: pm.unregister_plugin("test-broken-hook"))
    with pytest.raises(graphopt.PassError, match="boom in the pass"):
        optimize(ReluMul(), _x(), pipeline="test-raises")


def test_a_before_pass_hook_can_stop_the_pipeline(request):
    pm = graphopt.get_plugin_manager()

    class StopAtRewrite:
        @graphopt.hookimpl
        def graphopt_before_pass(self, pass_, ir, ctx):
            if pass_.name == "test-rewrite":
                raise StopPipeline

    pm.register_plugin(StopAtRewrite(), name="test-stopper")
    request.addfinalizer(lambda: pm.unregister_plugin("test-stopper"))
    _, optimized, report, _ = optimize(ReluMul(), _x(), pipeline="test-noop,test-rewrite")
    assert [r["name"] for r in report.passes] == ["test-noop"]
    assert all(n.meta.get(PROVENANCE) == "capture" for n in optimized.graph.nodes)


# -- IR dumps --------------------------------------------------------------------------------------
def test_dump_ir_writes_one_file_per_pass(tmp_path):
    original, optimized, report, _ = optimize(ReluMul(), _x(), pipeline="test-noop,test-rewrite",
                                              dump_ir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_capture.txt", "001_test_noop.txt",
                                                          "002_test_rewrite.txt"]
    assert (tmp_path / "000_capture.txt").read_text() == original.format() + "\n"
    second = (tmp_path / "002_test_rewrite.txt").read_text()
    assert second.startswith("# pass test-rewrite (changed=True, stats={'rewritten': 2})\n")
    assert optimized.format() in second and "# test-rewrite" in second
    assert report.passes[1]["ir_dump"] == str(tmp_path / "002_test_rewrite.txt")


def test_dump_ir_writes_the_failing_pass(tmp_path):
    with pytest.raises(graphopt.PassError):
        optimize(ReluMul(), _x(), pipeline="test-noop,test-raises", dump_ir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_capture.txt", "001_test_noop.txt", "002_test_raises.FAILED.txt"]
    assert "boom in the pass" in (tmp_path / "002_test_raises.FAILED.txt").read_text()


# -- pass limit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit, ran", [(0, []), (1, ["test-noop"]), (2, ["test-noop", "test-rewrite"])])
def test_pass_limit_stops_the_pipeline(limit, ran):
    pm = graphopt.get_plugin_manager()
    ir = graphopt.capture(ReluMul(), _x())
    passes = resolve("test-noop,test-rewrite,test-raises", pm.passes)
    report = Report()
    ctx = PassContext(original=ir.copy(), verify=False, pass_limit=limit, report=report)
    out = PassManager(passes, pm.hook).run(ir, ctx)   # test-raises never runs
    assert [r["name"] for r in report.passes] == ran
    assert any(n.meta.get(PROVENANCE) == "test-rewrite" for n in out.graph.nodes) == ("test-rewrite" in ran)


# -- report ----------------------------------------------------------------------------------------
def test_report_records_counts_time_and_verification():
    original, optimized, report, verifier = optimize(FourNegs(), _x(), pipeline="test-noop,test-drop-double-neg")
    assert verifier is not None and len(verifier.input_sets) == 2
    assert report.data["pipeline"] == "test-noop,test-drop-double-neg"
    assert report.data["original"]["nodes"] == original.node_count() == 6
    noop, neg = report.passes
    assert (noop["index"], noop["name"], noop["spec"], noop["plugin"]) == (1, "test-noop", "test-noop", PLUGIN)
    assert noop["nodes_before"] == noop["nodes_after"] == 6
    assert neg["nodes_before"] == 6 and neg["nodes_after"] == optimized.node_count() == 2
    for rec in (noop, neg):
        assert isinstance(rec["time_s"], float) and rec["time_s"] >= 0
        assert rec["verify"]["policy"] == "exact" and rec["verify"]["passed"] is True
        assert rec["verify"]["error_vs_original"] == 0.0 and rec["verify"]["input_sets"] == 2
        assert rec.get("error") is None


def test_report_records_the_error_of_a_failing_pass():
    rep = Report()
    with pytest.raises(graphopt.PassError):
        optimize(ReluMul(), _x(), pipeline="test-noop,test-raises", report=rep)
    assert [r["name"] for r in rep.passes] == ["test-noop", "test-raises"]
    assert rep.passes[1]["error"] == "ValueError: boom in the pass"
    assert rep.passes[0].get("error") is None


def test_verify_false_skips_verification():
    _, _, report, verifier = optimize(ReluMul(), _x(), pipeline="test-changes-numerics", verify=False)
    assert verifier is None and report.passes[0]["verify"] is None
    assert report.data["verification"]["enabled"] is False
