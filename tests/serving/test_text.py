"""Incremental detokenization of a stream: what is sent, token by token, adds up to the decode of
the whole completion, and a stop string cuts the text before its first occurrence, never after."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from graphopt.serving.app import _Text

TOKENIZER = Path(__file__).resolve().parents[2] / "samples" / "shakespeare" / "checkpoint" / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER))


def _stream(text: _Text, ids: list[int]) -> str:
    out = ""
    for t in ids:
        out += text.push(t)
        if text.stopped:
            return out
    return out + text.rest()


@pytest.mark.parametrize("seed", range(6))
def test_streamed_pieces_add_up_to_the_whole_decode(tokenizer, seed):
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab_size()
    ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 120))]
    text = _Text(tokenizer, [])
    assert _stream(text, ids) == tokenizer.decode(ids) == text.full()


@pytest.mark.parametrize("seed", range(6))
def test_a_stop_string_ends_the_text_before_its_first_occurrence(tokenizer, seed):
    rng = random.Random(100 + seed)
    ids = tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks? It is the east.\n"
                           "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?").ids
    whole = tokenizer.decode(ids)
    start = rng.randrange(1, len(whole) - 4)
    stop = whole[start:start + rng.randint(1, 4)]
    text = _Text(tokenizer, ["never there", stop])
    assert _stream(text, ids) == whole[: whole.find(stop)] == text.full()
    assert text.stopped
