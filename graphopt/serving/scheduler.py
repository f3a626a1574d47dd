"""Iteration-level batching: requests join and leave the running batch between decode steps.

One thread owns the engine. Every iteration it

1. drops cancelled sequences (a client that went away) and frees their cache rows;
2. prefills at most ``max_tokens_per_step`` prompt tokens (padding counted), in one call, while
   the batch has a free row (``max_batch`` rows, a prompt being prefilled holds one): either
   waiting requests of similar lengths together (padded to the longest, an empty cache; the padding is
   kept under a quarter of the call), or the next chunk of a prompt longer than the budget (after
   the cache its earlier chunks left; chunked prefill, as in vLLM and Sarathi). A request whose
   prompt is done gets its first token and its cache rows join the running batch;
3. runs one decode step over every running sequence (``[B, 1]`` with the batch's cache) and picks
   each one's next token with its own sampling settings.

So a decode step waits for at most one prefill call of ``max_tokens_per_step`` tokens: the budget
bounds the running requests' inter-token latency, and a long prompt never holds them up for its
whole length. (TensorRT engines take a prompt only with an empty cache: there a long prompt is
prefilled whole, alone.)

A sequence leaves when it produces an end-of-sequence token, reaches its ``max_tokens`` or the
artifact's length. The cache is bounded by ``max_batch`` rows of at most the artifact's length;
when every row is taken, new requests wait in the queue (``max_queue`` of them; past that,
:meth:`Scheduler.submit` raises :class:`QueueFull`), never evicting a running one. A forward that
raises fails the requests of that batch only; the scheduler keeps serving.

Events go to each sequence's ``on_event(kind, value)`` from the scheduler thread: ``("token",
id)``, then one of ``("done", reason)`` (``"stop"``: an end-of-sequence token, ``"length"``:
``max_tokens`` or the artifact's length) or ``("error", message)``.

The cache itself is :func:`make_batch`'s: in-place slot buffers (:mod:`graphopt.serving.slots`,
rows at their own lengths) where the artifact allows them, else the artifact's appended cache
(:mod:`graphopt.serving.batch`, rows left-padded to a common length).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graphopt.errors import GraphoptError, InputError
from graphopt.runtime.generation import limits
from graphopt.serving.batch import CacheBatch
from graphopt.serving.sampling import Sampling

if TYPE_CHECKING:
    from graphopt.runtime.engine import Engine

log = logging.getLogger(__name__)

_ids = itertools.count(1)


class QueueFull(GraphoptError):
    """Every batch row is taken and the queue is full: retry later (HTTP 429)."""


class ShuttingDown(GraphoptError):
    """The server is stopping and takes no new requests (HTTP 503)."""


@dataclass(eq=False)
class Sequence:
    """One request in flight."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    eos: frozenset[int] = frozenset()
    on_event: Callable[[str, Any], None] = lambda kind, value: None
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    past: Any = None  # (cache, length) of the prompt's chunks prefilled so far
    filled: int = 0  # prompt tokens prefilled so far


class Metrics:
    """What the scheduler reports (no-ops here; :mod:`graphopt.serving.metrics` records them)."""

    def batch(self, rows: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, n: int) -> None: ...
    def queue(self, waiting: int, running: int, cache_bytes: int) -> None: ...


#: How far the slot graph's logits may be from the artifact's graph's on the start-up probe
#: (relative to the logits' scale): float32 kernels that add in another order differ by ~1e-6.
SLOT_TOLERANCE = 1e-3


