"""tensor-parallel: the simulated graph (every rank's shard side by side) verified against the
original on three HF families, each rank's program cut from it holding 1/N of the sharded weights,
and the refusals (heads that do not divide, a target without collectives, a second run).

The multi-process runs (torchrun on gloo, identical greedy tokens) are tests/test_parallel.py."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import InputError, PassError, PassOptionError
from graphopt.parallel import ALL_GATHER, GATHER, REDUCE, SHARD, rank_ir
from tests.test_first_try import _model, _prompt

PIPE = "cleanup,fuse,kv-cache,tensor-parallel(world_size=2)"


def _examples(batch: int = 2, length: int = 8) -> dict:
    ids = _prompt(batch, length, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in the example
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def sharded(request):
    model = _model(request.param, seed=4)
    _, cached, _, _ = graphopt.optimize(model, _examples(), pipeline=PIPE.rsplit(",", 1)[0], verify=False)
    _, ir, report, _ = graphopt.optimize(model, _examples(), pipeline=PIPE)
    return request.param, cached, ir, report


def test_every_layer_is_sharded_and_verified(sharded):
    family, _, ir, report = sharded
    rec = report.passes[-1]
    assert rec["spec"].startswith("tensor-parallel") and rec["verify"]["passed"], rec["verify"]
    tp = ir.meta["tensor_parallel"]
    assert tp["world_size"] == 2 and list(tp["replicated"].values()) == ["the lm_head (vocab=replicated)"]
    assert len(tp["sharded"]) == 4  # 2 layers x (attention, MLP)
    assert sum(v.startswith("heads") for v in tp["sharded"].values()) == 2
    # each rank caches its own KV heads: the cache inputs and outputs are sharded on the head dim
    assert tp["sharded_inputs"] == {f"past_{k}_{i}": 1 for i in range(2) for k in ("key", "value")}
    assert tp["sharded_outputs"] == {f"present_{k}_{i}": 1 for i in range(2) for k in ("key", "value")}
    ops = [n.target for n in ir.graph.nodes if n.op == "call_function"]
    assert ops.count(REDUCE) == 4 and ops.count(GATHER) == 4 and ops.count(SHARD) == 8


def test_the_simulated_graph_equals_the_cached_graph_on_fresh_inputs(sharded):
    """Beyond the pass manager's check: a fresh batch of another size after a random past."""
    _, cached, ir, _ = sharded
    g = torch.Generator().manual_seed(11)
    batch, seq, past = 3, 4, 5
    inputs = []
    for spec in cached.inputs:
        shape = [batch if d == "batch" else seq if d == "seq" else past if d == "past" else d for d in spec.shape]
        if spec.name == "input_ids":
            inputs.append(torch.randint(0, 128, shape, generator=g))
        elif spec.dtype.startswith("int"):
            inputs.append(torch.ones(shape, dtype=torch.int64))
        else:
            inputs.append(torch.randn(shape, generator=g))
    for want, got in zip(cached.run(inputs), ir.run(inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_each_rank_holds_half_the_sharded_weights(sharded):
    family, _, ir, _ = sharded
    ranks = [rank_ir(ir, r) for r in range(2)]
    sharded_names = [n for n in ir.graph_module.state_dict() if "_tp" in n]
    sharded_total = sum(ir.graph_module.state_dict()[n].numel() for n in sharded_names)
    replicated = ir.param_count() - sharded_total
    for r, rank in enumerate(ranks):
        assert rank.param_count() == replicated + sharded_total // 2, family
        names = rank.graph_module.state_dict()
        assert all(n.endswith(f"_tp{r}") for n in names if "_tp" in n)  # its own shards only
        ops = [n.target for n in rank.graph.nodes if n.op == "call_function"]
        assert torch.ops._c10d_functional.all_reduce.default in ops
        assert not any(t in (REDUCE, GATHER, SHARD) for t in ops)
        past = next(s for s in rank.inputs if s.name == "past_key_0")
        assert past.shape[1] * 2 == next(s for s in ir.inputs if s.name == "past_key_0").shape[1]


def test_heads_that_do_not_divide_are_refused():
    model = _model("llama")  # 2 KV heads
    with pytest.raises(PassError, match=r"self_attn has 2 KV-head groups .* which 4 ranks do not divide"):
        graphopt.optimize(model, _examples(), pipeline="cleanup,fuse,kv-cache,tensor-parallel(world_size=4)",
                          verify=False)


def test_world_size_one_is_an_option_error():
    with pytest.raises(PassOptionError, match="at least 2 ranks"):
        graphopt.optimize(_model("llama"), _examples(), pipeline="cleanup,fuse,tensor-parallel(world_size=1)")


def test_targets_without_collectives_are_refused_before_capture(tmp_path):
    with pytest.raises(InputError, match="--target torch"):
        graphopt.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), pipeline="tensor-parallel", target="onnx",
                         out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_pipeline_order_and_requirements_are_resolved():
    """Written first, it still runs after fusion and kv-cache (runs_after), and without fuse written,
    fuse-attention is put in front of it (requires_passes); no kv-cache: nothing is sharded at the edges."""
    _, ir, report, _ = graphopt.optimize(_model("qwen2"), _examples(), verify=False,
                                         pipeline="tensor-parallel(world_size=2),cleanup,fuse,kv-cache")
    specs = [r["spec"] for r in report.passes]
    assert specs.index("kv-cache") < specs.index("tensor-parallel")
    _, ir, report, _ = graphopt.optimize(_model("gpt2"), _examples(), pipeline="cleanup,tensor-parallel")
    specs = [r["spec"] for r in report.passes]
    assert "fuse-attention" in specs and report.passes[-1]["verify"]["passed"]
    assert ir.meta["tensor_parallel"]["sharded_inputs"] == {} and len(ir.meta["tensor_parallel"]["sharded"]) == 4


def test_weight_only_quantization_after_it_scales_each_shard():
    _, ir, report, _ = graphopt.optimize(_model("llama"), _examples(),
                                         pipeline=PIPE + ",quantize(scheme=int8-weight)")
    assert [r["spec"] for r in report.passes][-2:] == ["tensor-parallel", "quantize(scheme=int8-weight)"]
    assert report.passes[-1]["verify"]["passed"]
    rank = rank_ir(ir, 1)
    ints = [n for n, t in rank.graph_module.state_dict().items() if t.dtype == torch.int8]
    assert ints and all("tp1" in n for n in ints if "layers" in n), ints


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vocab_sharding_splits_the_lm_head_and_its_tied_table(family):
    """vocab=sharded: the lm_head's rows and the (tied) embedding table split by vocabulary; the
    logits all-gathered (whole on every rank), the lookup masked and all-reduced; a rank holds half
    of nearly everything (the norms and GPT-2's position table stay whole)."""
    model = _model(family, seed=5)
    _, ir, report, _ = graphopt.optimize(model, _examples(), pipeline=PIPE[:-1] + ",vocab=sharded)")
    assert report.passes[-1]["verify"]["passed"]
    tp = ir.meta["tensor_parallel"]
    assert not tp["replicated"] and "logits" not in tp["sharded_outputs"]
    assert sum("vocabulary 128 -> 64" in v for v in tp["sharded"].values()) == 1
    assert sum("embedding rows 128 -> 64" in v for v in tp["sharded"].values()) == 1
    ops = [n.target for n in ir.graph.nodes if n.op == "call_function"]
    assert ops.count(ALL_GATHER) == 1
    full = sum(t.numel() for t in model.state_dict().values() if t.dim() == 2)
    for r in range(2):
        rank = rank_ir(ir, r)
        tables = sum(t.numel() for n, t in rank.graph_module.state_dict().items() if t.dim() == 2)
        small = sum(t.numel() for n, t in rank.graph_module.state_dict().items() if "_tp" not in n)
        assert tables - small <= full // 2 and small < full // 10, (tables, small, full)  # norms, GPT-2 positions
        gathers = [n for n in rank.graph.nodes if n.target is torch.ops._c10d_functional.all_gather_into_tensor.default]
        assert len(gathers) == 1


def test_a_static_cache_is_sharded_with_its_heads():
    """kv-cache(static=true) writes the new keys into the cache inputs with index_copy: each rank's
    buffers hold its own KV heads, as with the dynamic cache."""
    _, ir, report, _ = graphopt.optimize(_model("llama"), _examples(),
                                         pipeline="cleanup,fuse,kv-cache(static=true,max_len=32),tensor-parallel")
    assert report.passes[-1]["verify"]["passed"]
    tp = ir.meta["tensor_parallel"]
    assert sum(v.startswith("heads") for v in tp["sharded"].values()) == 2
    assert tp["sharded_inputs"] == {f"past_{k}_{i}": 1 for i in range(2) for k in ("key", "value")}


def test_phi3_fused_qkv_sliced_and_gate_up_chunked():
    """Phi-3 computes Q, K and V with one qkv_proj cut by constant slices, and gate/up with one
    gate_up_proj cut by chunk: the slices tile the dim, so they shard like a split."""
    import transformers as tf

    cfg = tf.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
                        attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    model = tf.Phi3ForCausalLM(cfg).eval()
    _, ir, report, _ = graphopt.optimize(model, {"input_ids": _prompt(1, 6)}, pipeline="cleanup,fuse,kv-cache,tensor-parallel")
    assert report.passes[-1]["verify"]["passed"]
    tp = ir.meta["tensor_parallel"]
    assert sorted(tp["sharded"].values()) == ["channels 128 -> 64 per rank"] * 2 + ["heads 2 -> 1 per rank"] * 2
    slices = [n for n in rank_ir(ir, 0).graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[1] == 2]
    assert [tuple(n.args[2:4]) for n in slices][:3] == [(0, 32), (32, 48), (48, 64)]  # rank 0's q, k, v
