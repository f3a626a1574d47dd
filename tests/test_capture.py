"""graphopt.capture: model → GraphIR (input names, call convention, output structure, dynamic dims,
errors, the symbolic_trace fallback, provenance)."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.capture import capture
from graphopt.ir.graph_ir import PROVENANCE


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, tokens, scale):
        return self.lin(tokens) * scale


class ReturnsTensor(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


class ReturnsTuple(torch.nn.Module):
    def forward(self, x):
        return x + 1, x * 2


class ReturnsDict(torch.nn.Module):
    def forward(self, x):
        return {"logits": x * 2, "extra": (x - 1, x.sum(-1))}


class PlainLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, unused=None):
        return torch.relu(self.lin(x)), x.sum(-1)


class BranchesOnValues(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _all_nodes_captured(ir):
    return all(n.meta.get(PROVENANCE) == "capture" for n in ir.graph.nodes)


# -- inputs and calling convention -----------------------------------------------------------------
def test_positional_inputs_are_named_after_forward_signature():
    ir = capture(TwoInputs(), (_x(2, 8), torch.tensor(0.5)))
    assert ir.input_names == ["tokens", "scale"]
    assert ir.call_convention == "positional"
    assert [p.meta["graphopt_input"] for p in ir.placeholders()] == ["tokens", "scale"]
    assert ir.inputs[0].shape == [2, 8] and ir.inputs[0].dtype == "float32"


def test_keyword_inputs_are_named_after_dict_keys_in_dict_order():
    m = TwoInputs()
    x, s = _x(2, 8), torch.tensor(0.5)
    ir = capture(m, {"scale": s, "tokens": x})
    assert ir.input_names == ["scale", "tokens"]
    assert ir.call_convention == "keyword"
    (out,) = ir.run([s, x])
    torch.testing.assert_close(out, m(x, s), rtol=0, atol=0)


def test_single_tensor_example_input_is_accepted():
    ir = capture(ReturnsTensor(), _x(3, 4))
    assert ir.input_names == ["x"]


# -- output structure ------------------------------------------------------------------------------
def test_tensor_output():
    x = _x(3, 4)
    ir = capture(ReturnsTensor(), (x,))
    assert ir.out_structure["type"] == "tensor"
    assert ir.output_names == ["output"]
    out = ir.structured(ir.run())
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ReturnsTensor()(x))


def test_tuple_output():
    x = _x(3, 4)
    ir = capture(ReturnsTuple(), (x,))
    assert ir.out_structure["type"] == "tuple"
    assert ir.output_names == ["output_0", "output_1"]
    out = ir.structured(ir.run())
    assert isinstance(out, tuple) and len(out) == 2
    for got, want in zip(out, ReturnsTuple()(x)):
        torch.testing.assert_close(got, want)


def test_nested_dict_output():
    x = _x(3, 4)
    ir = capture(ReturnsDict(), (x,))
    assert ir.output_names == ["logits", "extra.0", "extra.1"]
    assert [o.shape for o in ir.outputs] == [[3, 4], [3, 4], [3]]
    out = ir.structured(ir.run())
    want = ReturnsDict()(x)
    assert set(out) == {"logits", "extra"} and isinstance(out["extra"], tuple)
    torch.testing.assert_close(out["logits"], want["logits"])
    torch.testing.assert_close(out["extra"][1], want["extra"][1])


def test_hf_model_output_becomes_a_dict():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ir = capture(model, {"input_ids": ids})
    assert ir.call_convention == "keyword"
    assert ir.input_names == ["input_ids"] and ir.inputs[0].dtype == "int64"
    assert ir.out_structure["type"] == "dict"
    assert ir.output_names == ["logits"] and ir.outputs[0].shape == [2, 7, 64]
    out = ir.structured(ir.run())
    assert type(out) is dict and list(out) == ["logits"]
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(input_ids=ids).logits)
    assert _all_nodes_captured(ir)


def test_the_model_runs_once_and_the_structure_is_the_eager_one():
    """The output structure comes from torch.export's output spec (the fake outputs rebuilt), not
    from a second, eager forward (seconds on a 1B model): the model's forward runs once, and the
    structure, constants and ``None`` included, is the one the eager call returns."""
    from graphopt.ir.structure import flatten

    class Counted(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Counted.calls += 1
            return {"logits": x * 2, "aux": (None, x.sum(-1), 3), "empty": None, "tail": [x - 1]}

    x = _x(3, 4)
    ir = capture(Counted(), (x,), {"x": {0: (1, 8)}})
    assert Counted.calls == 1
    _, want = flatten(Counted()(x), is_leaf=lambda t: isinstance(t, torch.Tensor))
    assert ir.out_structure == want
    out = ir.structured(ir.run())
    assert out["aux"][0] is None and out["aux"][2] == 3 and out["empty"] is None
    torch.testing.assert_close(out["tail"][0], x - 1)


# -- dynamic dims ----------------------------------------------------------------------------------
class MaskedSum(torch.nn.Module):
    def forward(self, x, mask):
        return x * mask


def test_dynamic_dims_get_batch_and_seq_labels_shared_between_inputs():
    x, mask = _x(2, 5), torch.ones(2, 5)
    rng = {0: (1, 8), 1: (2, 16)}
    ir = capture(MaskedSum(), (x, mask), dynamic={"x": rng, "mask": rng})
    assert ir.inputs[0].shape == ["batch", "seq"]
    assert ir.inputs[1].shape == ["batch", "seq"]
    assert ir.inputs[0].dynamic == {0: (1, 8), 1: (2, 16)}
    assert ir.dynamic == {"x": rng, "mask": rng}
    assert ir.outputs[0].shape == ["batch", "seq"]
    # the graph really takes other sizes
    (out,) = ir.run([_x(3, 9), torch.ones(3, 9)])
    assert out.shape == (3, 9)


def test_dims_with_different_ranges_get_distinct_labels():
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a.sum(0), b.sum(0)

    ir = capture(Two(), (_x(4, 3), _x(4, 3)), dynamic={"a": {0: (2, 8)}, "b": {0: (2, 6)}})
    la, lb = ir.inputs[0].shape[0], ir.inputs[1].shape[0]
    assert la == "batch" and isinstance(lb, str) and lb.startswith("batch") and lb != la


def test_negative_dynamic_dim_counts_from_the_end():
    ir = capture(ReturnsTensor(), (_x(2, 5),), dynamic={"x": {-1: (2, 10)}})
    assert ir.inputs[0].dynamic == {1: (2, 10)}
    assert ir.inputs[0].shape == [2, "seq"]


def test_static_capture_has_no_dynamic_dims():
    ir = capture(ReturnsTensor(), (_x(2, 5),))
    assert ir.dynamic == {} and ir.inputs[0].shape == [2, 5]


# -- errors ----------------------------------------------------------------------------------------
def test_non_tensor_example_input_is_an_input_error():
    with pytest.raises(graphopt.InputError, match=r"'scale' is a float, not a tensor"):
        capture(TwoInputs(), (_x(2, 8), 0.5))


def test_example_inputs_of_a_wrong_type():
    with pytest.raises(graphopt.InputError, match="example_inputs must be"):
        capture(ReturnsTensor(), "not inputs")


def test_not_a_module():
    with pytest.raises(graphopt.CaptureError, match="expected a torch.nn.Module"):
        capture(lambda x: x, (_x(2),))


def test_dynamic_dim_out_of_range_for_the_rank():
    with pytest.raises(graphopt.InputError, match=r"dynamic dim 2 of input 'x' is out of range .*\(2, 5\)"):
        capture(ReturnsTensor(), (_x(2, 5),), dynamic={"x": {2: (1, 8)}})


def test_example_size_outside_its_dynamic_range():
    with pytest.raises(graphopt.InputError, match=r"'x' has size 5 at dim 1, outside its dynamic range \(6, 10\)"):
        capture(ReturnsTensor(), (_x(2, 5),), dynamic={"x": {1: (6, 10)}})


def test_malformed_dynamic_range():
    with pytest.raises(graphopt.InputError, match=r"must be \(min, max\)"):
        capture(ReturnsTensor(), (_x(2, 5),), dynamic={"x": {1: 8}})


def test_dynamic_dims_for_an_unknown_input_name():
    with pytest.raises(graphopt.InputError, match=r"unknown input 'y'; inputs are \['x'\]"):
        capture(ReturnsTensor(), (_x(2, 5),), dynamic={"y": {0: (1, 4)}})


def test_model_that_raises_on_its_inputs():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x @ torch.ones(5, 5)

    with pytest.raises(graphopt.CaptureError, match=r"raised on its example inputs: RuntimeError") as ei:
        capture(Bad(), (_x(3, 4),))
    assert "forward()" in str(ei.value)
    assert isinstance(ei.value.__cause__, RuntimeError)


def test_data_dependent_control_flow_fails_with_a_hint():
    with pytest.raises(graphopt.CaptureError) as ei:
        capture(BranchesOnValues(), (_x(3, 4),))
    msg = str(ei.value)
    assert "could not capture BranchesOnValues" in msg
    assert "torch.export" in msg and "symbolic_trace" in msg  # both attempts are reported
    assert "hint:" in msg and "torch.where" in msg and "torch.cond" in msg


def test_capture_error_is_also_a_runtime_error():
    assert issubclass(graphopt.CaptureError, RuntimeError)
    assert issubclass(graphopt.InputError, ValueError)


# -- symbolic_trace fallback -----------------------------------------------------------------------
def test_symbolic_trace_method_matches_eager():
    torch.manual_seed(0)
    m = PlainLinear().eval()
    x = _x(3, 4)
    ir = capture(m, (x,), method="symbolic_trace")
    assert ir.meta["capture"] == "symbolic_trace"
    assert ir.input_names == ["x"]  # the unused optional argument is dropped
    assert ir.output_names == ["output_0", "output_1"]
    assert ir.outputs[0].shape == [3, 3]
    with torch.no_grad():
        want = m(x)
    for got, w in zip(ir.run(), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    # and on other inputs
    x2 = _x(3, 4) * 3
    with torch.no_grad():
        for got, w in zip(ir.run([x2]), m(x2)):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert _all_nodes_captured(ir)


def test_symbolic_trace_refuses_keyword_inputs():
    with pytest.raises(graphopt.CaptureError, match="positional tensor inputs only"):
        capture(PlainLinear(), {"x": _x(3, 4)}, method="symbolic_trace")


def test_export_method_is_the_default():
    ir = capture(PlainLinear(), (_x(3, 4),))
    assert ir.meta["capture"] == "torch.export"
    assert ir.meta["model_class"].endswith("PlainLinear")


def test_capture_puts_the_module_in_eval_mode():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    m.train()
    ir = capture(m, (_x(2, 4),))
    assert not m.training
    x = _x(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(ir.run([x])[0], m[0](x), rtol=0, atol=0)  # dropout is inactive


# -- provenance ------------------------------------------------------------------------------------
def test_every_node_has_capture_provenance():
    ir = capture(ReturnsDict(), (_x(3, 4),), dynamic={"x": {0: (1, 8)}})
    assert _all_nodes_captured(ir)
    assert {n.op for n in ir.graph.nodes} >= {"placeholder", "call_function", "output"}
