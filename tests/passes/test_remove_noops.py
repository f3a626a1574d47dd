"""remove-noops: Input → expected ops, bit-identical outputs on fresh inputs, a tiny Llama."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from graphopt_cleanup.remove_noops import RemoveNoops
from torch import nn

from graphopt.capture import capture
from graphopt.ir.graph_ir import GraphIR
from graphopt.passes.base import PassContext

aten = torch.ops.aten


class Noops(nn.Module):
    """Every line of the first block computes nothing; the second block must survive."""

    def forward(self, x, n):
        a = x.to(torch.float32).view(4, 8).reshape(4, 8).expand(4, 8)   # to, view, reshape, expand
        b = (a[:, 0:] * 1 + 0) / 1                                      # alias, mul, add, div
        c = F.dropout(b.clone().detach(), 0.5, training=False)           # clone, detach, dropout
        d = c.transpose(0, 1).transpose(0, 1)                           # transpose pair
        e = aten.slice.Tensor(d, 1, 0, 100) ** 1                        # full slice, pow

        flat = x.transpose(0, 1).contiguous().view(-1)  # view needs the contiguous copy
        return (e.relu(), flat, x.to(torch.float16),    # a real cast
                n * 1.0,                                # int64 * 1.0 promotes to float32
                x[:, 1:],                               # a real slice
                x.view(8, 4))                           # a real reshape


def _inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=g), torch.randint(-100, 100, (4, 8), generator=g)]


def _captured():
    return capture(Noops(), tuple(_inputs(0)))


def test_expected_ops_after():
    ir = _captured()
    before = ir.op_counts()
    assert before["aten._assert_tensor_metadata"] == 2 and before["aten.dropout"] == 1

    result = RemoveNoops().run(ir, PassContext())

    assert result.changed
    # the first transpose of the pair is dead now: eliminate-dead-code sweeps it up
    assert ir.op_counts() == {"aten.transpose": 2, "aten.view": 2, "aten.contiguous": 1, "aten.mul": 1,
                              "aten.relu": 1, "aten.slice": 1, "aten.to": 1}
    kept = {str(n.target) for n in ir.call_nodes()}
    assert "aten.to.dtype" in kept  # the float16 cast
    assert result.stats["removed"] == sum(result.stats["removed_by_op"].values()) == 16
    assert result.stats["removed_by_op"]["aten._assert_tensor_metadata"] == 2


def test_second_run_finds_nothing():
    ir = _captured()
    RemoveNoops().run(ir, PassContext())
    again = RemoveNoops().run(ir, PassContext())
    assert not again.changed and again.stats == {"removed": 0}


def test_outputs_bit_identical_on_fresh_inputs(same_outputs):
    original = _captured()
    ir = original.copy()
    RemoveNoops().run(ir, PassContext())
    for seed in (1, 2, 3):
        same_outputs(original, ir, _inputs(seed))


def test_symbolic_shapes_compare_by_expression(same_outputs):
    class Views(nn.Module):
        def forward(self, x):
            same = x.view(x.shape[0], -1).expand(x.shape[0], 8)   # [s0, 8] -> [s0, 8]
            return same * 2, x.reshape(-1), x[: x.shape[0]]        # [s0*8] differs; full slice

    g = torch.Generator().manual_seed(0)
    original = capture(Views(), (torch.randn(6, 8, generator=g),), dynamic={"x": {0: (2, 32)}})
    ir = original.copy()
    result = RemoveNoops().run(ir, PassContext())

    assert result.stats["removed_by_op"].get("aten.view") == 1
    assert result.stats["removed_by_op"].get("aten.expand") == 1
    assert "aten.reshape" in ir.op_counts()
    same_outputs(original, ir, [torch.randn(11, 8, generator=g)])


def test_rewrite_limit_allows_exactly_one_rewrite():
    ir = _captured()
    before = ir.node_count()
    ctx = PassContext(rewrite_limit=1)
    result = RemoveNoops().run(ir, ctx)
    assert result.stats["removed"] == 1 and ctx.rewrites == 1
    assert ir.node_count() == before - 1


def test_tiny_llama(tiny_llama, same_outputs):
    original = tiny_llama.ir
    ir = original.copy()
    result = RemoveNoops().run(ir, PassContext())

    before, after = original.op_counts(), ir.op_counts()
    for op in ("aten._assert_tensor_metadata", "aten.dropout", "aten.alias"):
        assert op in before and op not in after, op
    casts = [n for n in ir.call_nodes() if n.target.overloadpacket is aten.to]
    assert len(casts) == 2  # attention_mask int64 -> bool, positions int64 -> float32
    assert all(n.args[0].meta["val"].dtype != n.meta["val"].dtype for n in casts)
    assert ir.node_count() == original.node_count() - result.stats["removed"]
    assert result.stats["removed_by_op"]["aten.mul"] >= 1  # cos * attention_scaling(1.0)
    for seed in (1, 2):
        same_outputs(original, ir, tiny_llama.inputs(seed))


def test_scalar_identities_never_change_dtype_or_values():
    """x op s for every dtype x scalar x op: removed only when the result is bit-identical to x."""
    g = torch.Generator().manual_seed(7)
    samples = {torch.float32: torch.randn(3, 4, generator=g), torch.float16: torch.randn(3, 4, generator=g).half(),
               torch.bfloat16: torch.randn(3, 4, generator=g).bfloat16(),
               torch.int64: torch.randint(-9, 9, (3, 4), generator=g), torch.int32: torch.randint(-9, 9, (3, 4), generator=g).int(),
               torch.bool: torch.rand(3, 4, generator=g) > 0.5}
    ops = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar]
    for dtype, x in samples.items():
        for op in ops:
            for scalar in (0, 1, 0.0, 1.0, True, False):
                graph = torch.fx.Graph()
                p = graph.placeholder("x")
                graph.output((graph.call_function(op, (p, scalar)),))
                try:
                    expected = op(x, scalar)
                except RuntimeError:
                    continue  # bool - bool and friends: not valid ATen
                ir = GraphIR(torch.fx.GraphModule(torch.nn.Module(), graph), [], [], example_inputs=[x])
                ir.propagate_shapes()
                removed = RemoveNoops().run(ir, PassContext()).stats["removed"]
                got = ir.run([x])[0]
                case = f"{op}({dtype}, {scalar!r})"
                torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=case)
                assert removed == int(got is x), case
