"""Speculative decoding (graphopt.speculative): greedy tokens identical to plain generate on the
trained decoder, a Hugging Face Llama with GQA, GPT-2 and nanoGPT, with left-padded batches,
dynamic and static caches; drafts from prompt lookup and from a shallower copy of the target;
sampling distributed as the target's (chi-square against plain sampling); refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.errors import InputError
from graphopt.model_loader import load_factory
from graphopt.speculative import Draft, PromptLookup

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "samples" / "models"
SHAKESPEARE = REPO / "samples" / "shakespeare" / "checkpoint"
DRAFT = REPO / "samples" / "shakespeare" / "draft"


def _shallow(model, keep: int = 1):
    """The target with only its first ``keep`` blocks: the "fewer layers" draft."""
    m = copy.deepcopy(model)
    if hasattr(m, "model") and hasattr(m.model, "layers"):  # Llama
        m.model.layers = m.model.layers[:keep]
        m.config.num_hidden_layers = keep
    elif hasattr(m, "transformer") and hasattr(m.transformer, "h"):  # GPT-2, nanoGPT
        m.transformer.h = m.transformer.h[:keep]
        if hasattr(m, "config") and hasattr(m.config, "n_layer"):
            m.config.n_layer = keep
    else:
        raise AssertionError(f"no block list on {type(m).__name__}")
    return m


def _compile(tmp: Path, name: str, model, ex, dyn, cache: str, target: str = "onnx") -> graphopt.Engine:
    graphopt.compile(model, ex, f"cleanup,fuse-attention,{cache}", target=target, out=tmp / name, dynamic=dyn,
                     report=None)
    return graphopt.load(tmp / name)


def _batch(vocab: int, seed: int, repeat: bool = True):
    """Three prompts of 10, 7 and 2 real tokens (left-padded); the longer ones repeat themselves
    so that prompt lookup finds matches."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 10), generator=g)
    if repeat:
        ids[:, 5:] = ids[:, :5]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :8] = 0
    return ids, mask


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The sample Llama (GQA) and its kv-cache artifact, compiled once for the tests below."""
    model, ex, dyn = load_factory(f"{MODELS}/hf_llama.py:build", attn_implementation="sdpa")
    return model, ex, dyn, _compile(tmp_path_factory.mktemp("spec"), "t", model, ex, dyn, "kv-cache")


FAMILIES = [
    ("hf_llama", {"attn_implementation": "sdpa"}, "kv-cache"),                             # RoPE, GQA
    ("hf_llama", {"attn_implementation": "sdpa"}, "kv-cache(static=true,max_len=64)"),
    ("hf_gpt2", {"attn_implementation": "sdpa"}, "kv-cache"),                              # learned positions
    ("nanogpt", {}, "kv-cache"),                                                           # no mask input
]


@pytest.mark.parametrize("name, kw, cache", FAMILIES, ids=["llama", "llama-static", "gpt2", "nanogpt"])
def test_greedy_tokens_equal_plain_generate(tmp_path, name, kw, cache):
    """Prompt lookup and a draft model: the left-padded batch and a single prompt decode to
    exactly plain generate's tokens; the stats count real proposals. The Llama's draft is its
    one-block copy (drafts rejected often); the other families draft with the target itself (the
    draft path on their cache layouts; rejections come from prompt lookup), one compile fewer."""
    model, ex, dyn = load_factory(f"{MODELS}/{name}.py:build", **kw)
    target = _compile(tmp_path, "target", model, ex, dyn, cache)
    draft = _compile(tmp_path, "draft", _shallow(model), ex, dyn, "kv-cache") if name == "hf_llama" and \
        "static" not in cache else target
    vocab = target.manifest["outputs"][0]["shape"][-1]
    ids, mask = _batch(int(vocab), seed=5)
    ref = target.generate(ids, 30, attention_mask=mask)
    for spec in ("prompt-lookup", PromptLookup(ngram=2, num_tokens=3), draft, Draft(draft, num_tokens=2)):
        got = target.generate(ids, 30, attention_mask=mask, speculative=spec)
        assert torch.equal(got, ref), f"{spec!r}: speculative tokens differ from plain generate"
        stats = got.speculation
        assert stats["target_calls"] < 30 + 1 or stats["accepted"] == 0
        assert 0 <= stats["accepted"] <= stats["proposed"]
    one = target.generate(ids[:1], 20)
    assert torch.equal(target.generate(ids[:1], 20, speculative=draft), one)
    assert torch.equal(target.generate(ids[:1], 20, speculative="prompt-lookup"), one)
    single = ids[:1, -1:]  # a one-token prompt
    assert torch.equal(target.generate(single, 12, speculative=draft), target.generate(single, 12))


def test_a_lookup_copy_that_reaches_the_end_goes_on_with_the_period():
    """A match whose continuation runs into the end of the text is a loop of that period: the
    draft repeats it (up to k tokens) instead of stopping at the text's end; a match further back
    copies what followed it."""
    from graphopt.speculative import _lookup

    assert _lookup([5, 1, 1, 1, 1], 3, 6) == [1] * 6
    assert _lookup([1, 2, 3, 1, 2, 3, 1, 2], 2, 7) == [3, 1, 2, 3, 1, 2, 3]
    assert _lookup([7, 8, 9, 4, 5, 6, 7, 8], 2, 3) == [9, 4, 5]
    assert _lookup([7, 8, 9], 2, 3) == []


def test_lookup_drafts_are_accepted_on_repeated_text(llama):
    """On a prompt that repeats, a greedy target continues the repetition often enough that
    prompt lookup's drafts are accepted and the target runs fewer calls than tokens."""
    _, ex, _, target = llama
    ref = target.generate(ex["input_ids"][:1], 40)
    prompt = torch.cat([ref, ref[:, :20]], 1)  # the text so far, then its start again
    got = target.generate(prompt, 20, speculative="prompt-lookup")
    assert torch.equal(got, target.generate(prompt, 20))
    assert got.speculation["accepted"] >= 10 and got.speculation["target_calls"] <= 12, got.speculation


