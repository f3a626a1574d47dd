"""graphopt.artifact (atomic writes, manifest validation, checksums) and graphopt.runtime.engine
(load, input validation, example files, generation) end to end on the onnx target."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import graphopt
from graphopt.artifact import (
    FORMAT,
    MANIFEST,
    SCHEMA_VERSION,
    ArtifactWriter,
    read_manifest,
    verify_checksums,
)

pytest.importorskip("onnxruntime")


def _manifest(**extra) -> dict:
    m = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "graphopt_version": graphopt.__version__,
         "target": "onnx", "payload": {}, "inputs": [], "outputs": [], "out_structure": {"type": "none"}}
    m.update(extra)
    return m


def _write(out: Path, files: dict[str, bytes], **extra) -> Path:
    with ArtifactWriter(out) as w:
        for rel, data in files.items():
            (w.dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.dir / rel).write_bytes(data)
        return w.commit(_manifest(**extra))


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


# -- ArtifactWriter --------------------------------------------------------------------------------
def test_commit_writes_files_and_manifest_atomically(tmp_path):
    out = tmp_path / "art"
    path = _write(out, {"model.bin": b"abc", "sub/weights.bin": b"x" * 10})
    assert path == out
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.bin", "sub"]
    assert _siblings(out) == []  # no temp or old dirs left beside it
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == {
        "model.bin": {"sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "size": 3},
        "sub/weights.bin": {"sha256": manifest["files"]["sub/weights.bin"]["sha256"], "size": 10},
    }
    verify_checksums(out, read_manifest(out))


def test_exception_inside_the_block_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="lowering failed"):
        with ArtifactWriter(out) as w:
            (w.dir / "model.bin").write_bytes(b"partial")
            raise RuntimeError("lowering failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_inside_the_block_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        with ArtifactWriter(out) as w:
            (w.dir / "model.bin").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rebuild_keeps_the_previous_artifact(tmp_path):
    out = tmp_path / "art"
    _write(out, {"model.bin": b"version 1"})
    with pytest.raises(ValueError):
        with ArtifactWriter(out) as w:
            (w.dir / "model.bin").write_bytes(b"version 2")
            raise ValueError("verification failed")
    assert (out / "model.bin").read_bytes() == b"version 1"
    verify_checksums(out, read_manifest(out))
    assert _siblings(out) == []


def test_a_successful_rebuild_replaces_the_previous_artifact(tmp_path):
    out = tmp_path / "art"
    _write(out, {"model.bin": b"version 1", "stale.bin": b"old"})
    _write(out, {"model.bin": b"version 2"})
    assert (out / "model.bin").read_bytes() == b"version 2"
    assert not (out / "stale.bin").exists()
    assert set(read_manifest(out)["files"]) == {"model.bin"}
    assert _siblings(out) == []


def test_refuses_to_replace_a_non_artifact_directory(tmp_path):
    out = tmp_path / "src"
    out.mkdir()
    (out / "precious.py").write_text("keep me")
    with pytest.raises(graphopt.ArtifactError, match="not a graphopt artifact; refusing"):
        ArtifactWriter(out)
    assert (out / "precious.py").read_text() == "keep me"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(graphopt.ArtifactError, match="is not a directory"):
        ArtifactWriter(f)


def test_an_empty_directory_is_fine(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    _write(out, {"a.bin": b"1"})
    assert (out / "a.bin").exists() and _siblings(out) == []


def test_parent_directories_are_created(tmp_path):
    out = tmp_path / "build" / "deep" / "art"
    _write(out, {"a.bin": b"1"})
    assert (out / MANIFEST).is_file()


# -- read_manifest ---------------------------------------------------------------------------------
@pytest.fixture()
def art(tmp_path) -> Path:
    return _write(tmp_path / "art", {"model.bin": b"0123456789", "data/w.bin": b"weights"})


def _edit_manifest(art: Path, fn) -> None:
    m = json.loads((art / MANIFEST).read_text())
    fn(m)
    (art / MANIFEST).write_text(json.dumps(m))


def test_read_manifest_ok(art):
    m = read_manifest(art)
    assert m["format"] == FORMAT and set(m["files"]) == {"model.bin", "data/w.bin"}


def test_read_manifest_missing_dir(tmp_path):
    with pytest.raises(graphopt.ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nope")


def test_read_manifest_not_a_dir(tmp_path):
    (tmp_path / "f").write_text("{}")
    with pytest.raises(graphopt.ArtifactError, match="is not a directory"):
        read_manifest(tmp_path / "f")


def test_read_manifest_no_manifest(tmp_path):
    with pytest.raises(graphopt.ArtifactError, match="has no manifest.json"):
        read_manifest(tmp_path)


def test_read_manifest_bad_json(art):
    (art / MANIFEST).write_text("{not json")
    with pytest.raises(graphopt.ArtifactError, match="not valid JSON"):
        read_manifest(art)
    (art / MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(graphopt.ArtifactError, match="not valid JSON"):
        read_manifest(art)


def test_read_manifest_wrong_format(art):
    _edit_manifest(art, lambda m: m.update(format="something-else"))
    with pytest.raises(graphopt.ArtifactError, match="not a graphopt manifest"):
        read_manifest(art)
    (art / MANIFEST).write_text("[1, 2]")
    with pytest.raises(graphopt.ArtifactError, match="not a graphopt manifest"):
        read_manifest(art)


def test_read_manifest_newer_schema(art):
    _edit_manifest(art, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(graphopt.ArtifactError, match="newer than this graphopt supports"):
        read_manifest(art)
    _edit_manifest(art, lambda m: m.update(schema_version="1"))
    with pytest.raises(graphopt.ArtifactError, match="schema version"):
        read_manifest(art)


def test_read_manifest_missing_keys(art):
    _edit_manifest(art, lambda m: (m.pop("inputs"), m.pop("files")))
    with pytest.raises(graphopt.ArtifactError, match="lacks inputs, files"):
        read_manifest(art)


# -- verify_checksums ------------------------------------------------------------------------------
def test_checksum_catches_a_changed_byte(art):
    data = bytearray((art / "model.bin").read_bytes())
    data[3] ^= 0x01
    (art / "model.bin").write_bytes(bytes(data))
    with pytest.raises(graphopt.ChecksumError, match="checksum mismatch for payload file .*model.bin"):
        verify_checksums(art, read_manifest(art))


def test_checksum_catches_a_truncated_file(art):
    (art / "data" / "w.bin").write_bytes(b"weig")
    with pytest.raises(graphopt.ChecksumError, match="has 4 bytes, the manifest says 7"):
        verify_checksums(art, read_manifest(art))


def test_checksum_catches_a_missing_file(art):
    (art / "model.bin").unlink()
    with pytest.raises(graphopt.ChecksumError, match="model.bin listed in .* is missing"):
        verify_checksums(art, read_manifest(art))


@pytest.mark.parametrize("rel", ["../x", "data/../../x", "/etc/passwd"])
def test_checksum_refuses_paths_outside_the_artifact(art, rel):
    (art.parent / "x").write_bytes(b"outside")
    _edit_manifest(art, lambda m: m["files"].update({rel: {"sha256": "0" * 64, "size": 7}}))
    with pytest.raises(graphopt.ArtifactError, match="outside the artifact directory") as ei:
        verify_checksums(art, read_manifest(art))
    assert not isinstance(ei.value, graphopt.ChecksumError)


def test_checksum_error_is_an_artifact_error_and_os_error():
    assert issubclass(graphopt.ChecksumError, graphopt.ArtifactError)
    assert issubclass(graphopt.ArtifactError, OSError)


# -- end to end: compile → load → call -------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x)) * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    out = tmp_path_factory.mktemp("tiny") / "a"
    art = graphopt.compile(model, (torch.randn(3, 6),), pipeline="cleanup", target="onnx", out=out,
                           dynamic={"x": {0: (1, 8)}}, report=None)
    return model, art, graphopt.load(out)


def test_compile_returns_the_artifact(tiny):
    _, art, eng = tiny
    assert art.path.is_dir() and art.manifest["target"] == "onnx"
    assert isinstance(eng, graphopt.Engine) and eng.target == "onnx"
    assert eng.input_names == ["x"] and eng.output_names == ["output"]
    assert eng.inputs[0].dynamic == {0: (1, 8)} and eng.inputs[0].shape == ["batch", 6]
    assert _siblings(art.path) == []
    verify_checksums(art.path, read_manifest(art.path))


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_engine_matches_eager_on_fresh_batch_sizes(tiny, batch):
    model, _, eng = tiny
    x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = model(x)
    got = eng(x)
    assert isinstance(got, torch.Tensor) and got.shape == (batch, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(eng(x.numpy()), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(eng(x=x), want, rtol=0, atol=1e-5)


def test_engine_casts_float64_inputs(tiny):
    model, _, eng = tiny
    x64 = np.random.default_rng(0).standard_normal((4, 6))
    with torch.no_grad():
        want = model(torch.from_numpy(x64).float())
    torch.testing.assert_close(eng(x64), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(eng(torch.from_numpy(x64)), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (np.ones((2, 6), dtype=np.int64), r"input 'x' must be floating-point \(float32\)"),
    (torch.ones(2, 6, dtype=torch.int32), r"input 'x' must be floating-point"),
    (np.ones((2, 6), dtype=bool), r"input 'x' must be floating-point"),
    (np.ones((2, 3, 6), dtype=np.float32), r"input 'x' has rank 3 .* expects rank 2"),
    (np.ones(6, dtype=np.float32), r"input 'x' has rank 1"),
    (np.ones((2, 7), dtype=np.float32), r"input 'x' dim 1 is 7 but the artifact was compiled for 6"),
    (np.ones((9, 6), dtype=np.float32), r"input 'x' dim 0 is 9, outside its compiled dynamic range \[1, 8\]"),
    (np.ones((0, 6), dtype=np.float32), r"input 'x' dim 0 is 0, outside"),
])
def test_engine_rejects_bad_inputs_naming_them(tiny, bad, match):
    _, _, eng = tiny
    with pytest.raises(graphopt.InputError, match=match):
        eng(bad)


def test_engine_rejects_bad_input_names(tiny):
    _, _, eng = tiny
    x = np.ones((2, 6), dtype=np.float32)
    with pytest.raises(graphopt.InputError, match=r"unknown input 'y'; the artifact takes \['x'\]"):
        eng(y=x)
    with pytest.raises(graphopt.InputError, match=r"missing input\(s\) \['x'\]"):
        eng()
    with pytest.raises(graphopt.InputError, match=r"got 2 positional inputs .* takes 1: \['x'\]"):
        eng(x, x)
    with pytest.raises(graphopt.InputError, match=r"input 'x' given both positionally and by keyword"):
        eng(x, x=x)


def test_engine_examples(tiny):
    model, art, eng = tiny
    ins, outs = eng.example_inputs(), eng.expected_outputs()
    assert list(ins) == ["x"] and ins["x"].shape == (3, 6) and ins["x"].dtype == np.float32
    assert list(outs) == ["output"]
    with torch.no_grad():
        want = model(torch.from_numpy(ins["x"]))
    np.testing.assert_allclose(outs["output"], want.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(eng(ins["x"]).numpy(), outs["output"], rtol=0, atol=1e-5)


def test_a_changed_byte_in_the_onnx_file_refuses_to_load(tiny, tmp_path):
    _, art, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(art.path, copy)
    onnx_file = copy / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(graphopt.ChecksumError, match="model.onnx"):
        graphopt.load(copy)


def test_load_refuses_a_missing_or_foreign_artifact(tiny, tmp_path):
    _, art, _ = tiny
    with pytest.raises(graphopt.ArtifactError, match="does not exist"):
        graphopt.load(tmp_path / "nope")
    copy = tmp_path / "copy"
    shutil.copytree(art.path, copy)
    _edit_manifest(copy, lambda m: m.update(target="no-such-backend"))
    with pytest.raises(graphopt.ArtifactError, match="needs target 'no-such-backend'"):
        graphopt.load(copy)


# -- generation ------------------------------------------------------------------------------------
class TinyCausalLM(torch.nn.Module):
    """Token + position embedding, one causal self-attention layer, lm_head."""

    def __init__(self, vocab: int = 32, d: int = 16, max_len: int = 64):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(max_len, d)
        self.qkv, self.lm_head = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, vocab)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t))
        q, k, v = self.qkv(h).split(h.shape[-1], -1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(h.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return {"logits": self.lm_head(h + att @ v)}


def _greedy(model, ids, n):
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq)["logits"][:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyCausalLM().eval()
    prompt = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("lm") / "lm"
    graphopt.compile(model, {"input_ids": prompt}, pipeline="cleanup", target="onnx", out=out,
                     dynamic={"input_ids": {1: (1, 32)}}, report=None)
    return model, prompt, graphopt.load(out)


def test_lm_engine_returns_a_dict_and_takes_int32_numpy(lm):
    model, prompt, eng = lm
    ids = np.asarray(prompt, dtype=np.int32)
    got = eng(input_ids=ids)
    assert list(got) == ["logits"]
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(prompt)["logits"], rtol=0, atol=1e-5)


def test_generate_matches_a_greedy_loop_on_the_eager_module(lm):
    model, prompt, eng = lm
    want = _greedy(model, prompt, 8)
    got = eng.generate(prompt, max_new_tokens=8)
    assert got.shape == (1, 13)
    assert torch.equal(got, want)
    assert torch.equal(eng.generate(prompt[0].numpy(), max_new_tokens=8), want)  # 1-D numpy prompt


def test_generate_stops_at_eos(lm):
    model, prompt, eng = lm
    new = _greedy(model, prompt, 8)[0, 5:].tolist()
    eos = new[2]
    stop = new.index(eos)  # first occurrence
    got = eng.generate(prompt, max_new_tokens=8, eos_token_id=eos)
    assert got[0, 5:].tolist() == new[: stop + 1]
    steps = list(eng.stream(prompt, max_new_tokens=8, eos_token_id=eos))
    assert len(steps) == stop + 1 and torch.equal(steps[-1], got)


def test_generate_respects_the_compiled_sequence_range(lm):
    _, prompt, eng = lm
    with pytest.raises(graphopt.InputError, match="exceeds the 32 tokens this artifact holds"):
        eng.generate(prompt, max_new_tokens=100)
    got = eng.generate(prompt, max_new_tokens=100, truncate=True)
    assert got.shape[1] == 32 and got.stop_reason == "length"  # the dynamic range's maximum
