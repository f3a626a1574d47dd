"""In-place slot buffers (graphopt.serving.slots) on families that are not the samples: each
request's greedy tokens under the scheduler equal ``Engine.generate`` on its prompt alone, with the
slot graph derived from the artifact (GPT-2: learned positions, one merged QKV; Qwen2: biased
projections, an untied lm_head; Gemma: one KV head for four query heads); weights in an external
data file; and the artifacts the slots do not serve fall back to the appended cache, saying why."""

from __future__ import annotations

import logging
import random

import pytest
import torch

import graphopt
from graphopt.backends.onnx import DATA_FILE
from graphopt.errors import InputError
from graphopt.serving.scheduler import Scheduler

from .conftest import VOCAB
from .test_scheduler import _on_calls, _run_all


def _family(name: str):
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128))
    elif name == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                                   max_position_embeddings=128, tie_word_embeddings=False))
    else:  # gemma: one KV head for four query heads, scaled embeddings
        model = tf.GemmaForCausalLM(tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                                   vocab_size=VOCAB, max_position_embeddings=128))
    model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # clear greedy choices, no near ties
    return model


def _compile(model, out, **options):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    graphopt.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                     pipeline="cleanup,fuse,kv-cache", target=options.pop("target", "onnx"), out=out, report=None,
                     dynamic={n: {0: (1, 4), 1: (1, 96)} for n in ("input_ids", "attention_mask")}, **options)
    return out


def _requests(n: int, seed: int):
    rng = random.Random(seed)
    return [([rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 30))], rng.randint(1, 12)) for _ in range(n)]


def _decode_as_each_alone(path, **kw):
    engine = graphopt.load(path)
    scheduler = Scheduler(engine, max_batch=4, max_tokens_per_step=16, cache="slots", **kw)
    calls = []
    _on_calls(scheduler.batch, lambda ids: calls.append(tuple(ids.shape)))
    scheduler.start()
    reqs = _requests(16, seed=3)
    try:
        got = _run_all(scheduler, reqs)
    finally:
        assert scheduler.stop(10)
    for (prompt, n), c in zip(reqs, got):
        assert c.tokens == engine.generate(torch.tensor([prompt]), n)[0, len(prompt):].tolist()
    assert any(b > 1 and s == 1 for b, s in calls)  # rows decoded together
    assert scheduler.state()["cache_bytes"] == 0  # the buffers went with the last row


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma"])
def test_other_families_decode_as_each_alone_from_slots(tmp_path, family):
    _decode_as_each_alone(_compile(_family(family), tmp_path / family))


def test_weights_in_an_external_data_file(tmp_path):
    art = _compile(_family("qwen2"), tmp_path / "ext", target_options={"external_data": True})
    assert (art / DATA_FILE).is_file()
    _decode_as_each_alone(art)


def _falls_back(engine, caplog, why: str) -> None:
    """``cache="auto"`` serves from the appended cache and logs ``why``; ``cache="slots"`` refuses
    with it."""
    with caplog.at_level(logging.WARNING, logger="graphopt.serving.scheduler"):
        scheduler = Scheduler(engine, max_batch=1)
    assert scheduler.state()["cache"] == "concat"
    assert why in caplog.text
    with pytest.raises(InputError, match=f"cannot be served from in-place slot buffers: {why}"):
        Scheduler(engine, max_batch=1, cache="slots")


def test_what_the_slots_cannot_serve_falls_back_saying_why(llama_torch_artifact, caplog):
    engine = graphopt.load(llama_torch_artifact)
    _falls_back(engine, caplog, "the torch target runs its own program")
    with pytest.raises(InputError, match="cache must be auto, slots or concat"):
        Scheduler(engine, max_batch=2, cache="paged")


def test_a_slot_graph_that_fails_its_probe_is_not_used(llama_artifact, monkeypatch, caplog):
    """Whatever goes wrong in the slot graph at start-up (here: its first call raises), the server
    serves from the artifact's own cache, and says so; with --cache slots it refuses."""
    from graphopt.serving.slots import SlotBatch

    def broken(self, *args):
        raise RuntimeError("injected: ONNX Runtime refused the slot graph")

    monkeypatch.setattr(SlotBatch, "_run", broken)
    _falls_back(graphopt.load(llama_artifact), caplog, "the slot graph failed on a probe: RuntimeError: injected")