def test_stream_yields_every_token_once(llama):
    target = llama[3]
    ids, mask = _batch(256, seed=2)
    steps = list(target.stream(ids, 9, attention_mask=mask, speculative=target))
    assert [s.shape[1] for s in steps] == list(range(11, 20))
    assert steps[-1].stop_reason == "max_new_tokens" and all(s.stop_reason is None for s in steps[:-1])
    assert torch.equal(steps[-1], target.generate(ids, 9, attention_mask=mask))


def test_eos_ends_rows_as_plain_generate_does(llama):
    """A row that produces eos is padded with it; decoding ends when every row did, at the same
    length and with the same stop reasons as plain generate."""
    target = llama[3]
    ids, mask = _batch(256, seed=9)
    ref = target.generate(ids, 24, attention_mask=mask)
    eos = [int(ref[0, 13]), int(ref[2, 15])]  # tokens rows 0 and 2 produce early on
    plain = target.generate(ids, 24, attention_mask=mask, eos_token_id=eos)
    got = target.generate(ids, 24, attention_mask=mask, eos_token_id=eos, speculative=target)
    assert torch.equal(got, plain)
    assert got.stop_reasons == plain.stop_reasons and got.stop_reason == plain.stop_reason


def test_torch_target(tmp_path, llama):
    """The torch target (a torch.export program that refuses an empty past) as the target and as
    the draft, and an ONNX draft for it: the same tokens."""
    model, ex, dyn, onnx_target = llama
    target = _compile(tmp_path, "t", model, ex, dyn, "kv-cache", target="torch")
    ids, mask = _batch(256, seed=4)
    ref = target.generate(ids, 16, attention_mask=mask)
    for spec in (target, onnx_target, "prompt-lookup"):
        assert torch.equal(target.generate(ids, 16, attention_mask=mask, speculative=spec), ref)


