"""The Engine's public API refuses bad requests with typed errors, and generation says why it stopped.

Two real ONNX Runtime artifacts of one tiny decoder, compiled here: with a KV cache (kv-cache pass)
and without (every step recomputes the prefix). Both hold at most ``MAX_LEN`` tokens (prompt + new).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.cli import main

VOCAB, MAX_LEN, BATCH = 32, 24, (1, 4)


class TinyDecoder(torch.nn.Module):
    """Token + position embedding, one causal SDPA layer (2 heads), lm_head."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(64, d)
        self.qkv, self.lm_head = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, vocab)

    def forward(self, input_ids):
        b, t = input_ids.shape
        x = self.tok(input_ids) + self.pos(torch.arange(t))
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return {"logits": self.lm_head(x + y.transpose(1, 2).reshape(b, t, -1))}


def _greedy(model, ids, n):
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)["logits"][:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyDecoder().eval()


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_api")
    ex = {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))}
    dyn = {"input_ids": {0: BATCH, 1: (2, MAX_LEN)}}
    out = {}
    for kind, pipeline in (("kv-cache", "cleanup,kv-cache"), ("full-prefix", "cleanup")):
        out[kind] = graphopt.compile(model, ex, pipeline=pipeline, target="onnx", out=root / kind, dynamic=dyn,
                                     report=None).path
    return out


@pytest.fixture(scope="module", params=["kv-cache", "full-prefix"])
def art(request, artifacts):
    """(kind, artifact dir, Engine) for each artifact."""
    eng = graphopt.load(artifacts[request.param])
    yield request.param, artifacts[request.param], eng
    eng.close()


def _prompt(t: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# -- generation within the limits --------------------------------------------------------------
def test_generate_within_limits_matches_eager_and_reports_max_new_tokens(art, model):
    kind, _, eng = art
    assert (eng.manifest.get("generation") or {}).get("kind", "full-prefix") == kind
    ids = _prompt(5, b=2)
    out = eng.generate(ids, max_new_tokens=6)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 11) and out.dtype == torch.int64
    assert torch.equal(out, _greedy(model, ids, 6))
    assert out.stop_reason == "max_new_tokens" and out.stop_reasons == ["max_new_tokens"] * 2
    # exactly at the limit is allowed: prompt + new == MAX_LEN
    full = eng.generate(ids, max_new_tokens=MAX_LEN - 5)
    assert full.shape == (2, MAX_LEN) and full.stop_reason == "max_new_tokens"
    # 1-D numpy prompt → [1, T + n]
    one = eng.generate(ids[0].numpy().astype(np.int32), max_new_tokens=3)
    assert one.shape == (1, 8) and torch.equal(one[0], out[0, :8])


def test_stream_marks_only_the_last_sequence(art):
    _, _, eng = art
    steps = list(eng.stream(_prompt(4), max_new_tokens=3))
    assert [s.shape[1] for s in steps] == [5, 6, 7]
    assert [s.stop_reason for s in steps] == [None, None, "max_new_tokens"]
    assert steps[-1].stop_reasons == ["max_new_tokens"] and steps[0].stop_reasons == [None]


def test_eos_stops_every_row_and_pads_rows_that_ended(art, model):
    _, _, eng = art
    # a batch where the eos (row 0's first greedy token) never comes in row 1: row 0 ends at once
    # and is padded with eos, row 1 runs to max_new_tokens
    for seed in range(100):
        ids = _prompt(5, b=2, seed=seed)
        want = _greedy(model, ids, 4)
        eos = int(want[0, 5])
        if eos not in want[1, 5:].tolist():
            break
    out = eng.generate(ids, max_new_tokens=4, eos_token_id=eos)
    assert out[0, 5:].tolist() == [eos] * 4 and torch.equal(out[1], want[1])
    assert out.stop_reasons == ["eos", "max_new_tokens"] and out.stop_reason == "max_new_tokens"
    # every row ended: reason eos, after the step where the last row ended
    single = eng.generate(ids[:1], max_new_tokens=10, eos_token_id=eos)
    assert single.shape == (1, 6) and single.stop_reason == "eos" and single.stop_reasons == ["eos"]
    steps = list(eng.stream(ids[:1], max_new_tokens=10, eos_token_id=[VOCAB - 1, eos]))  # a list of ids
    assert len(steps) == 1 and steps[-1].stop_reason == "eos"


