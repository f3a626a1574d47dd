"""graphopt.ir: GraphIR printing and views, analyses (liveness, critical path, peak activation
memory) and the output-structure JSON."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import graphopt
from graphopt.capture import capture
from graphopt.ir.analysis import critical_path_length, live_nodes, peak_activation_bytes
from graphopt.ir.graph_ir import PROVENANCE, GraphIR, TensorSpec
from graphopt.ir.structure import flatten, leaf_names, unflatten

aten = torch.ops.aten


class Chain3(torch.nn.Module):
    """x → add → mul → relu: three elementwise ops, hand-computable memory."""

    def forward(self, x):
        return torch.relu((x + 1) * 2)


class Square(torch.nn.Module):
    def forward(self, x):
        return x * x + x


@pytest.fixture(scope="module")
def chain() -> GraphIR:
    return capture(Chain3(), (torch.randn(4, 8),))


def _node(ir, target):
    return next(n for n in ir.graph.nodes if n.target == target)


# -- printing --------------------------------------------------------------------------------------
def test_format_shows_inputs_shapes_dtypes_and_return(chain):
    text = chain.format()
    lines = text.splitlines()
    assert lines[0] == "graph(x: float32[4,8]):"
    assert any(ln.strip().startswith("%add: f32[4,8] = aten.add(%x, 1)") for ln in lines), text
    assert any("aten.mul(%add, 2)" in ln for ln in lines)
    assert any(ln.strip().startswith("%relu: f32[4,8] = aten.relu(%mul)") for ln in lines)
    assert lines[-1].strip() == "return (%relu)"
    assert "#" not in text  # captured nodes carry no provenance comment
    assert str(chain) == text


def test_format_marks_nodes_made_by_a_pass(chain):
    ir = chain.copy()
    _node(ir, aten.mul.Tensor).meta[PROVENANCE] = "my-pass"
    lines = ir.format().splitlines()
    mul_line = next(ln for ln in lines if "%mul:" in ln)
    assert mul_line.endswith("# my-pass")
    assert not next(ln for ln in lines if "%add:" in ln).endswith("# my-pass")
    assert "# my-pass" not in ir.format(provenance=False)


def test_format_of_int_and_bool_dtypes():
    class Cmp(torch.nn.Module):
        def forward(self, ids):
            return ids > 3, ids.to(torch.int32)

    ir = capture(Cmp(), (torch.arange(6).reshape(2, 3),))
    text = ir.format()
    assert "graph(ids: int64[2,3]):" in text
    assert "b8[2,3]" in text and "i32[2,3]" in text


def test_repr_and_counts(chain):
    assert chain.node_count() == 3
    assert chain.op_counts() == {"aten.add": 1, "aten.mul": 1, "aten.relu": 1}
    assert chain.param_count() == 0
    assert repr(chain) == "GraphIR(inputs=[x: float32[4,8]], outputs=['output'], nodes=3)"


# -- networkx view ---------------------------------------------------------------------------------
def test_nx_has_one_node_per_fx_node_and_an_edge_per_use():
    ir = capture(Square(), (torch.randn(2, 3),))
    g = ir.nx()
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {n.name for n in ir.graph.nodes}
    assert g.number_of_nodes() == len(ir.graph.nodes)
    uses = {(i.name, n.name) for n in ir.graph.nodes for i in n.all_input_nodes}
    assert set(g.edges) == uses
    mul = next(n for n in ir.graph.nodes if n.target == aten.mul.Tensor)
    attrs = g.nodes[mul.name]
    assert attrs["op"] == "call_function" and attrs["target"] == "aten.mul"
    assert attrs["shape"] == [2, 3] and attrs["dtype"] == "float32"
    assert attrs["provenance"] == "capture"


# -- analyses --------------------------------------------------------------------------------------
def test_live_nodes_leaves_out_dead_code(chain):
    ir = chain.copy()
    add = _node(ir, aten.add.Tensor)
    with ir.graph.inserting_after(add):
        dead = ir.graph.call_function(aten.neg.default, (add,))
    live = live_nodes(ir)
    assert dead.name not in live
    assert live == {"x", "add", "mul", "relu", "output"}
    assert dead.name in live_nodes(ir, keep={dead.name})


def test_live_nodes_keeps_unused_placeholders():
    class Ignores(torch.nn.Module):
        def forward(self, x, y):
            return x + 1

    ir = capture(Ignores(), (torch.randn(2), torch.randn(2)), method="symbolic_trace")
    assert {"x", "y"} <= live_nodes(ir)


def test_critical_path_length(chain):
    assert critical_path_length(chain) == 3
    ir = capture(Square(), (torch.randn(2, 3),))
    assert critical_path_length(ir) == 2  # mul → add; the input feeds both


def test_peak_activation_bytes_of_an_elementwise_chain(chain):
    # While computing mul, add's output (4*8 float32 = 128 bytes) and mul's output are both alive;
    # the same while computing relu. The graph input is not an activation.
    assert peak_activation_bytes(chain) == 2 * 4 * 8 * 4


def test_peak_activation_bytes_counts_dtype_size_and_long_lived_values():
    class Fanout(torch.nn.Module):
        def forward(self, x):
            a = x + 1          # alive until the last add
            b = a * 2
            c = b * 3
            return c + a

    ir = capture(Fanout(), (torch.randn(4, 8, dtype=torch.float64),))
    # a, b and c are all alive while computing c; 256 bytes each in float64
    assert peak_activation_bytes(ir) == 3 * 4 * 8 * 8


def test_peak_activation_bytes_skips_symbolic_dims():
    ir = capture(Chain3(), (torch.randn(4, 8),), dynamic={"x": {0: (1, 16)}})
    assert peak_activation_bytes(ir) == 0


# -- copy ------------------------------------------------------------------------------------------
def test_copy_is_independent(chain):
    before_text = chain.format()
    x = torch.randn(4, 8)
    (want,) = chain.run([x])

    c = chain.copy()
    add = _node(c, aten.add.Tensor)
    add.target = aten.sub.Tensor
    add.meta[PROVENANCE] = "mutator"
    c.inputs[0].shape[0] = 99
    c.out_structure["type"] = "tuple"
    c.meta["capture"] = "changed"
    c.recompile()

    assert chain.format() == before_text
    assert chain.inputs[0].shape == [4, 8]
    assert chain.out_structure["type"] == "tensor"
    assert chain.meta["capture"] == "torch.export"
    assert _node(chain, aten.add.Tensor).meta[PROVENANCE] == "capture"
    torch.testing.assert_close(chain.run([x])[0], want, rtol=0, atol=0)
    assert not torch.equal(c.run([x])[0], want)


def test_graph_and_graph_module_views(chain):
    assert chain.graph is chain.graph_module.graph
    assert isinstance(chain.graph_module, torch.fx.GraphModule)
    assert [p.name for p in chain.placeholders()] == ["x"]
    assert chain.output_node().op == "output"
    assert [n.name for n in chain.output_values()] == ["relu"]


def test_default_out_structure_is_a_tuple_of_the_outputs():
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    ir = GraphIR(gm, [TensorSpec("x", "float32", [2])], [TensorSpec("y", "float32", [2])])
    assert ir.out_structure == {"type": "tuple", "items": [{"type": "tensor", "index": 0, "name": "y"}]}


def test_tensor_spec_json_round_trip():
    s = TensorSpec("input_ids", "int64", ["batch", "seq"], {0: (1, 8), 1: (2, 512)})
    j = s.to_json()
    assert j["dynamic"] == {"0": [1, 8], "1": [2, 512]}
    assert TensorSpec.from_json(j) == s
    assert str(s) == "input_ids: int64[batch,seq]"


# -- structure -------------------------------------------------------------------------------------
def _is_tensor(x):
    return isinstance(x, torch.Tensor)


def test_flatten_unflatten_round_trips_nested_structures():
    t = [torch.full((1,), float(i)) for i in range(5)]
    obj = {"logits": t[0], "past": ((t[1], t[2]), [t[3], None]), "extra": {"h": t[4], "n": 3}}
    leaves, s = flatten(obj, _is_tensor)
    assert [float(x) for x in leaves] == [0.0, 1.0, 2.0, 3.0, 4.0]  # pytree order
    back = unflatten(s, leaves)
    assert back.keys() == obj.keys()
    assert isinstance(back["past"], tuple) and isinstance(back["past"][0], tuple)
    assert isinstance(back["past"][1], list) and back["past"][1][1] is None
    assert back["extra"]["n"] == 3
    assert all(a is b for a, b in zip(flatten(back, _is_tensor)[0], leaves))


def test_structure_is_json():
    import json

    _, s = flatten({"a": (torch.zeros(1), None), "b": [torch.zeros(1)]}, _is_tensor)
    assert json.loads(json.dumps(s)) == s


def test_leaf_names():
    obj = {"logits": 0, "past": ((0, 0), [0]), "hidden": [0, 0, 0]}
    _, s = flatten(obj, lambda x: x == 0 and not isinstance(x, bool))
    assert leaf_names(s) == ["logits", "past.0.0", "past.0.1", "past.1.0", "hidden.0", "hidden.1", "hidden.2"]
    _, s = flatten((1, 2), lambda x: isinstance(x, int))
    assert leaf_names(s) == ["output_0", "output_1"]
    _, s = flatten(7, lambda x: isinstance(x, int))
    assert leaf_names(s) == ["output"]


def test_flatten_rejects_what_it_cannot_represent():
    with pytest.raises(graphopt.CaptureError, match="non-string keys"):
        flatten({1: torch.zeros(1)}, _is_tensor)
    with pytest.raises(graphopt.CaptureError, match="cannot represent a set at top level"):
        flatten({1, 2}, _is_tensor)
    with pytest.raises(graphopt.CaptureError, match=r"at a\.0"):
        flatten({"a": (object(),)}, _is_tensor)


def test_unflatten_indexes_the_flat_leaves():
    _, s = flatten((torch.zeros(1), None, torch.ones(1)), _is_tensor)
    assert unflatten(s, ["a", "b"]) == ("a", None, "b")
    assert unflatten({"type": "none"}, []) is None