def test_sampling_is_distributed_as_the_target(tmp_path):
    """With the rejection rule every emitted token is distributed as the target's: the counts of
    the tokens at new positions 1-4 of many sampled continuations, speculative (a draft that
    disagrees often, and prompt lookup) against plain sampling, pass a chi-square test."""
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is needed for the chi-square test")
    def peaked(seed: int):
        model, ex, dyn = load_factory(f"{MODELS}/hf_llama.py:build", attn_implementation="sdpa", vocab_size=16,
                                      seed=seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(4)  # peaked, not uniform: a wrong rule would show
        return model, ex, dyn

    model, ex, dyn = peaked(0)
    target = _compile(tmp_path, "t", model, ex, dyn, "kv-cache")
    # another random model: its q is far from the target's p (accepting its drafts as they come
    # fails this test with p < 1e-8; a one-block copy of the target would be too close to tell)
    draft = _compile(tmp_path, "d", peaked(1)[0], ex, dyn, "kv-cache")
    prompt = torch.tensor([[3, 7, 3, 7, 3]]).repeat(16, 1)
    n_rounds = 20

    def counts(spec) -> torch.Tensor:
        c = torch.zeros(4, 16)
        for r in range(n_rounds):
            out = target.generate(prompt, 5, temperature=1.0, seed=1000 * r + 7, speculative=spec)
            for pos in range(4):
                c[pos] += torch.bincount(out[:, 5 + pos + 1], minlength=16)
        return c

    plain = counts(None)
    for spec in (draft, "prompt-lookup"):  # 16 x 20 continuations each
        got = counts(spec)
        for pos in range(4):
            seen = (plain[pos] + got[pos]) > 0
            table = torch.stack([plain[pos][seen], got[pos][seen]]).numpy()
            p = scipy_stats.chi2_contingency(table)[1]
            assert p > 1e-3, f"{spec!r}: position {pos + 1} tokens differ from plain sampling (chi-square p={p:.2g})"


def test_refusals(tmp_path, llama):
    model, ex, dyn, target = llama
    ids = ex["input_ids"][:1]
    other, ex2, dyn2 = load_factory(f"{MODELS}/hf_llama.py:build", attn_implementation="sdpa", vocab_size=128)
    small_vocab = _compile(tmp_path, "v", other, ex2, dyn2, "kv-cache")
    with pytest.raises(InputError, match="vocabulary"):
        target.generate(ids, 4, speculative=small_vocab)
    graphopt.compile(model, ex, "cleanup", target="onnx", out=tmp_path / "nocache", dynamic=dyn, report=None)
    with pytest.raises(InputError, match="kv-cache"):
        target.generate(ids, 4, speculative=tmp_path / "nocache")
    with pytest.raises(InputError, match="kv-cache"):
        graphopt.load(tmp_path / "nocache").generate(ids, 4, speculative="prompt-lookup")
    with pytest.raises(InputError, match="does not exist"):
        target.generate(ids, 4, speculative=tmp_path / "missing")
    with pytest.raises(InputError, match="must be 'prompt-lookup'"):
        target.generate(ids, 4, speculative=3)
    with pytest.raises(InputError, match="num_tokens"):
        PromptLookup(num_tokens=0)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> graphopt.Engine:
    """The trained decoder compiled from its checkpoint directory (tokenizer shipped)."""
    out = tmp_path_factory.mktemp("spec") / "shakespeare"
    graphopt.compile(str(SHAKESPEARE), pipeline="cleanup,fuse,kv-cache", target="onnx", out=out, report=None,
                     dynamic={n: {0: (1, 8), 1: (1, 128)} for n in ("input_ids", "attention_mask")})
    return graphopt.load(out)


@pytest.mark.skipif(not (DRAFT / "model.safetensors").is_file(), reason="samples/shakespeare/draft is not trained")
def test_trained_decoder_with_its_trained_draft(tmp_path, shakespeare):
    """The trained decoder with the committed 1-layer draft (same tokenizer) on held-out text of
    mixed lengths: tokens equal plain generate, and the draft's tokens are accepted often."""
    from tokenizers import Tokenizer

    dyn = {n: {0: (1, 8), 1: (1, 128)} for n in ("input_ids", "attention_mask")}
    graphopt.compile(str(DRAFT), pipeline="cleanup,fuse,kv-cache", target="onnx", out=tmp_path / "d",
                     report=None, dynamic=dyn)
    target = shakespeare
    tok = Tokenizer.from_file(str(SHAKESPEARE / "tokenizer.json"))
    from tests.conftest import load_sample_model

    sh = load_sample_model("shakespeare")
    held = sh.split_text(sh.read_text())[1]
    texts = [held[100:400], held[2000:2100], held[5000:5600]]
    enc = [tok.encode(t).ids[:48] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.zeros(len(enc), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    ref = target.generate(ids, 40, attention_mask=mask)
    got = target.generate(ids, 40, attention_mask=mask, speculative=tmp_path / "d")
    assert torch.equal(got, ref)
    assert got.speculation["acceptance_rate"] > 0.3, got.speculation


def test_cli_generate_speculative_and_a_draft_cut_from_the_checkpoint(tmp_path, capsys, shakespeare):
    """`graphopt compile DIR --layers 1` makes a draft from the target's own checkpoint;
    `graphopt generate --speculative` prints the same text as without, and the acceptance."""
    from graphopt.cli import main

    dyn = ["--dynamic", "input_ids:1=1..96", "--dynamic", "attention_mask:1=1..96", "--dynamic",
           "input_ids:0=1..2", "--dynamic", "attention_mask:0=1..2"]
    assert main(["compile", str(SHAKESPEARE), "--pipeline", "cleanup,fuse,kv-cache", "--out", str(tmp_path / "d"),
                 "-q", "--report", "json", "--layers", "1", *dyn]) == 0
    capsys.readouterr()
    manifest = graphopt.load(tmp_path / "d").manifest
    assert manifest["generation"]["layers"] == 1
    target = str(shakespeare.path)
    prompt = "ROMEO:\nBut soft, what light"
    assert main(["generate", target, "--prompt", prompt, "--max-new-tokens", "24"]) == 0
    plain = capsys.readouterr().out
    for spec in ("prompt-lookup", str(tmp_path / "d")):
        assert main(["generate", target, "--prompt", prompt, "--max-new-tokens", "24",
                     "--speculative", spec, "--draft-tokens", "3"]) == 0
        got = capsys.readouterr()
        assert got.out == plain
        assert "drafts accepted" in got.err
    assert main(["generate", target, "--prompt", prompt, "--draft-tokens", "3"]) == 2
    assert "--draft-tokens needs --speculative" in capsys.readouterr().err
    assert main(["compile", str(SHAKESPEARE), "--layers", "9", "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "has 4 decoder layers" in capsys.readouterr().err


def test_any_schedule_of_draft_lengths_is_lossless(llama, monkeypatch):
    """The draft length changes per step with the machine's timings; whatever the schedule
    (plain steps without drafts between drafting ones included), the tokens are plain generate's
    and the drafter's cache stays in step with the target's: the target as its own draft has
    every draft accepted (a draft cache rolled back wrongly proposes other tokens)."""
    import itertools

    import graphopt.speculative as spec

    target = llama[3]
    ids, mask = _batch(256, seed=21)
    ref = target.generate(ids, 40, attention_mask=mask)
    for schedule in ([2, 0, 0, 3, 0, 1, 5], [0, 0, 1], [7]):
        for opts in (Draft(target), PromptLookup()):
            lengths = itertools.cycle(schedule)
            monkeypatch.setattr(spec._Policy, "k", lambda self, lengths=lengths: next(lengths))
            out = target.generate(ids, 40, attention_mask=mask, speculative=opts)
            assert torch.equal(out, ref), schedule
            if isinstance(opts, Draft):
                assert out.speculation["acceptance_rate"] == 1.0, (schedule, out.speculation)