# -- the length limit ----------------------------------------------------------------------------
def test_request_beyond_the_artifact_is_refused_before_starting(art):
    kind, _, eng = art
    ids = _prompt(10)
    with pytest.raises(graphopt.InputError) as e:
        eng.stream(ids, max_new_tokens=20)  # raised at the call, before the first step
    msg = str(e.value)
    assert "10 tokens" in msg and "(20)" in msg and f"the {MAX_LEN} tokens this artifact holds" in msg
    assert f"lower max_new_tokens to {MAX_LEN - 10}" in msg and "truncate=True" in msg
    assert "--dynamic input_ids:1=" in msg and "..30" in msg
    with pytest.raises(graphopt.InputError, match="exceeds"):
        eng.generate(ids, max_new_tokens=MAX_LEN - 10 + 1)  # one past the limit


def test_truncate_stops_exactly_at_the_limit(art, model):
    _, _, eng = art
    ids = _prompt(10, b=2)
    out = eng.generate(ids, max_new_tokens=100, truncate=True)
    assert out.shape == (2, MAX_LEN)
    assert out.stop_reason == "length" and out.stop_reasons == ["length", "length"]
    assert torch.equal(out, _greedy(model, ids, MAX_LEN - 10))
    steps = list(eng.stream(ids, max_new_tokens=100, truncate=True))
    assert len(steps) == MAX_LEN - 10 and steps[-1].stop_reason == "length"
    # truncate=True within the limit changes nothing
    assert eng.generate(ids, max_new_tokens=3, truncate=True).stop_reason == "max_new_tokens"


def test_prompt_that_fills_the_artifact(art):
    _, _, eng = art
    ids = _prompt(MAX_LEN)
    with pytest.raises(graphopt.InputError, match="already fills the 24 tokens"):
        eng.generate(ids, max_new_tokens=1)
    out = eng.generate(ids, max_new_tokens=5, truncate=True)
    assert torch.equal(out, ids) and out.stop_reason == "length"
    assert list(eng.stream(ids, max_new_tokens=5, truncate=True)) == []
    with pytest.raises(graphopt.InputError, match="takes at most 24 in one call"):
        eng.generate(_prompt(MAX_LEN + 1), max_new_tokens=1, truncate=True)


