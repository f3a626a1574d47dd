"""Capture of a stack of identical layers by tracing two (graphopt/capture_layers.py): the graph
equals the one torch.export traces layer by layer, runs like the model on other inputs, binds every
layer to the model's own weights, and models whose layers differ are traced whole."""

from __future__ import annotations

import collections

import pytest
import torch

from graphopt.capture import capture
from graphopt.capture_layers import ENV, find_layer_stack

DYN = {"input_ids": {0: (1, 8), 1: (1, 64)}, "attention_mask": {0: (1, 8), 1: (1, 64)}}


def _hf(family: str, layers: int = 5, **kw):
    import transformers as tf

    common = dict(vocab_size=96, use_cache=False, attn_implementation="sdpa")
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, **common, **kw)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, **common, **kw)
        cls = tf.Qwen2ForCausalLM
    else:
        cfg = tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common, **kw)
        cls = tf.GPT2LMHeadModel
    torch.manual_seed(0)
    return cls(cfg).eval()


def _example(batch: int = 2, seq: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 96, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _ops(ir) -> collections.Counter:
    return collections.Counter(str(n.target) for n in ir.graph.nodes if n.op == "call_function")


def _repeated(ir) -> bool:
    return any("repeated layer 1's graph" in n for n in ir.meta.get("capture_notes", []))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_repeated_capture_is_the_layer_by_layer_graph(family, monkeypatch):
    model = _hf(family)
    ir = capture(model, _example(), DYN)
    assert _repeated(ir), ir.meta.get("capture_notes")
    monkeypatch.setenv(ENV, "0")
    whole = capture(model, _example(), DYN)
    assert not _repeated(whole)
    assert _ops(ir) == _ops(whole)
    assert ir.node_count() == whole.node_count()

    # every layer reads its own weights, the model's tensors themselves (nothing copied)
    own = {p.data_ptr() for p in model.parameters()}
    used = {t.data_ptr() for t in ir.graph_module.parameters()}
    assert used == own
    targets = {str(n.target) for n in ir.graph.nodes if n.op == "get_attr"}
    path, layers = find_layer_stack(model)
    for i in range(len(layers)):
        assert any(t.startswith(f"{path}.{i}.") for t in targets), i

    # other shapes, left padding, fresh random tokens: the graph computes what the model does
    x = _example(batch=3, seq=9, seed=7)
    x["attention_mask"][1, :4] = 0
    with torch.no_grad():
        want = model(**x).logits
    got = ir.run([x[n] for n in ir.input_names])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_repeated_capture_stays_symbolic_and_propagates_once_per_layer_shape():
    model = _hf("llama", layers=6)
    ir = capture(model, _example(), DYN)
    assert _repeated(ir)
    out = ir.graph.find_nodes(op="output")[0].args[0][0]
    assert [str(s) for s in out.meta["val"].shape][:2] != ["2", "6"]  # batch and sequence stay symbolic
    from graphopt.ir.shapes import propagate_shapes

    before = {n.name: [str(s) for s in n.meta["val"].shape] for n in ir.graph.nodes
              if isinstance(n.meta.get("val"), torch.Tensor)}
    every = {id(n) for n in ir.graph.nodes}
    propagate_shapes(ir, dirty=every)  # recompute all: the memo of repeated layers gives the same shapes
    after = {n.name: [str(s) for s in n.meta["val"].shape] for n in ir.graph.nodes
             if isinstance(n.meta.get("val"), torch.Tensor)}
    assert after == before


def test_layers_that_differ_in_config_are_traced_whole():
    # Qwen2 with a sliding window on layers from 2 on: config.layer_types is not uniform
    model = _hf("qwen2", layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert len(set(model.config.layer_types)) == 2
    ir = capture(model, _example(seq=8), DYN)
    assert not _repeated(ir)
    x = _example(batch=2, seq=10, seed=3)
    with torch.no_grad():
        want = model(**x).logits
    torch.testing.assert_close(ir.run([x[n] for n in ir.input_names])[0], want, rtol=1e-5, atol=1e-5)


class _Block(torch.nn.Module):
    def __init__(self, idx: int, late: int):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.double = idx >= late  # code that differs from layer ``late`` on

    def forward(self, x):
        y = torch.relu(self.lin(x))
        return x + (2 * y if self.double else y)


class _Stack(torch.nn.Module):
    def __init__(self, late: int, n: int = 5):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(i, late) for i in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("late", [1, 3], ids=["differs-in-layer-1", "differs-from-layer-3"])
def test_layers_whose_code_differs_are_traced_whole(late, caplog):
    torch.manual_seed(0)
    model = _Stack(late).eval()
    x = torch.randn(3, 8)
    with caplog.at_level("INFO", logger="graphopt.capture_layers"):
        ir = capture(model, (x,), {"x": {0: (1, 16)}})
    assert not _repeated(ir)
    # layer 1 differing is seen in the graphs; layers 3.. differing only by comparing with the model
    assert ("graphs of layers 0 and 1 differ" in caplog.text) if late == 1 else ("differs from the model" in caplog.text)
    x2 = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ir.run([x2])[0], model(x2))


def test_uniform_plain_stack_is_repeated_and_model_is_restored():
    torch.manual_seed(0)
    model = _Stack(late=99).eval()
    blocks = model.blocks
    ir = capture(model, (torch.randn(3, 8),), {"x": {0: (1, 16)}})
    assert _repeated(ir)
    assert model.blocks is blocks and len(model.blocks) == 5  # the cut is undone
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(ir.run([x])[0], model(x))


def test_hf_config_is_restored():
    model = _hf("qwen2", layers=4)
    before = (model.config.num_hidden_layers, list(model.config.layer_types), len(model.model.layers))
    capture(model, _example(), DYN)
    assert (model.config.num_hidden_layers, list(model.config.layer_types), len(model.model.layers)) == before
