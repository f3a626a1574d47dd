"""Fallbacks that used to be silent (issue 14, "First try works") now raise a typed error that names
the fix, or leave a line in the report:

- pass option types that cannot be resolved (values used to stay strings);
- the fp64 reference run failing (``reference()`` used to become an unlabelled allclose);
- the probe of the lowered program at the smallest dynamic sizes (any exception used to narrow
  the artifact's range without a word);
- TensorRT runtime failures (a GPU out of memory used to be a bare ``RuntimeError``: "internal
  error", exit 3). TensorRT is not installed here: the runner is driven with stand-ins.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

import pytest
import torch

import graphopt
from graphopt.errors import GraphoptError, InputError, PassOptionError, RuntimeFailure
from graphopt.passes.base import describe_options, parse_options
from graphopt.report import format_table

if TYPE_CHECKING:
    from decimal import Decimal  # only for type checkers: not resolvable when options are parsed


# -- pass option types -----------------------------------------------------------------------------
class _Unresolvable(graphopt.Pass):
    """Declares an option whose type exists only for type checkers."""

    name = "test-unresolvable-option"

    @dataclasses.dataclass
    class Options:
        k: int = 3
        ratio: Decimal | None = None


class Kind(enum.Enum):
    SOFT = "soft"
    HARD = "hard"


class _Resolvable(graphopt.Pass):
    """Declares options with string annotations (``from __future__ import annotations``) that resolve."""

    name = "test-resolvable-option"

    @dataclasses.dataclass
    class Options:
        n: int = 1
        mode: Literal["a", "b"] = "a"
        out: Path = Path("build")
        kind: Kind = Kind.SOFT
        table: dict[str, int] = dataclasses.field(default_factory=dict)


def test_an_unresolvable_option_type_is_an_error_naming_pass_and_option():
    with pytest.raises(PassOptionError, match=r"'test-unresolvable-option'.*option 'ratio'.*Decimal.*TYPE_CHECKING"):
        parse_options(_Unresolvable, {"k": "4"})
    # `graphopt passes` still lists it, and says what is wrong
    assert any(o.startswith("ratio:") and "unresolved type" in o for o in describe_options(_Unresolvable))


def test_resolvable_option_types_still_convert_the_values():
    opts = parse_options(_Resolvable, {"n": "5", "mode": "b"})
    assert opts.n == 5 and isinstance(opts.n, int) and opts.mode == "b"   # converted, not the string "5"
    with pytest.raises(PassOptionError, match="must be one of"):
        parse_options(_Resolvable, {"mode": "c"})
    opts = parse_options(_Resolvable, {"out": "build/x", "kind": "hard", "table": {"a": 1}})  # table: from TOML
    assert opts.out == Path("build/x") and opts.kind is Kind.HARD and opts.table == {"a": 1}
    with pytest.raises(PassOptionError, match="kind='medium' is not a Kind"):
        parse_options(_Resolvable, {"kind": "medium"})
    with pytest.raises(PassOptionError, match="table is declared as dict.*pipeline text cannot give"):
        parse_options(_Resolvable, {"table": "a=1"})


# -- the fp64 reference run failing ----------------------------------------------------------------
class SumThree(torch.nn.Module):
    def forward(self, x, y, z):
        return (x + y) + z


class Reassociate(graphopt.Pass):
    """(x + y) + z -> x + (y + z): exact in real arithmetic, not in fp32."""

    name = "test-reassociate-add"
    verification = graphopt.verify.reference()

    def run(self, ir, ctx):
        add = torch.ops.aten.add.Tensor
        for outer in list(ir.graph.nodes):
            inner = outer.args[0] if outer.op == "call_function" and outer.target is add else None
            if getattr(inner, "target", None) is add and len(inner.users) == 1:
                (x, y), z = inner.args[:2], outer.args[1]
                with ir.graph.inserting_before(outer):
                    yz = ir.graph.call_function(add, (y, z))
                outer.args = (x, yz)
                ir.graph.erase_node(inner)
                ir.recompile()
                return graphopt.PassResult(ir, True, {"reassociated": 1})
        return graphopt.PassResult(ir, False, {})


@pytest.fixture
def reassociate_plugin(request):
    pm = graphopt.get_plugin_manager()
    plugin = SimpleNamespace(graphopt_register_passes=graphopt.hookimpl(lambda register: register(Reassociate)))
    pm.register_plugin(plugin, name="test-reassociate")
    request.addfinalizer(lambda: pm.unregister_plugin("test-reassociate"))


def _three(seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(64, 64, generator=g) * s for s in (1e4, 1.0, -1e4))   # cancellation: not bit-exact


def test_reference_uses_the_fp64_run_when_it_works(reassociate_plugin):
    _, _, report, _ = graphopt.optimize(SumThree(), _three(0), pipeline="test-reassociate-add", n_random=0)
    v = report.passes[0]["verify"]
    assert v["passed"] and v["figures"]["fp64_reference"] == 1.0 and "no fp64 run" not in v["policy"]
    assert v["error_vs_original"] > 0   # the reassociation did change bits


def test_a_failing_fp64_run_is_named_in_the_record_the_table_and_the_label(reassociate_plugin, monkeypatch):
    import graphopt.verify.verifier as verifier_mod

    monkeypatch.setattr(verifier_mod, "run_float64", lambda ir, inputs: None)   # as if fp64 could not run
    _, _, report, _ = graphopt.optimize(SumThree(), _three(0), pipeline="test-reassociate-add", n_random=0)
    v = report.passes[0]["verify"]
    assert v["passed"] and v["figures"]["fp64_reference"] == 0.0
    assert "fp64 reference unavailable" in v["message"] and "allclose(rtol=0.0001" in v["message"]
    assert "[no fp64 run: allclose(rtol=0.0001" in v["policy"]           # the CLI line prints the policy
    assert "no fp64 run" in format_table(report.data)                    # and the report table


# -- probing the lowered program at the smallest sizes --------------------------------------------
class Scale(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2.0


@pytest.fixture(scope="module")
def probe_case():
    from graphopt.capture import capture
    from graphopt.verify.verifier import Verifier, make_verification_inputs

    ir = capture(Scale(), (torch.randn(4, 8),), {"x": {0: (1, 16)}})
    return ir, Verifier(ir, make_verification_inputs(ir, n_random=0))


class _Runner:
    """A lowered program that behaves like the graph except at ``bad_size`` of dim 0."""

    def __init__(self, ir, bad_size, fail):
        self.ir, self.bad_size, self.fail = ir, bad_size, fail

    def run(self, inputs):
        if inputs[0].shape[0] == self.bad_size:
            if isinstance(self.fail, BaseException):
                raise self.fail
            return [o + self.fail for o in self.ir.run(inputs)]   # wrong values
        return self.ir.run(inputs)


def _probe(probe_case, runner):
    from graphopt.backends.onnx import OnnxBackend
    from graphopt.verify.lowering import LoweringCheck, probe_minimum_sizes

    ir, verifier = probe_case
    manifest = {"inputs": [s.to_json() for s in ir.inputs]}
    check = LoweringCheck(OnnxBackend(), verifier, ir)
    check.policy = graphopt.verify.allclose(1e-5, 1e-5)
    notes = probe_minimum_sizes(runner, check, manifest)
    return notes, manifest["inputs"][0]["dynamic"]["0"]


def test_a_refused_size_narrows_the_range_and_says_why(probe_case):
    ir, _ = probe_case
    notes, rng = _probe(probe_case, _Runner(ir, 1, InputError("inputs outside what the program was compiled for: "
                                                             "Expected input at *args[0].shape[0] to be >= 2\nmore")))
    assert rng == [2, 16]
    assert len(notes) == 1 and "rejects" in notes[0] and "= 1" in notes[0]
    assert "InputError: inputs outside what the program was compiled for" in notes[0] and "more" not in notes[0]


def test_wrong_values_at_a_size_narrow_the_range_and_say_so(probe_case):
    ir, _ = probe_case
    notes, rng = _probe(probe_case, _Runner(ir, 1, 0.5))
    assert rng == [2, 16] and "computes" in notes[0] and "wrong" in notes[0]


def test_sizes_that_work_are_not_narrowed(probe_case):
    ir, _ = probe_case
    assert _probe(probe_case, _Runner(ir, -1, None)) == ([], [1, 16])


@pytest.mark.parametrize("error", [TypeError("run() got an unexpected keyword"), torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeFailure("out of GPU memory")], ids=["bug", "oom", "typed"])
def test_errors_that_are_not_a_refusal_of_the_size_propagate(probe_case, error):
    ir, _ = probe_case
    with pytest.raises(type(error)) as ei:
        _probe(probe_case, _Runner(ir, 1, error))
    assert any("at " in n and "= 1" in n for n in getattr(ei.value, "__notes__", []))


# -- TensorRT runtime failures ---------------------------------------------------------------------
def _trt_runner(engine):
    from graphopt.runtime.tensorrt_runner import TensorRTRunner

    runner = object.__new__(TensorRTRunner)   # the pool and the call path only; no GPU needed
    runner.engine, runner.n_profiles, runner.profiles = engine, 1, [{}]
    runner.plan_path, runner.torch_device = Path("build/model.plan"), "cuda"
    runner.input_names, runner.output_names, runner.dtypes = ["x"], [], {}
    runner._lock, runner._closed = threading.Condition(), False
    runner._idle, runner._unused = {0: []}, {0: [0]}
    runner._new_stream = lambda: SimpleNamespace(cuda_stream=0, wait_stream=lambda s: None)
    return runner


def test_tensorrt_context_creation_failure_is_typed_and_names_the_fix():
    class Engine:
        num_optimization_profiles = 1
        device_memory_size_v2 = 3 * 2 ** 30

        def create_execution_context(self):
            return None   # what TensorRT returns when the activation memory does not fit

    with pytest.raises(RuntimeFailure) as ei:
        _trt_runner(Engine())._acquire(0)
    assert isinstance(ei.value, GraphoptError) and isinstance(ei.value, RuntimeError)
    assert ei.value.exit_code == 2   # the CLI prints "error: ..." instead of an internal-error trace
    msg = str(ei.value)
    assert "3072 MiB per context" in msg and "contexts=1" in msg and "--dynamic" in msg


def test_tensorrt_execution_failure_and_gpu_oom_are_typed_and_name_the_fix(monkeypatch):
    class Ctx:
        def set_input_shape(self, name, shape):
            return True

        def set_tensor_address(self, name, ptr):
            pass

        def execute_async_v3(self, stream):
            return False

    class Engine:
        num_optimization_profiles = 1

        def create_execution_context(self):
            return Ctx()

    caller = SimpleNamespace(wait_stream=lambda s: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "device", lambda device: threading.Lock())   # any context manager
    runner = _trt_runner(Engine())
    runner._to_device = lambda name, x: SimpleNamespace(shape=tuple(x.shape), numel=x.numel, data_ptr=lambda: 0,
                                                        record_stream=lambda s: None)   # a "GPU" tensor
    with pytest.raises(RuntimeFailure, match=r"could not run .*model.plan on inputs \{'x': \(2, 3\)\}.*smaller batch"):
        runner.run([torch.zeros(2, 3)])

    def oom(name, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\n(allocator stats)")

    runner._to_device = oom
    with pytest.raises(RuntimeFailure) as ei:
        runner.run([torch.zeros(64, 4096)])
    msg = str(ei.value)
    assert "out of GPU memory" in msg and "Tried to allocate 8.00 GiB" in msg and "(allocator stats)" not in msg
    assert "smaller batch or sequence" in msg and "contexts=1" in msg and "(64, 4096)" in msg
