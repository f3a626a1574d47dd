"""fold-constants: Input → expected ops, bit-identical outputs on fresh inputs, a tiny Llama."""

from __future__ import annotations

import torch
from graphopt_cleanup.fold_constants import FoldConstants
from torch import nn

from graphopt.capture import capture
from graphopt.ir.analysis import live_nodes
from graphopt.passes.base import PassContext


class Consts(nn.Module):
    """Weight-only subgraphs and input-free tensors (fold) next to a broadcast and a random op
    (stay)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(128, 128, generator=g))    # 64 KiB
        self.register_buffer("qweight", torch.randint(-128, 127, (16, 128), generator=g).to(torch.int8))
        self.register_buffer("scale", torch.rand(16, 1, generator=g) + 0.5)
        self.register_buffer("row", torch.randn(1, 256, generator=g))      # 1 KiB

    def forward(self, x):                                       # x: [4, 128]
        y = x @ self.weight.t()                                 # t(weight): same size, folds
        deq = self.qweight.to(torch.float32) * self.scale        # small dequantize: folds
        z = x @ deq.t()
        pos = torch.arange(16, dtype=torch.float32)              # no tensor inputs: folds
        pos_again = torch.arange(16, dtype=torch.float32)        # same value: shares the buffer
        wide = self.row.expand(256, 256) * x.mean()              # 256 KiB from 1 KiB: stays lazy
        return y, z + pos + pos_again, wide


def _inputs(seed: int) -> list[torch.Tensor]:
    return [torch.randn(4, 128, generator=torch.Generator().manual_seed(seed))]


def _captured():
    return capture(Consts(), tuple(_inputs(0)))


def _folded_buffers(ir) -> set[str]:
    return {n.target for n in ir.graph.nodes if n.op == "get_attr" and n.target.startswith("_folded_")}


def test_expected_ops_after():
    ir = _captured()
    assert {"aten.t", "aten.to", "aten.arange", "aten.expand"} <= set(ir.op_counts())

    result = FoldConstants().run(ir, PassContext())

    counts = ir.op_counts()
    for op in ("aten.t", "aten.to", "aten.arange"):
        assert op not in counts, op
    assert counts["aten.expand"] == 1 and counts["aten.mul"] == 1  # the broadcast stays lazy
    assert result.stats["folded"] == 4                 # t(weight), t(deq), arange x2
    assert len(_folded_buffers(ir)) == 3               # the two aranges share one buffer
    state = ir.graph_module.state_dict()
    assert "weight" not in state and "scale" not in state   # nothing reads them any more
    assert "row" in state
    assert "qweight" in state  # an _assert_tensor_metadata still reads it: remove-noops drops that
    assert result.stats["bytes_added"] == 128 * 128 * 4 + 16 * 128 * 4 + 16 * 4


def test_outputs_bit_identical_on_fresh_inputs(same_outputs):
    original = _captured()
    ir = original.copy()
    FoldConstants().run(ir, PassContext())
    for seed in (1, 2, 3):
        same_outputs(original, ir, _inputs(seed))


def test_random_and_symbolic_nodes_stay():
    class Positions(nn.Module):
        def forward(self, x):                                    # x: [seq, 4]
            static = torch.arange(4, dtype=torch.float32)        # folds
            dynamic = torch.arange(x.shape[0], dtype=torch.float32)  # symbolic size: stays
            noise = torch.rand(4)                                # random: stays
            return x + static + dynamic[:, None], noise

    ir = capture(Positions(), (torch.randn(6, 4),), dynamic={"x": {0: (2, 32)}})
    result = FoldConstants().run(ir, PassContext())
    assert result.stats["folded"] == 1
    assert ir.op_counts()["aten.arange"] == 1 and ir.op_counts()["aten.rand"] == 1


def test_rewrite_limit_allows_exactly_one_rewrite():
    ir = _captured()
    ctx = PassContext(rewrite_limit=1)
    result = FoldConstants().run(ir, ctx)
    assert result.stats["folded"] == 1 and ctx.rewrites == 1
    assert len(_folded_buffers(ir)) == 1


def test_tiny_llama(tiny_llama, same_outputs):
    original = tiny_llama.ir
    ir = original.copy()
    result = FoldConstants().run(ir, PassContext())

    before, after = original.op_counts(), ir.op_counts()
    # static shapes: the causal mask and the rotary cos/sin tables are constants
    for op in ("aten.cos", "aten.sin", "aten.le", "aten.new_ones", "aten.zeros"):
        assert op in before and op not in after, op
    # what is left of the input-free aranges is dead code (capture keeps an unused arange(1)
    # chain), left to eliminate-dead-code
    live = live_nodes(ir)
    assert after["aten.arange"] == 1
    assert all(n.name not in live for n in ir.call_nodes() if str(n.target).startswith("aten.arange"))
    assert result.stats["folded"] > 0 and 0 < result.stats["bytes_added"] < 64 * 1024
    assert ir.node_count() < original.node_count()
    for seed in (1, 2):
        same_outputs(original, ir, tiny_llama.inputs(seed))