# -- argument errors -----------------------------------------------------------------------------
BAD_GENERATE = [
    ({"ids": "1,2,3"}, "must be a torch.Tensor or numpy array, got str"),
    ({"ids": [[1, 2, 3]]}, "got list.*torch.tensor"),
    ({"ids": torch.tensor([[1.0, 2.0, 3.0]])}, "must hold integers.*float32"),
    ({"ids": np.array([[1.0, 2.0]])}, "must hold integers.*float64"),
    ({"ids": torch.tensor([[True, False]])}, "booleans"),
    ({"ids": torch.zeros(1, 2, 3, dtype=torch.long)}, r"\[batch, seq\].*\(1, 2, 3\)"),
    ({"ids": torch.zeros(1, 0, dtype=torch.long)}, "prompt is empty"),
    ({"ids": torch.tensor([[1, 2, VOCAB]])}, f"token id {VOCAB}, outside the artifact's vocabulary 0..{VOCAB - 1}"),
    ({"ids": torch.tensor([[1, -2, 3]])}, "token id -2"),
    ({"ids": _prompt(4, b=5)}, r"5 rows.*batch of 1\.\.4.*--dynamic input_ids:0=1\.\.5"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
    ({"max_new_tokens": -3}, "positive int"),
    ({"max_new_tokens": 2.0}, "positive int, got 2.0"),
    ({"max_new_tokens": True}, "positive int, got True"),
    ({"max_new_tokens": "8"}, "positive int, got '8'"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_k": 0}, "top_k must be None .* or an int >= 1, got 0"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"eos_token_id": "2"}, "eos_token_id must be None, an int or a list of ints, got '2'"),
    ({"eos_token_id": 1.0}, "eos_token_id must be"),
    ({"eos_token_id": True}, "eos_token_id must be"),
    ({"eos_token_id": []}, "eos_token_id must be"),
    ({"eos_token_id": 1000}, "eos_token_id 1000 is outside the artifact's vocabulary"),
    ({"seed": 1.5}, "seed must be None or an int, got 1.5"),
    ({"seed": "1"}, "seed must be None or an int"),
    ({"truncate": "yes"}, "truncate must be True or False"),
]


@pytest.mark.parametrize("kwargs, match", BAD_GENERATE, ids=[f"{next(iter(k))}={k[next(iter(k))]!r}"[:40]
                                                             for k, _ in BAD_GENERATE])
def test_generate_argument_errors(art, kwargs, match):
    _, _, eng = art
    call = {"ids": _prompt(4), "max_new_tokens": 2, **kwargs}
    ids, n = call.pop("ids"), call.pop("max_new_tokens")
    with pytest.raises(graphopt.InputError, match=match):
        eng.generate(ids, n, **call)
    with pytest.raises(graphopt.InputError, match=match):  # stream checks at the call, before any step
        eng.stream(ids, n, **call)


def test_attention_mask_errors(artifacts):
    kv = graphopt.load(artifacts["kv-cache"])
    ids = _prompt(4, b=2)
    with pytest.raises(graphopt.InputError, match=r"attention_mask has shape \(2, 3\) but the prompt ids have \(2, 4\)"):
        kv.generate(ids, 2, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(graphopt.InputError, match="attention_mask must hold integers.*float32"):
        kv.generate(ids, 2, attention_mask=torch.ones(2, 4))
    with pytest.raises(graphopt.InputError, match="only 0 .padding. and 1"):
        kv.generate(ids, 2, attention_mask=torch.full((2, 4), 2))
    with pytest.raises(graphopt.InputError, match="attention_mask row 1 is all padding"):
        kv.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(graphopt.InputError, match="must be a torch.Tensor or numpy array, got list"):
        kv.generate(ids, 2, attention_mask=[[1, 1, 1, 1]] * 2)
    left_padded = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # bool masks are fine too
    assert kv.generate(ids, 2, attention_mask=left_padded.bool()).shape == (2, 6)
    fp = graphopt.load(artifacts["full-prefix"])
    with pytest.raises(graphopt.InputError, match="takes no attention_mask"):
        fp.generate(ids, 2, attention_mask=left_padded)
    with pytest.raises(graphopt.InputError, match=r"1 token\(s\) but the artifact takes at least 2"):
        fp.generate(_prompt(1), 2)


# -- Engine.__call__ -----------------------------------------------------------------------------
def test_call_errors(artifacts):
    eng = graphopt.load(artifacts["full-prefix"])
    ids = _prompt(5)
    assert eng(ids)["logits"].shape == (1, 5, VOCAB)
    assert eng(input_ids=ids.numpy())["logits"].shape == (1, 5, VOCAB)
    cases = [
        (("hello",), {}, "input 'input_ids' must be a torch.Tensor or numpy array.*got str"),
        (([[1, 2, 3]],), {}, "got list; wrap it"),
        ((ids.float(),), {}, "input 'input_ids' must be integer"),
        ((ids[0],), {}, "rank 1"),
        ((), {"input_idz": ids}, r"unknown input 'input_idz'; the artifact takes \['input_ids'\]"),
        ((ids, ids), {}, "2 positional inputs but the artifact takes 1"),
        ((_prompt(MAX_LEN + 1),), {}, r"dim 1 is 25, outside its compiled dynamic range \[2, 24\]"),
        ((_prompt(4, b=5),), {}, r"dim 0 is 5, outside its compiled dynamic range \[1, 4\]"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(graphopt.InputError, match=match):
            eng(*args, **kwargs)


# -- graphopt.load -------------------------------------------------------------------------------
def test_load_errors(artifacts, tmp_path):
    with pytest.raises(graphopt.ArtifactError, match="does not exist"):
        graphopt.load(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(graphopt.ArtifactError, match="is not a directory"):
        graphopt.load(tmp_path / "file.txt")
    with pytest.raises(graphopt.ArtifactError, match="no manifest.json: not a graphopt artifact"):
        graphopt.load(tmp_path)
    with pytest.raises(graphopt.InputError, match="artifact directory as a str or Path, got int"):
        graphopt.load(3)
    with pytest.raises(graphopt.InputError, match="unknown load option 'provider' .did you mean 'providers'.*threads"):
        graphopt.load(artifacts["kv-cache"], provider=["CPUExecutionProvider"])
    with pytest.raises(graphopt.InputError, match="unknown load option 'thread'"):
        graphopt.load(artifacts["kv-cache"], thread=1)
    # real options, and options of another installed backend (device= is the torch runner's), load
    eng = graphopt.load(artifacts["kv-cache"], providers=["CPUExecutionProvider"], threads=1, device="cpu")
    assert eng.generate(_prompt(3), 2).shape == (1, 5)


# -- CLI -----------------------------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_reports_the_stop_reason_and_refuses_what_does_not_fit(capsys, art):
    kind, path, _ = art
    code, out, err = run_cli(capsys, "generate", path, "--ids", "1,2,3", "--max-new-tokens", "5")
    assert code == 0 and len(out.strip().split(",")) == 8  # stdout: the ids alone
    assert "[stopped: max_new_tokens (5 new tokens)]" in err
    code, out, err = run_cli(capsys, "generate", path, "--ids", "1,2,3", "--max-new-tokens", "64")
    assert code == 2 and out == ""
    assert "error: the prompt (3 tokens) + max_new_tokens (64) = 67 tokens exceeds the 24 tokens" in err
    assert "--truncate" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "generate", path, "--ids", "1,2,3", "--max-new-tokens", "64", "--truncate")
    assert code == 0 and len(out.strip().split(",")) == MAX_LEN
    assert f"[stopped: length ({MAX_LEN - 3} new tokens, the artifact's limit of {MAX_LEN} tokens)]" in err
    code, _, err = run_cli(capsys, "generate", path, "--ids", "1,2,3", "--max-new-tokens", "0")
    assert code == 2 and "max_new_tokens must be a positive int" in err
    code, _, err = run_cli(capsys, "generate", path, "--ids", "1,2,3", "--temperature", "-1")
    assert code == 2 and "temperature must be a finite number >= 0" in err
    code, _, err = run_cli(capsys, "generate", path, "--ids", f"1,2,{VOCAB + 5}")
    assert code == 2 and "outside the artifact's vocabulary" in err


def test_cli_generate_eos(capsys, art, model):
    _, path, _ = art
    first = int(_greedy(model, torch.tensor([[1, 2, 3]]), 1)[0, 3])
    code, out, err = run_cli(capsys, "generate", path, "--ids", "1,2,3", "--eos", first, "--max-new-tokens", "9")
    assert code == 0 and out.strip() == f"1,2,3,{first}"
    assert "[stopped: eos (1 new token)]" in err


def test_cli_inspect_shows_the_generation_limits(capsys, artifacts):
    code, out, _ = run_cli(capsys, "inspect", artifacts["kv-cache"])
    assert code == 0
    assert f"generation: kv-cache (dynamic), max length {MAX_LEN} tokens (prompt + new), batch 1..4" in out
    code, out, _ = run_cli(capsys, "inspect", artifacts["full-prefix"])
    assert code == 0
    assert (f"generation: full prefix (no KV cache; every step recomputes the prefix), max length {MAX_LEN} tokens "
            f"(prompt + new), prompt 2..{MAX_LEN} tokens, batch 1..4") in out

