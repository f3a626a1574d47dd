"""The lowering's ExportedProgram takes the graph's own symbolic values (graphopt.backends.export
``_reusable_values``) when no pass has specialised a dim: the kv-cache pass gives its cache inputs
a symbolic past length in the capture's shape environment, so a cached decoder lowers without a
second symbolic propagation. A graph whose dims a pass constrained takes the full propagation."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.backends import export as export_mod
from graphopt.capture import capture
from graphopt.compiler import optimize

VOCAB = 128


def _llama(seed: int = 0):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cached(model):
    ids = _ids(2, 12, 0)
    ir = capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                 dynamic={n: {0: (1, 4), 1: (1, 64)} for n in ("input_ids", "attention_mask")})
    return optimize(ir, pipeline="cleanup,fuse,kv-cache", verify=False)[1]


def test_the_cache_inputs_have_a_symbolic_past_length():
    ir = _cached(_llama())
    vals = {p.name: p.meta["val"] for p in ir.placeholders()}
    batch, past = vals["past_key_0"].shape[0], vals["past_key_0"].shape[2]
    assert isinstance(past, torch.SymInt) and isinstance(batch, torch.SymInt)
    assert str(batch) == str(vals["input_ids"].shape[0])  # the ids' batch symbol
    assert str(vals["past_attention_mask"].shape[1]) == str(past)
    assert str(past) not in (str(s) for s in vals["input_ids"].shape)
    logits = ir.output_values()[0].meta["val"]  # every shape downstream is symbolic in the past
    assert [str(s) for s in logits.shape[:2]] == [str(s) for s in vals["input_ids"].shape]
    present = ir.output_values()[-1].meta["val"]
    assert str(past) in str(present.shape[2])


def test_a_cached_decoder_lowers_from_its_own_values(tmp_path, monkeypatch):
    """The compile's lowering builds its program from the graph's values (no new propagation),
    and the artifact decodes as the model does for prompts of other lengths and batches."""
    model = _llama()
    ir = _cached(model)
    assert export_mod._reusable_values(ir) is not None
    seen = []

    def spy(ir):
        seen.append(found := reusable(ir))
        return found

    reusable = export_mod._reusable_values
    monkeypatch.setattr(export_mod, "_reusable_values", spy)
    ids = _ids(2, 12, 0)
    art = graphopt.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           pipeline="cleanup,fuse,kv-cache", target="onnx", out=tmp_path / "a", report=None,
                           dynamic={n: {0: (1, 4), 1: (1, 64)} for n in ("input_ids", "attention_mask")})
    assert len(seen) == 1 and seen[0] is not None
    assert art.report["lowering"]["verify"]["passed"]
    eng = graphopt.load(art.path)
    for batch, length, seed in ((1, 5, 3), (3, 9, 4)):
        prompt = _ids(batch, length, seed)
        seq = prompt
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(eng.generate(prompt, max_new_tokens=12), seq)


def test_a_constrained_dim_takes_the_full_propagation():
    """A guard added after capture (here a pass's propagation learning ``seq != 7``, a fact
    about a declared dim) means the capture's values may not hold for every declared size."""
    ir = _cached(_llama())
    assert export_mod._reusable_values(ir) is not None
    seq = ir.placeholders()[0].meta["val"].shape[1]
    assert bool(seq != 7)  # a guard in the capture's shape environment
    assert export_mod._reusable_values(ir) is None
    ep = export_mod.program_from_ir(ir)  # the full propagation still builds the program
    assert {(int(r.lower), int(r.upper)) for r in ep.range_constraints.values()} == {(1, 4), (1, 64), (0, 63)}


@pytest.mark.parametrize("fact", ["narrowed", "merged"])
def test_specialised_dims_are_not_reused(fact):
    ir = _cached(_llama())
    env = ir.placeholders()[0].meta["val"].fake_mode.shape_env
    ids = ir.placeholders()[0].meta["val"]
    if fact == "narrowed":
        from torch.utils._sympy.value_ranges import ValueRanges

        sym = ids.shape[1].node.expr
        env.var_to_range[sym] = ValueRanges(2, 32)  # below the declared 64
    else:  # the batch and sequence dims one symbol
        ir.inputs[0].shape[0] = ir.inputs[0].shape[1]
        ir.inputs[0].dynamic[0] = ir.inputs[0].dynamic[1]
    assert export_mod._reusable_values(ir) is None
