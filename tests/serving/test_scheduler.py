"""The continuous-batching scheduler on real artifacts: every request's greedy tokens equal
``Engine.generate`` on its prompt alone whatever runs beside it, seeded sampling is reproducible
per request, a failed forward fails only its batch, and the cache is bounded by the batch."""

from __future__ import annotations

import random
import threading

import pytest
import torch

import graphopt
from graphopt.errors import InputError
from graphopt.serving.sampling import Sampling
from graphopt.serving.scheduler import QueueFull, Scheduler, Sequence

from .conftest import VOCAB


class Collect:
    def __init__(self):
        self.tokens: list[int] = []
        self.end: tuple[str, object] | None = None
        self.done = threading.Event()

    def __call__(self, kind, value):
        if kind == "token":
            self.tokens.append(value)
        else:
            self.end = (kind, value)
            self.done.set()


def _requests(n: int, vocab: int, max_prompt: int, max_new: int, seed: int):
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(1, max_prompt))], rng.randint(1, max_new))
            for _ in range(n)]


def _on_calls(batch, hook):
    """Call ``hook(ids)`` before every forward of the scheduler's batch (the slot graph's calls, or
    the artifact's graph's)."""
    if batch.kind == "slots":
        real = batch._run
        batch._run = lambda start, ids, *rest: hook(ids) or real(start, ids, *rest)
    else:
        real = batch.forward
        batch.forward = lambda ids, *rest: hook(ids) or real(ids, *rest)


def _run_all(scheduler, reqs, sampling=lambda i: Sampling()):
    got = []
    for i, (prompt, n) in enumerate(reqs):
        c = Collect()
        scheduler.submit(Sequence(prompt, n, sampling(i), on_event=c))
        got.append(c)
    for c in got:
        assert c.done.wait(120), "a request never finished"
    return got


@pytest.mark.parametrize("which,cache", [("shakespeare", "slots"), ("shakespeare", "concat"), ("llama", "slots"),
                                         ("llama_static", "concat"), ("llama_torch", "concat")])
def test_64_concurrent_requests_decode_as_each_alone(request, which, cache):
    """In-place slot buffers (rows at their own lengths, written by the slot graph), the
    artifact's appended dynamic cache (rows left-padded to a common length) and a static one
    (slot buffers, rows shifted to the batch's cache position) alike, on ONNX Runtime and on the
    torch target (whose program takes no empty past: one padding slot stands for it). Prompts of
    1..40 tokens with a budget of 24 per call: short ones are prefilled in groups, long ones in
    chunks, and no call ever takes more than the budget."""
    path = request.getfixturevalue(f"{which}_artifact")
    engine = graphopt.load(path)
    vocab = VOCAB if which.startswith("llama") else 512
    reqs = _requests(64, vocab, 40, 24, seed=1)
    budget, calls = 24, []
    scheduler = Scheduler(engine, max_batch=8, max_queue=64, max_tokens_per_step=budget, cache=cache)
    assert scheduler.state()["cache"] == cache  # auto picks the slots where it can
    _on_calls(scheduler.batch, lambda ids: calls.append(tuple(ids.shape)))
    scheduler.start()
    try:
        got = _run_all(scheduler, reqs)
    finally:
        assert scheduler.stop(10)
    for (prompt, n), c in zip(reqs, got):
        alone = engine.generate(torch.tensor([prompt]), n)[0, len(prompt):].tolist()
        assert c.tokens == alone and c.end == ("done", "length")
    state = scheduler.state()
    assert state["running"] == 0 and state["cache_bytes"] == 0  # every row freed
    prefills = [b * s for b, s in calls if s > 1]
    assert max(prefills) == budget  # long prompts were chunked to the budget, never past it
    assert any(b > 1 for b, s in calls if s > 1)  # short ones shared calls


