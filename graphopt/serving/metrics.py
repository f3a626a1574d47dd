"""Prometheus metrics of one server (its own registry, served as text on ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from graphopt.serving.scheduler import Metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PrometheusMetrics(Metrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("graphopt_requests", "Completion requests by outcome", ["status"], registry=r)
        self.generated = Counter("graphopt_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("graphopt_prompt_tokens", "Prompt tokens received", registry=r)
        self.waiting = Gauge("graphopt_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("graphopt_running", "Sequences in the running batch", registry=r)
        self.cache = Gauge("graphopt_kv_cache_bytes", "KV cache bytes held by the running batch", registry=r)
        self.batch_size = Histogram("graphopt_batch_size", "Sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("graphopt_time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("graphopt_inter_token_latency_seconds", "Time between a sequence's tokens",
                             registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)

    def queue(self, waiting: int, running: int, cache_bytes: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.cache.set(cache_bytes)

    def text(self) -> bytes:
        return generate_latest(self.registry)