def make_batch(engine: Engine, max_batch: int, cache: str = "auto") -> Any:
    """The running batch's cache: in-place slot buffers (:mod:`graphopt.serving.slots`) where the
    artifact allows them and they match its graph on a probe, else the artifact's own appended
    cache (:class:`CacheBatch`). ``cache``: ``"auto"``, ``"slots"`` (refuse otherwise) or
    ``"concat"``."""
    from graphopt.serving.slots import SlotBatch, SlotsUnavailable

    if cache not in ("auto", "slots", "concat"):
        raise InputError(f"cache must be auto, slots or concat, got {cache!r}")
    if cache != "concat":
        try:
            batch = SlotBatch(engine, max_batch)
            worst = batch.check()
            if not worst <= SLOT_TOLERANCE:
                raise SlotsUnavailable(f"its logits differ from the artifact's graph by {worst:.2g} (relative) on "
                                       "a probe")
            log.info("KV cache: in-place slot buffers (probe: logits within %.1g of the artifact's graph)", worst)
            return batch
        except SlotsUnavailable as e:
            if cache == "slots":
                raise InputError(f"{engine.path} cannot be served from in-place slot buffers: {e}; serve it with "
                                 "--cache concat") from e
            log.warning("KV cache: the artifact's own (appended) cache, copied every step: in-place slot buffers "
                        "are not available: %s", e)
    return CacheBatch(engine)


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, max_tokens_per_step: int = 256,
                 metrics: Metrics | None = None, cache: str = "auto"):
        self.limits = limits(engine.manifest)
        lo, hi = self.limits.batch
        if not 1 <= max_batch <= hi:
            raise InputError(f"max_batch={max_batch} is outside the batch range the artifact was compiled for "
                             f"({lo}..{hi}); pass --max-batch {hi} or less, or recompile with --dynamic "
                             f"{self.limits.ids}:0=1..{max_batch}")
        if max_queue < 0 or max_tokens_per_step < 1:
            raise InputError("max_queue must be >= 0 and max_tokens_per_step >= 1")
        self.max_batch, self.max_queue, self.max_tokens_per_step = max_batch, max_queue, max_tokens_per_step
        self.batch = make_batch(engine, max_batch, cache)
        self.metrics = metrics or Metrics()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None  # a long prompt being prefilled chunk by chunk
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="graphopt-scheduler", daemon=True)
        self.cache_budget = max_batch * self.limits.max_len * self.batch.bytes_per_token()

    # -- the caller's side ---------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def check(self, prompt: list[int], max_tokens: int) -> None:
        """What :meth:`submit` refuses, as an :class:`InputError` (HTTP 400) saying the limit."""
        lim = self.limits
        if not prompt:
            raise InputError("the prompt is empty; send at least one token")
        if lim.vocab is not None and (min(prompt) < 0 or max(prompt) >= lim.vocab):
            raise InputError(f"the prompt holds token ids outside the model's vocabulary 0..{lim.vocab - 1}")
        if len(prompt) > lim.prompt[1]:
            raise InputError(f"the prompt has {len(prompt)} tokens but the model takes at most {lim.prompt[1]} in "
                             "one call")
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt) + max_tokens > lim.max_len:
            raise InputError(f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"length of {lim.max_len} tokens; lower max_tokens to {lim.max_len - len(prompt)} or "
                             "less" if len(prompt) < lim.max_len else
                             f"the prompt ({len(prompt)} tokens) fills the model's length of {lim.max_len} tokens")

    def submit(self, seq: Sequence) -> Sequence:
        self.check(seq.prompt, seq.max_tokens)
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; send the request to another instance")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.running)} requests are running and {len(self.waiting)} waiting (the "
                                f"most the queue takes); retry later")
            self.waiting.append(seq)
            self._report()
            self._cv.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (its client went away, or it hit a stop string): its row is freed before
        the next step and it gets no more events."""
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Take no new requests, let the queued and running ones finish (up to ``timeout`` seconds;
        the rest get an error event), then end the thread. True when everything finished."""
        with self._cv:
            self._accepting = False
            done = self._cv.wait_for(lambda: not self.waiting and not self.running and self.prefilling is None,
                                     timeout)
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        for seq in list(self.waiting) + list(self.running) + ([self.prefilling] if self.prefilling else []):
            self._emit(seq, "error", "the server shut down before this request finished")
        return bool(done)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def state(self) -> dict[str, Any]:
        return {"waiting": len(self.waiting), "running": len(self.running) + (self.prefilling is not None),
                "cache": self.batch.kind, "cache_tokens": self.batch.used_tokens(),
                "cache_bytes": self.batch.allocated_bytes(), "cache_budget_bytes": self.cache_budget}

    # -- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self.running or self.prefilling is not None
                                  or any(not s.cancelled for s in self.waiting))
                if self._stop:
                    return
                self._drop_cancelled()
                admitted = self._admit()
                self._report()
            try:
                if admitted:
                    self._prefill(admitted)
                if self.running:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed forward fails its batch, not the server
                log.exception("decode step failed")
                message = f"the model failed on this batch: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                for seq in admitted + self.running:
                    self._emit(seq, "error", message)
                self.running, self.prefilling = [], None
                self.batch.drop(None)
                self.batch.keep([])
            with self._cv:
                self._report()
                self._cv.notify_all()  # stop() waits for an empty batch

    def _drop_cancelled(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        if self.prefilling is not None and self.prefilling.cancelled:
            self.batch.drop(self.prefilling.past)
            self.prefilling.past, self.prefilling = None, None
        keep = [i for i, s in enumerate(self.running) if not s.cancelled]
        if len(keep) != len(self.running):
            order = self.batch.keep(keep)
            self.running = [self.running[i] for i in order]

    def _admit(self) -> list[Sequence]:
        """This iteration's prefill: the chunked prompt in progress, or waiting requests."""
        if self.prefilling is not None:
            return [self.prefilling]
        if not self.waiting or len(self.running) >= self.max_batch:
            return []
        budget = self.max_tokens_per_step
        first = self.waiting.popleft()
        if len(first.prompt) > budget and self.batch.chunks:
            self.prefilling = first
            return [first]
        # others of similar length: padded to the longest, the padding under a quarter of the call
        group, hi, real = [first], len(first.prompt), len(first.prompt)
        for seq in list(self.waiting)[:4 * self.max_batch]:
            if len(self.running) + len(group) >= self.max_batch:
                break
            n = len(seq.prompt)
            top = max(hi, n)
            if (len(group) + 1) * top > budget or (len(group) + 1) * top > 1.25 * (real + n):
                continue
            group.append(seq)
            hi, real = top, real + n
        for seq in group[1:]:
            self.waiting.remove(seq)
        return group

    def _prefill(self, admitted: list[Sequence]) -> None:
        if admitted[0] is self.prefilling:
            seq = self.prefilling
            chunk = seq.prompt[seq.filled:seq.filled + self.max_tokens_per_step]
            logits, pending = self.batch.prefill([chunk], seq.past)
            seq.filled += len(chunk)
            if seq.filled < len(seq.prompt):
                seq.past = pending
                return
            self.prefilling, seq.past = None, None
        else:
            logits, pending = self.batch.prefill([s.prompt for s in admitted])
        keep = [r for r, seq in enumerate(admitted) if self._advance(seq, seq.sampling.pick(logits[r]))]
        self.batch.join(pending, keep)
        self.running.extend(admitted[r] for r in keep)

    def _decode(self) -> None:
        self.metrics.batch(len(self.running))
        logits = self.batch.step([s.generated[-1] for s in self.running])
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row
        keep = [r for r, seq in enumerate(self.running)
                if self._advance(seq, greedy[r] if seq.sampling.temperature <= 0 else seq.sampling.pick(logits[r]))]
        if len(keep) != len(self.running):
            order = self.batch.keep(keep)
            self.running = [self.running[r] for r in order]

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Send ``seq``'s next token; False when the sequence ends here."""
        if seq.cancelled:
            return False
        seq.generated.append(token)
        now = time.monotonic()
        if seq.last_token_at is None:
            self.metrics.first_token(now - seq.submitted_at)
        else:
            self.metrics.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.tokens(1)
        self._emit(seq, "token", token)
        if token in seq.eos:
            self._emit(seq, "done", "stop")
            return False
        if len(seq.generated) >= seq.max_tokens or len(seq.prompt) + len(seq.generated) >= self.limits.max_len:
            self._emit(seq, "done", "length")
            return False
        return True

    def _emit(self, seq: Sequence, kind: str, value: Any) -> None:
        if seq.finished or (seq.cancelled and kind == "token"):
            return
        if kind != "token":
            seq.finished = True
        try:
            seq.on_event(kind, value)
        except Exception:  # noqa: BLE001 - a broken listener must not stop the batch
            log.exception("event listener of request %s failed", seq.id)

    def _report(self) -> None:
        s = self.state()
        self.metrics.queue(s["waiting"], s["running"], s["cache_bytes"])