def test_seeded_sampling_is_reproducible_per_request(llama_artifact):
    engine = graphopt.load(llama_artifact)
    reqs = _requests(12, VOCAB, 20, 16, seed=2)
    sampled = {3: 7, 8: 11}  # request index -> seed; the others decode greedily beside them

    def sampling(i):
        return Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=sampled[i]) if i in sampled else Sampling()

    scheduler = Scheduler(engine, max_batch=4).start()
    try:
        crowd = _run_all(scheduler, reqs, sampling)
        alone = {i: _run_all(scheduler, [reqs[i]], lambda _i, i=i: sampling(i))[0] for i in sampled}
        other_seed = _run_all(scheduler, [reqs[3]], lambda _i: Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=8))[0]
    finally:
        scheduler.stop(10)
    for i in sampled:
        assert crowd[i].tokens == alone[i].tokens
    assert other_seed.tokens != crowd[3].tokens  # the draws do depend on the seed


@pytest.mark.parametrize("cache", ["slots", "concat"])
def test_a_failed_forward_fails_its_batch_and_the_scheduler_goes_on(llama_artifact, cache):
    engine = graphopt.load(llama_artifact)
    poison = 77

    def hook(ids):
        if bool((torch.as_tensor(ids) == poison).any()):
            raise RuntimeError("injected failure")

    scheduler = Scheduler(engine, max_batch=4, cache=cache)
    _on_calls(scheduler.batch, hook)
    scheduler.start()
    try:
        bad = _run_all(scheduler, [([5, poison, 9], 4)])[0]
        assert bad.end[0] == "error" and "injected failure" in bad.end[1]
        good = _run_all(scheduler, [([5, 6, 9], 4), ([1, 2], 3)])
        assert all(c.end == ("done", "length") for c in good)
    finally:
        scheduler.stop(10)


def test_cancel_frees_the_row_and_the_queue_is_bounded(llama_artifact):
    engine = graphopt.load(llama_artifact)
    scheduler = Scheduler(engine, max_batch=1, max_queue=2)  # not started yet: both wait
    first, second = Collect(), Collect()
    long = Sequence([1, 2, 3], 80, on_event=first)
    scheduler.submit(long)
    scheduler.submit(Sequence([4, 5], 3, on_event=second))
    with pytest.raises(QueueFull, match="retry later"):
        scheduler.submit(Sequence([6], 2))
    scheduler.start()
    while len(first.tokens) < 2:
        threading.Event().wait(0.01)
    scheduler.cancel(long)  # its row goes; the waiting request takes it
    assert second.done.wait(60) and second.end == ("done", "length")
    assert not first.done.is_set() and len(first.tokens) < 80
    assert scheduler.stop(10) and scheduler.state()["running"] == 0


def test_requests_the_artifact_cannot_hold_are_refused(llama_artifact):
    scheduler = Scheduler(graphopt.load(llama_artifact), max_batch=2)
    with pytest.raises(InputError, match="exceeds the model's length of 96 tokens"):
        scheduler.submit(Sequence([1] * 90, 10))
    with pytest.raises(InputError, match="max_tokens must be >= 1"):
        scheduler.submit(Sequence([1], 0))
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        scheduler.submit(Sequence([VOCAB + 5], 2))
    with pytest.raises(InputError, match="outside the batch range"):
        Scheduler(graphopt.load(llama_artifact), max_batch=64)


def test_without_chunks_a_long_prompt_is_prefilled_whole_and_alone(llama_artifact, monkeypatch):
    """Where the runtime takes a prompt only with an empty cache (TensorRT's profiles), a prompt over
    the budget is prefilled in one call of its own; the tokens are still each prompt's alone."""
    from graphopt.serving.batch import CacheBatch

    monkeypatch.setattr(CacheBatch, "chunks", property(lambda self: False))
    engine = graphopt.load(llama_artifact)
    calls = []
    reqs = [([7] * 30, 3), ([5, 6], 3), ([9] * 12, 2)]
    scheduler = Scheduler(engine, max_batch=4, max_tokens_per_step=8, cache="concat")
    _on_calls(scheduler.batch, lambda ids: calls.append(tuple(ids.shape)))
    scheduler.start()
    try:
        got = _run_all(scheduler, reqs)
    finally:
        scheduler.stop(10)
    assert (1, 30) in calls and (1, 12) in calls
    for (prompt, n), c in zip(reqs, got):
        assert c.tokens == engine.generate(torch.tensor([prompt]), n)[0, len(prompt):].tolist()
