"""The HTTP API: OpenAI-compatible completions over a :class:`~graphopt.serving.scheduler.Scheduler`.

``POST /v1/completions`` (prompt as text, tokenized with the artifact's tokenizer.json, or as token
ids; ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``stream`` with
server-sent events, ``n=1``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus
text). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request, 429 (with ``Retry-After``) when the queue is full, 500 when the model failed on the
request's batch, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from graphopt.errors import InputError
from graphopt.serving.metrics import CONTENT_TYPE, PrometheusMetrics
from graphopt.serving.sampling import Sampling
from graphopt.serving.scheduler import QueueFull, Scheduler, Sequence, ShuttingDown

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """What ``graphopt serve`` was started with."""

    artifact: str
    model_name: str = ""
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_per_step: int = 256
    eos: list[int] = field(default_factory=list)
    threads: int | None = None
    shutdown_timeout: float = 30.0
    cache: str = "auto"


class CompletionRequest(BaseModel):
    """OpenAI's completion request (the fields graphopt serves; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    n: StrictInt = 1


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class _Text:
    """Incremental detokenization with stop strings: ``push(token)`` returns the text that may be
    sent now (held back while it could still be the start of a stop string, or while the last
    tokens end inside a UTF-8 character).

    Each token decodes a short window, not the whole completion (the way TGI and vLLM do it): the
    text of ``ids[prefix:]`` minus that of ``ids[prefix:read]``, so what a tokenizer does at the
    start of a decode (a dropped leading space) cancels out."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read]
        self.prefix = self.read = 0
        self.sent = 0
        self.stopped = False

    def _decode(self, final: bool = False) -> None:
        if self.tokenizer is None:
            return
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        self._decode()
        text = self.text
        for s in self.stop:
            at = text.find(s, self.sent)  # text before `sent` holds no stop string: it was checked
            if at >= 0:
                self.stopped = True
                out, self.sent = text[self.sent:at], at
                return out
        safe = max(self.sent, len(text) - self.hold)
        out, self.sent = text[self.sent:safe], safe
        return out

    def rest(self) -> str:
        if self.stopped:
            return ""
        self._decode(final=True)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def full(self) -> str:
        if not self.stopped:
            self._decode(final=True)
        return self.text[: self.sent] if self.stopped else self.text


class _Outbox:
    """Events from the scheduler thread to the event loop's request queues, delivered in bulk: a
    decode step emits one token per running request, and waking the loop once for all of them
    (instead of once per token) leaves the cores to the model."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, tuple[str, Any]]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, event: tuple[str, Any]) -> None:
        """From any thread: queue ``event``; the first event since the last delivery wakes the loop."""
        with self.lock:
            self.pending.append((queue, event))
            wake = len(self.pending) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop has closed (shutdown): nobody is left to read these
                with self.lock:
                    self.pending.clear()
                raise

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def create_app(config: ServeConfig) -> FastAPI:
    import graphopt

    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # ONNX Runtime's idle threads do not spin: between forwards the cores go to the event loop
        # (tokens out, requests in); spinning took them and cut batched throughput by a quarter
        engine = graphopt.load(config.artifact, spinning=False,
                               **({"threads": config.threads} if config.threads else {}))
        metrics = PrometheusMetrics()
        state["metrics"] = metrics
        state["scheduler"] = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue,
                                       max_tokens_per_step=config.max_tokens_per_step, metrics=metrics,
                                       cache=config.cache).start()
        if state["scheduler"].batch.kind == "slots":
            engine.runner.close()  # the slot graph's session has its own copy of the weights
        tok = Path(config.artifact) / "tokenizer.json"
        if tok.is_file():
            from tokenizers import Tokenizer

            state["tokenizer"] = Tokenizer.from_file(str(tok))
        else:
            state["tokenizer"] = None
            log.warning("%s has no tokenizer.json: prompts must be token ids, and completions carry their tokens "
                        "in choices[0].token_ids with an empty text", config.artifact)
        state["name"] = config.model_name or Path(config.artifact).resolve().name
        state["created"] = int(time.time())
        log.info("serving %s (%s), max batch %d, KV cache: %s", state["name"], config.artifact, config.max_batch,
                 state["scheduler"].batch.kind)
        yield
        finished = await asyncio.to_thread(state["scheduler"].stop, config.shutdown_timeout)
        if not finished:
            log.warning("shutdown: requests still running after %.0f s were ended", config.shutdown_timeout)

    app = FastAPI(title="graphopt serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON: {first.get('msg', '')}")
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}", param=where or None)

    @app.get("/health")
    async def health() -> JSONResponse:
        sch: Scheduler = state["scheduler"]
        if not sch.alive:
            return error(503, "the scheduler thread has stopped", kind="server_error")
        return JSONResponse({"status": "ok", "model": state["name"], **sch.state()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state["metrics"].text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": state["name"], "object": "model", "created": state["created"], "owned_by": "graphopt"}]})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        m: PrometheusMetrics = state["metrics"]
        sch: Scheduler = state["scheduler"]
        try:
            prompt = _prompt_ids(body.prompt, state["tokenizer"])
            if body.n != 1:
                raise InputError("n must be 1: graphopt serve returns one completion per request")
            if body.model not in (None, "", state["name"]):
                raise InputError(f"model {body.model!r} is not served here; this server serves {state['name']!r}")
            sch.check(prompt, body.max_tokens)
        except InputError as e:
            m.requests.labels("400").inc()
            return error(400, str(e))
        outbox = state.setdefault("outbox", _Outbox(asyncio.get_running_loop()))
        events: asyncio.Queue = asyncio.Queue()
        seq = Sequence(prompt, body.max_tokens,
                       Sampling(body.temperature, body.top_k, body.top_p, body.seed),
                       frozenset(config.eos),
                       on_event=lambda kind, value: outbox.put(events, (kind, value)))
        try:
            sch.submit(seq)
        except QueueFull as e:
            m.requests.labels("429").inc()
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"})
        except ShuttingDown as e:
            m.requests.labels("503").inc()
            return error(503, str(e), kind="server_error")
        m.prompt_tokens.inc(len(prompt))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        text = _Text(state["tokenizer"], stop)
        head = {"id": f"cmpl-{seq.id}", "object": "text_completion", "created": int(time.time()),
                "model": state["name"]}
        if body.stream:
            return StreamingResponse(_stream(sch, seq, events, text, head, m), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _whole(sch, seq, events, text, head, request, m, len(prompt))

    return app


def _prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        raise InputError(f"the prompt holds {len(prompt)} prompts; send one prompt per request")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputError("this artifact ships no tokenizer.json, so a text prompt cannot be tokenized; send "
                             "the prompt as token ids (a list of ints)")
        ids = tokenizer.encode(prompt).ids
        if not ids:
            raise InputError("the prompt is empty after tokenization; send at least one token")
        return list(ids)
    return [int(t) for t in prompt]


def _choice(text: str, ids: list[int], finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish, "token_ids": ids}


async def _whole(sch: Scheduler, seq: Sequence, events: asyncio.Queue, text: _Text, head: dict, request: Request,
                 m: PrometheusMetrics, n_prompt: int) -> JSONResponse:
    ids: list[int] = []
    while True:
        try:
            kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                sch.cancel(seq)
                m.requests.labels("disconnected").inc()
                return error(499, "the client went away")
            continue
        if kind == "token":
            ids.append(value)
            text.push(value)
            if text.stopped:
                sch.cancel(seq)
                finish = "stop"
                break
        elif kind == "done":
            finish = value
            break
        else:
            m.requests.labels("500").inc()
            return error(500, value, kind="server_error")
    m.requests.labels("200").inc()
    return JSONResponse({**head, "choices": [_choice(text.full(), ids, finish)],
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids),
                                   "total_tokens": n_prompt + len(ids)}})


async def _stream(sch: Scheduler, seq: Sequence, events: asyncio.Queue, text: _Text, head: dict,
                  m: PrometheusMetrics) -> AsyncIterator[str]:
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    done = False
    try:
        while True:
            kind, value = await events.get()
            if kind == "token":
                delta = text.push(value)
                if text.stopped:
                    sch.cancel(seq)
                    yield event({**head, "choices": [_choice(delta, [value], "stop")]})
                    break
                yield event({**head, "choices": [_choice(delta, [value], None)]})
            elif kind == "done":
                yield event({**head, "choices": [_choice(text.rest(), [], value)]})
                break
            else:
                m.requests.labels("500").inc()
                yield event({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                done = True
                return
        done = True
        m.requests.labels("200").inc()
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away mid-stream: free its row
            sch.cancel(seq)
            m.requests.labels("disconnected").inc()
