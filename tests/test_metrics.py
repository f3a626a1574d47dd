"""graphopt.verify.metrics: every metric against an answer known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from graphopt.verify import metrics


def uniform_lm(vocab: int):
    """forward_fn of a model that gives every token probability 1/vocab."""
    return lambda ids: torch.zeros(*ids.shape, vocab)


def confident_lm(vocab: int, p: float, stream: torch.Tensor, calls: list | None = None):
    """forward_fn that puts probability ``p`` on the true next token of ``stream`` (it
    finds each row in the stream) and (1 - p) / (vocab - 1) on every other token."""
    other = (1 - p) / (vocab - 1)
    flat = stream.tolist()

    def forward(ids: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(ids.clone())
        logits = torch.full((*ids.shape, vocab), math.log(other), dtype=torch.float64)
        for b, row in enumerate(ids.tolist()):
            start = next(s for s in range(len(flat)) if flat[s : s + len(row)] == row)
            for t in range(len(row)):
                logits[b, t, flat[start + t + 1]] = math.log(p)
        return logits

    return forward


# -- perplexity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 50, 1024])
def test_perplexity_of_a_uniform_model_is_the_vocab_size(vocab):
    targets = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(vocab))
    logits = torch.full((3, 11, vocab), -1.75)
    assert metrics.perplexity(logits, targets) == pytest.approx(vocab, abs=1e-6)


@pytest.mark.parametrize("p", [0.9, 0.5, 0.25, 0.01])
def test_perplexity_of_a_model_with_probability_p_on_the_target_is_one_over_p(p):
    vocab = 10
    targets = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = torch.full((1, 8, vocab), math.log((1 - p) / (vocab - 1)), dtype=torch.float64)
    logits.scatter_(-1, targets.unsqueeze(-1), math.log(p))
    assert metrics.perplexity(logits, targets) == pytest.approx(1 / p, rel=1e-9)


# -- heldout_perplexity ----------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [7, 1024])
def test_heldout_perplexity_of_a_uniform_model_is_the_vocab_size(vocab):
    ids = torch.randint(0, vocab, (1000,), generator=torch.Generator().manual_seed(0))
    ppl = metrics.heldout_perplexity(uniform_lm(vocab), ids, window=16, batch_size=4)
    assert ppl == pytest.approx(vocab, abs=1e-6)


def test_heldout_perplexity_of_a_model_with_probability_p_is_one_over_p():
    # distinct ids so every window is found at exactly one place in the stream
    stream = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    ppl = metrics.heldout_perplexity(confident_lm(200, 0.4, stream), stream, window=8, batch_size=3)
    assert ppl == pytest.approx(1 / 0.4, rel=1e-9)


def test_heldout_perplexity_windows_do_not_overlap_and_drop_the_partial_tail():
    stream = torch.arange(100)
    calls: list[torch.Tensor] = []
    metrics.heldout_perplexity(confident_lm(100, 0.5, stream, calls), stream, window=10, batch_size=4)
    # (100 - 1 - 10) // 10 + 1 = 9 full windows: 99 targets, 90 scored, last 9 targets dropped
    assert [tuple(c.shape) for c in calls] == [(4, 10), (4, 10), (1, 10)]
    rows = torch.cat(calls)
    assert rows[:, 0].tolist() == list(range(0, 90, 10))
    assert torch.equal(rows.reshape(-1), torch.arange(90))


def test_heldout_perplexity_max_windows_keeps_the_first_windows():
    vocab = 50
    stream = torch.randperm(vocab, generator=torch.Generator().manual_seed(2))
    calls: list[torch.Tensor] = []
    # only the first 2 windows are evaluated, by a model that is right on those tokens
    metrics.heldout_perplexity(confident_lm(vocab, 0.8, stream, calls), stream, window=5, max_windows=2)
    assert torch.equal(torch.cat(calls), stream[:10].reshape(2, 5))


def test_heldout_perplexity_scores_only_the_targets_it_promises():
    """Per-window check: a model that is right (p=1-eps) only on the targets it is supposed
    to score, and uniform elsewhere, has perplexity ~1 on both layouts."""
    vocab, window = 13, 6
    stream = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(3))
    spans = metrics.heldout_windows(stream.numel(), window)
    assert spans == [(s, 0) for s in range(0, 6 * 6, 6)]  # (40 - 1 - 6) // 6 + 1 = 6
    overlapping = metrics.heldout_windows(stream.numel(), window, stride=2)
    assert overlapping[0] == (0, 0) and overlapping[1:] == [(s, 4) for s in range(2, 34, 2)]
    assert metrics.heldout_windows(6, window) == []  # 5 targets < one window

    def oracle(ids):  # right on every target; the windowing decides which ones count
        logits = torch.zeros(*ids.shape, vocab, dtype=torch.float64)
        for b, row in enumerate(ids.tolist()):
            start = next(s for s in range(0, 41 - window) if stream[s : s + window].tolist() == row)
            logits[b, torch.arange(window), stream[start + 1 : start + window + 1]] = 60.0
        return logits

    assert metrics.heldout_perplexity(oracle, stream, window=window) == pytest.approx(1.0, abs=1e-12)
    assert metrics.heldout_perplexity(oracle, stream, window=window, stride=2) == pytest.approx(1.0, abs=1e-12)


def test_heldout_perplexity_with_overlapping_windows_scores_each_target_once():
    """stride < window: a model whose loss depends on the position in the window shows
    that only the last ``stride`` positions of every window after the first count."""
    vocab, window, stride = 4, 8, 2
    ids = torch.zeros(41, dtype=torch.int64)
    assert metrics.heldout_perplexity(uniform_lm(vocab), ids, window=window, stride=stride) == pytest.approx(vocab)

    def half_on_zero_early(x):
        logits = torch.zeros(*x.shape, vocab, dtype=torch.float64)
        logits[:, :6, 0] = math.log(3.0)  # p(0) = 3 / (3 + 3) = 1/2 at positions 0..5
        return logits

    # windows: 0, 2, ..., 32 -> 17; the first scores all 8 targets (6 at p=1/2, 2 at p=1/4),
    # the other 16 score positions 6, 7 only (p=1/4): NLL = 6 ln2 + (2 + 32) ln4
    expected = math.exp((6 * math.log(2) + 34 * math.log(4)) / 40)
    got = metrics.heldout_perplexity(half_on_zero_early, ids, window=window, stride=stride)
    assert got == pytest.approx(expected, rel=1e-12)


def test_heldout_perplexity_accepts_model_outputs_and_rejects_short_streams():
    vocab = 9
    ids = torch.randint(0, vocab, (33,), generator=torch.Generator().manual_seed(4))
    as_dict = lambda x: {"logits": torch.zeros(*x.shape, vocab)}  # noqa: E731 - what an Engine returns
    as_tuple = lambda x: (torch.zeros(*x.shape, vocab),)  # noqa: E731
    assert metrics.heldout_perplexity(as_dict, ids, window=8) == pytest.approx(vocab)
    assert metrics.heldout_perplexity(as_tuple, ids.reshape(1, -1), window=8) == pytest.approx(vocab)
    with pytest.raises(ValueError, match="too few"):
        metrics.heldout_perplexity(uniform_lm(vocab), ids[:8], window=8)
    with pytest.raises(ValueError, match="expected"):
        metrics.heldout_perplexity(lambda x: torch.zeros(1, 3, vocab), ids, window=8)


def test_heldout_perplexity_of_a_real_module_matches_perplexity_on_the_same_windows():
    torch.manual_seed(0)
    vocab, window = 17, 6
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)).eval()
    ids = torch.randint(0, vocab, (3 * window + 1,), generator=torch.Generator().manual_seed(5))
    x, y = ids[:-1].reshape(3, window), ids[1:].reshape(3, window)
    with torch.no_grad():
        expected = metrics.perplexity(model(x), y)
    assert metrics.heldout_perplexity(model, ids, window=window, batch_size=2) == pytest.approx(expected, rel=1e-6)


# -- agreement and cosine --------------------------------------------------------------------------
def test_top1_agreement_on_a_crafted_case():
    original = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 2.0, 1.0]], [[0.0, 0.0, 3.0], [1.0, 0.9, 0.0]]])
    candidate = original.clone()
    candidate[1, 1] = torch.tensor([0.9, 1.0, 0.0])  # argmax 0 -> 1: one of four tokens flips
    assert metrics.top1_agreement(original, candidate) == pytest.approx(0.75)
    assert metrics.top1_agreement(original, original * 2 + 1) == 1.0  # argmax is scale/shift invariant


def test_token_cosine_worst_and_mean_on_crafted_vectors():
    original = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    candidate = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [6.0, 8.0]])
    # cosines: 1, 0, -1, 1
    cos = metrics.token_cosine(original, candidate)
    assert cos["worst"] == pytest.approx(-1.0, abs=1e-12)
    assert cos["mean"] == pytest.approx(0.25, abs=1e-12)
    rotated = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    assert metrics.token_cosine(torch.tensor([[1.0, 0.0]]), rotated)["worst"] == pytest.approx(math.sqrt(0.5))


def test_logit_cosine_is_the_mean_token_cosine():
    original = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [3.0, 4.0]]])
    candidate = torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[-1.0, -1.0], [3.0, 4.0]]])
    assert metrics.logit_cosine(original, candidate) == pytest.approx(0.25, abs=1e-12)
    assert metrics.logit_cosine(original, original) == pytest.approx(1.0, abs=1e-12)
