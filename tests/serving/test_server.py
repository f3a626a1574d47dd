"""``graphopt serve`` in a subprocess, driven by real clients: the ``openai`` package for the API,
raw httpx for server-sent events, errors, disconnects and load, signals for the shutdown."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

import graphopt
from graphopt.serving.process import Server


def _alone(artifact, prompt_ids: list[int], n: int) -> list[int]:
    return graphopt.load(artifact).generate(torch.tensor([prompt_ids]), n)[0, len(prompt_ids):].tolist()


def _tokenizer(artifact):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(artifact / "tokenizer.json"))


def _post_all(url: str, bodies: list[dict], timeout: float = 300) -> list[httpx.Response]:
    """Every body POSTed to /v1/completions at once (async httpx, one connection each)."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                     limits=httpx.Limits(max_connections=len(bodies) + 1)) as client:
            return await asyncio.gather(*[client.post("/v1/completions", json=b) for b in bodies])

    return asyncio.run(main())


def test_the_openai_client_completes_and_streams(shakespeare_server, shakespeare_artifact):
    from openai import OpenAI

    client = OpenAI(base_url=shakespeare_server.url + "/v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == "shakespeare" and model.owned_by == "graphopt"
    prompt = "ROMEO:\nWhat light through yonder"
    tok = _tokenizer(shakespeare_artifact)
    ids = tok.encode(prompt).ids
    want = _alone(shakespeare_artifact, ids, 24)
    out = client.completions.create(model=model.id, prompt=prompt, max_tokens=24, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text == tok.decode(want)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 24
    chunks = list(client.completions.create(model=model.id, prompt=ids, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == tok.decode(want)
    assert chunks[-1].choices[0].finish_reason == "length"
    stopped = client.completions.create(model=model.id, prompt=prompt, max_tokens=24, temperature=0,
                                        stop=[tok.decode(want)[5:8]])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == tok.decode(want)[:5]


def test_64_concurrent_clients_each_get_their_own_tokens(shakespeare_server, shakespeare_artifact):
    rng = random.Random(3)
    reqs = [([rng.randrange(1, 512) for _ in range(rng.randint(1, 40))], rng.randint(1, 20)) for _ in range(64)]

    responses = _post_all(shakespeare_server.url, [{"prompt": p, "max_tokens": n, "temperature": 0} for p, n in reqs])
    assert [r.status_code for r in responses] == [200] * 64
    bodies = [r.json() for r in responses]
    assert len({b["id"] for b in bodies}) == 64  # none lost, none duplicated
    for (prompt, n), body in zip(reqs, bodies):
        assert body["choices"][0]["token_ids"] == _alone(shakespeare_artifact, prompt, n)
    metrics = httpx.get(shakespeare_server.url + "/metrics").text
    assert 'graphopt_requests_total{status="200"}' in metrics and "graphopt_batch_size_bucket" in metrics
    assert "graphopt_time_to_first_token_seconds_count" in metrics
    assert httpx.get(shakespeare_server.url + "/health").json()["running"] == 0


@pytest.mark.parametrize("body, match", [
    ("{not json", "not valid JSON"),
    ({"prompt": [1, 2], "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"prompt": [1, 2], "max_tokens": 4, "temperature": "hot"}, "temperature"),
    ({"prompt": [1] * 120, "max_tokens": 20}, "exceeds the model's length of 128 tokens"),
    ({"prompt": [1, 2], "n": 2}, "n must be 1"),
    ({"prompt": ["a", "b"]}, "send one prompt per request"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [1, 2], "model": "gpt-4"}, "is not served here"),
])
def test_bad_requests_get_400_in_openais_error_shape(shakespeare_server, body, match):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(shakespeare_server.url + "/v1/completions", timeout=30, **kwargs)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and match in err["message"]


def test_unknown_fields_are_ignored(shakespeare_server):
    r = httpx.post(shakespeare_server.url + "/v1/completions", timeout=30,
                   json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0, "frequency_penalty": 0, "user": "x"})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2


def test_a_disconnected_stream_frees_its_row(shakespeare_server):
    with httpx.Client(base_url=shakespeare_server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions",
                           json={"prompt": [5, 6, 7], "max_tokens": 100, "temperature": 0, "stream": True}) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if len(events) == 3:
                    break
        assert all(e["choices"][0]["finish_reason"] is None for e in events)
    deadline = time.monotonic() + 30
    while httpx.get(shakespeare_server.url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    health = httpx.get(shakespeare_server.url + "/health").json()
    assert health["running"] == 0 and health["cache_bytes"] == 0 and health["cache"] == "slots"
    metrics = httpx.get(shakespeare_server.url + "/metrics").text
    assert 'graphopt_requests_total{status="disconnected"} 1.0' in metrics


def test_a_full_queue_answers_429_with_retry_after(shakespeare_artifact):
    server = Server(shakespeare_artifact, "--max-batch", "1", "--max-queue", "1")
    try:
        responses = _post_all(server.url, [{"prompt": [1, 2, 3], "max_tokens": 60, "temperature": 0}] * 6)
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        server.stop()


def test_sigterm_finishes_running_requests_then_exits_0(shakespeare_artifact):
    server = Server(shakespeare_artifact)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with client.stream("POST", "/v1/completions",
                           json={"prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0


def test_serve_refuses_what_it_cannot_serve_with_exit_2(tmp_path, shakespeare_artifact, llama_static_artifact):
    run = [sys.executable, "-m", "graphopt.cli", "serve"]
    static = subprocess.run(run + [str(llama_static_artifact), "--cache", "slots"], capture_output=True, text=True,
                            timeout=120)
    assert static.returncode == 2 and "--cache slots needs an ONNX artifact with a dynamic cache" in static.stderr
    bad = subprocess.run(run + [str(shakespeare_artifact), "--max-batch", "64"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "outside the batch range the artifact was compiled for" in bad.stderr
    missing = subprocess.run(run + [str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not an artifact directory" in missing.stderr
    helped = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--max-tokens-per-step" in helped.stdout


def test_two_worker_processes_serve_the_same_port(llama_artifact):
    server = Server(llama_artifact, "--workers", "2", "--max-batch", "4")
    try:
        responses = _post_all(server.url, [{"prompt": [3, 4, 5 + i], "max_tokens": 6, "temperature": 0}
                                           for i in range(8)])
        assert [r.status_code for r in responses] == [200] * 8
        for i, r in enumerate(responses):
            assert r.json()["choices"][0]["token_ids"] == _alone(llama_artifact, [3, 4, 5 + i], 6)
    finally:
        assert server.stop() == 0
