"""The committed tinyshakespeare decoder (``samples/models/shakespeare.py``): it loads offline,
reproduces the held-out perplexity recorded at training time, and writes Shakespeare-like text.

Needs ``../shared/data/tinyshakespeare.txt`` (the held-out split); skips when it is absent.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from graphopt.verify.metrics import heldout_perplexity


@pytest.fixture(scope="module")
def sm(sample_models):
    """``samples/models/shakespeare.py``; skips the module when the shared data is absent."""
    module = sample_models.load("shakespeare")
    if not module.DATA_PATH.is_file():
        pytest.skip(
            f"tinyshakespeare data absent: {module.DATA_PATH} (../shared/data relative to the repo root) "
            "holds the held-out split these tests evaluate on"
        )
    return module

# Function words any English text is full of; a trained model's greedy continuation uses several.
COMMON_WORDS = {
    "the", "and", "i", "to", "of", "a", "you", "my", "that", "in", "is", "not", "me", "it", "for", "with",
    "be", "your", "his", "this", "he", "but", "have", "as", "thou", "so", "will", "what", "her", "thy",
    "we", "all", "no", "do", "shall", "him", "our", "are", "by", "on", "if", "or", "lord", "good", "now",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small forwards (greedy decoding) on a 2-core machine shared with other work: two
    OpenMP threads spin-wait on each other and were ~10-50x slower than one. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(sm):
    return sm.build()


@pytest.fixture(scope="module")
def record(sm) -> dict:
    return json.loads((sm.CHECKPOINT_DIR / "training.json").read_text())


def test_checkpoint_is_complete_and_small(sample_models):
    checkpoint_dir = sample_models.load("shakespeare").CHECKPOINT_DIR
    files = {f.name: f.stat().st_size for f in checkpoint_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "training.json"} <= set(files)
    assert sum(files.values()) <= 20 * 1024 * 1024


def test_build_returns_the_factory_contract(sm, built):
    model, inputs, dynamic = built
    assert not model.training and model.config.use_cache is False
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads < model.config.num_attention_heads
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].shape == (2, 32) and inputs["input_ids"].dtype == torch.int64
    assert torch.equal(inputs["attention_mask"], torch.ones(2, 32, dtype=torch.int64))
    assert dynamic == {"input_ids": {0: (1, 16), 1: (2, 256)}, "attention_mask": {0: (1, 16), 1: (2, 256)}}
    # the example inputs are real held-out text
    _, heldout_text = sm.split_text(sm.read_text())
    tok = sm.load_tokenizer()
    for row in inputs["input_ids"]:
        assert tok.decode(row.tolist()) in heldout_text
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, 32, model.config.vocab_size) and torch.isfinite(logits).all()


def test_heldout_split_is_the_last_ten_percent_by_characters(sm):
    text = sm.read_text()
    train, heldout = sm.split_text(text)
    assert len(train) == int(0.9 * len(text)) and train + heldout == text
    ids = sm.heldout_ids()
    assert sm.load_tokenizer().decode(ids.tolist()) == heldout


def test_heldout_perplexity_reproduces_the_recorded_value(sm, built, record):
    model, _, _ = built
    subset = record["heldout"]["test_subset"]
    ppl = heldout_perplexity(
        lambda ids: model(input_ids=ids).logits,
        sm.heldout_ids(),
        window=record["heldout"]["window"],
        batch_size=subset["batch_size"],
        max_windows=subset["windows"],
    )
    assert ppl == pytest.approx(subset["perplexity"], rel=0.01)
    # and the model is far better than chance (a uniform model scores the vocab size)
    assert record["heldout"]["whole"]["perplexity"] < model.config.vocab_size / 10


def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_greedy_generation_reads_like_english(sm, built):
    model, _, _ = built
    tok = sm.load_tokenizer()
    prompt = torch.tensor([tok.encode(sm.PROMPT).ids])
    out = tok.decode(greedy(model, prompt, 40)[0, prompt.shape[1] :].tolist())

    assert len(out) >= 60, out
    letters = sum(c.isalpha() or c in " \n" for c in out)
    assert letters / len(out) >= 0.85, f"mostly letters/spaces/newlines expected: {out!r}"
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", out)]
    train_text, _ = sm.split_text(sm.read_text())
    vocabulary = {w for w, n in Counter(re.findall(r"[a-z]+", train_text.lower())).items() if n >= 3}
    known = [w for w in words if w in vocabulary]
    assert len(words) >= 8 and len(known) / len(words) >= 0.9, f"real words expected: {out!r}"
    assert len(set(words) & COMMON_WORDS) >= 3, f"common English words expected: {out!r}"
