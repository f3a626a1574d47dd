"""eliminate-common-subexpressions: Input → expected ops, bit-identical outputs on fresh inputs,
a tiny Llama."""

from __future__ import annotations

import torch
from graphopt_cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from torch import nn

from graphopt.capture import capture
from graphopt.passes.base import PassContext


class Repeats(nn.Module):
    """Duplicates that merge next to look-alikes that must not."""

    def forward(self, x, n):
        twice = torch.sin(x) * torch.sin(x)              # sin twice -> once
        chained = (x + 1).exp() - (x + 1).exp()           # add and exp twice -> once each
        noise = torch.rand_like(x) - torch.rand_like(x)   # two samples: never merged
        ints = n + 1, n + 1.0                             # int64 vs float32 result: kept apart
        signs = x * 0.0, x * -0.0                         # -0.0 is not 0.0: kept apart
        return twice, chained, noise, *ints, *signs


def _inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=g), torch.randint(-100, 100, (4, 8), generator=g)]


def _captured():
    return capture(Repeats(), tuple(_inputs(0)))


def test_expected_ops_after():
    ir = _captured()
    before = ir.op_counts()
    assert before["aten.sin"] == 2 and before["aten.exp"] == 2 and before["aten.rand_like"] == 2

    result = EliminateCommonSubexpressions().run(ir, PassContext())

    counts = ir.op_counts()
    assert counts["aten.sin"] == 1 and counts["aten.exp"] == 1
    assert counts["aten.add"] == before["aten.add"] - 1      # x + 1 merged; n + 1, n + 1.0 not
    assert counts["aten.rand_like"] == 2
    assert counts["aten.mul"] == before["aten.mul"]          # x * 0.0 and x * -0.0 stay apart
    assert result.stats == {"merged": 3}
    assert EliminateCommonSubexpressions().run(ir, PassContext()).stats == {"merged": 0}


def test_outputs_bit_identical_on_fresh_inputs(same_outputs):
    original = _captured()
    ir = original.copy()
    EliminateCommonSubexpressions().run(ir, PassContext())
    for seed in (1, 2, 3):
        inputs = _inputs(seed)
        torch.manual_seed(seed)  # the same random stream for both runs: rand_like was not merged
        expected = original.run(inputs)
        torch.manual_seed(seed)
        got = ir.run(inputs)
        for x, y in zip(expected, got):
            assert x.dtype == y.dtype and torch.equal(x, y)
        assert not torch.equal(got[2], torch.zeros_like(got[2]))  # two different samples


def test_rewrite_limit_allows_exactly_one_rewrite():
    ir = _captured()
    ctx = PassContext(rewrite_limit=1)
    result = EliminateCommonSubexpressions().run(ir, ctx)
    assert result.stats == {"merged": 1} and ctx.rewrites == 1


def test_tiny_llama(tiny_llama, same_outputs):
    original = tiny_llama.ir
    ir = original.copy()
    result = EliminateCommonSubexpressions().run(ir, PassContext())

    # HF builds arange(seq) three times (positions, mask rows, mask columns)
    assert ir.op_counts()["aten.arange"] < original.op_counts()["aten.arange"]
    aranges = [(n.args, tuple(n.kwargs.items())) for n in ir.call_nodes() if str(n.target).startswith("aten.arange")]
    assert len(aranges) == len(set(map(repr, aranges)))
    assert ir.node_count() == original.node_count() - result.stats["merged"]
    assert EliminateCommonSubexpressions().run(ir, PassContext()).stats == {"merged": 0}
    for seed in (1, 2):
        same_outputs(original, ir, tiny_llama.inputs(seed))
