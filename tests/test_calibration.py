"""graphopt.calibration: text / .npz / iterable sources, determinism, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt.calibration import CalibrationError, fingerprint, load_calibration
from graphopt.errors import InputError

NAMES = ["input_ids", "attention_mask"]
EXAMPLES = [torch.zeros(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64)]


def char_tokenizer(s: str) -> list[int]:
    return [ord(c) % 200 for c in s]


def load(source, **kw):
    kw.setdefault("input_names", NAMES)
    kw.setdefault("example_inputs", EXAMPLES)
    return load_calibration(source, **kw)


def test_text_stream_windows_and_determinism(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("To be, or not to be, that is the question.\n" * 40)
    a = load(f, tokenizer=char_tokenizer, max_samples=5, seq_len=16)
    b = load(f, tokenizer=char_tokenizer, max_samples=5, seq_len=16)
    assert len(a) == 5 and a[0][0].shape == (1, 16) and a[0][0].dtype == torch.int64
    assert torch.equal(a[0][1], torch.ones(1, 16, dtype=torch.int64))  # mask filled
    assert fingerprint(a) == fingerprint(b)
    c = load(f, tokenizer=char_tokenizer, max_samples=5, seq_len=16, text_span=(0.0, 0.5))
    assert fingerprint(c) != fingerprint(a)


def test_text_lines_pad_with_mask(tmp_path):
    f = tmp_path / "lines.txt"
    f.write_text("short\n\na much longer line here\n")
    sets = load(f, tokenizer=char_tokenizer, text_mode="lines", batch_size=2, seq_len=64)
    ids, mask = sets[0]
    assert ids.shape == (2, len("a much longer line here"))
    assert mask[0].sum() == len("short") and mask[1].all()


def test_tokenizer_json(tmp_path):
    from samples.models.shakespeare import TOKENIZER

    f = tmp_path / "t.txt"
    f.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    sets = load(f, tokenizer=str(TOKENIZER), seq_len=8, max_samples=3)
    assert len(sets) == 3 and int(sets[0][0].max()) > 0


def test_npz_and_iterable(tmp_path):
    ids = np.random.default_rng(0).integers(0, 100, (6, 8))
    p = tmp_path / "c.npz"
    np.savez(p, input_ids=ids)
    sets = load(p, batch_size=2)
    assert len(sets) == 3 and torch.equal(sets[1][0], torch.from_numpy(ids[2:4]))
    it = load([{"input_ids": torch.from_numpy(ids[:2])}, (torch.from_numpy(ids[2]),)], batch_size=1)
    assert len(it) == 3 and it[2][0].shape == (1, 8)


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ("   \n\n", "is empty"),
    (b"\x00\x01binary", "binary"),
])
def test_bad_text_files(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    with pytest.raises(CalibrationError, match=match):
        load(f, tokenizer=char_tokenizer)


def test_bad_sources(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load(tmp_path / "missing.txt", tokenizer=char_tokenizer)
    corrupt = tmp_path / "c.npz"
    corrupt.write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        load(corrupt)
    empty = tmp_path / "e.npz"
    np.savez(empty)
    with pytest.raises(CalibrationError, match="holds no arrays"):
        load(empty)
    wrong = tmp_path / "w.npz"
    np.savez(wrong, pixels=np.zeros((2, 3)))
    with pytest.raises(CalibrationError, match="not inputs of the graph"):
        load(wrong)
    with pytest.raises(CalibrationError, match="holds no samples"):
        load([])
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    with pytest.raises(CalibrationError, match="tokenizer"):
        load(text)
    with pytest.raises(CalibrationError, match="fewer than one window"):
        load(text, tokenizer=char_tokenizer, seq_len=100)
    assert issubclass(CalibrationError, InputError)
