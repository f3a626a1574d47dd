"""A small threaded inference service over any graphopt artifact (TensorRT, ONNX Runtime, torch).

Requests arrive on a queue from any number of client threads; worker threads take them off,
group the ones of the same shape into one batch (up to ``--max-batch`` rows, waiting at most
``--max-wait-ms`` for a batch to fill), run the batch through ONE shared ``graphopt.load`` engine,
split the outputs back per request and resolve each request's future. The engine is safe to call
from several threads (ONNX Runtime sessions and torch programs hold no per-call state; TensorRT
gives each concurrent call its own execution context), so workers need no lock around it.

Run it (the artifact needs a dynamic batch dim to batch; one with a static batch is served one
request per call)::

    python samples/03_production_loading/serve.py build/nanogpt-serve --clients 8 --requests 100

It serves ``clients x requests`` requests built from the artifact's example inputs (fresh random
token ids / values of the same shapes), then checks every response against a single-threaded,
one-request-at-a-time run of the same engine and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_STOP = object()


@dataclasses.dataclass
class _Request:
    inputs: dict[str, torch.Tensor]
    rows: int
    key: tuple
    future: concurrent.futures.Future
    t_submit: float


class BatchingService:
    """Serve requests for one loaded ``graphopt.Engine`` from ``workers`` threads.

    ``submit(**inputs)`` takes one request (keyword inputs named like the artifact's inputs, each
    with a leading batch dim, usually 1) and returns a ``concurrent.futures.Future`` with the
    engine's outputs for exactly those rows, in the model's output structure.
    """

    def __init__(
        self,
        engine: Any,
        *,
        workers: int = 2,
        max_batch: int = 8,
        max_wait_s: float = 0.002,
        max_queue: int = 4096,
    ):
        self.engine = engine
        self.max_batch = max(1, min(max_batch, self._batch_limit(engine)))
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._stats_lock = threading.Lock()
        self.batch_sizes: list[int] = []
        self.latencies_s: list[float] = []
        self._workers = [
            threading.Thread(target=self._loop, name=f"graphopt-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for w in self._workers:
            w.start()

    @staticmethod
    def _batch_limit(engine: Any) -> int:
        """Rows one call may carry: the top of every input's dynamic dim-0 range; 1 when any input
        has a static batch (then requests must match it and are run one per call)."""
        limit = None
        for spec in engine.inputs:
            if 0 not in spec.dynamic:
                return 1
            hi = spec.dynamic[0][1]
            limit = hi if limit is None else min(limit, hi)
        return limit or 1

    # -- client side -------------------------------------------------------------------------
    def submit(self, **inputs: Any) -> concurrent.futures.Future:
        tensors = {
            k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()
        }
        rows = {t.shape[0] if t.dim() else 1 for t in tensors.values()}
        if len(rows) != 1:
            raise ValueError(f"inputs of one request must share their batch size, got {sorted(rows)}")
        key = tuple(sorted((k, tuple(t.shape[1:]), str(t.dtype)) for k, t in tensors.items()))
        if self._closed:
            raise RuntimeError("the service is closed; create a new BatchingService")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Request(tensors, rows.pop(), key, fut, time.perf_counter()))
        return fut

    def __call__(self, **inputs: Any) -> Any:
        return self.submit(**inputs).result()

    def close(self) -> None:
        """Finish the queued requests, then stop the workers."""
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._queue.put(_STOP)
        for w in self._workers:
            w.join()

    def __enter__(self) -> BatchingService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- worker side -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = time.perf_counter() + self.max_wait_s
            rows = first.rows
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
                rows += nxt.rows
            for group in _group(batch, self.max_batch):
                self._run(group)
            if stop:
                return

    def _run(self, group: list[_Request]) -> None:
        live = [r for r in group if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            if len(live) == 1:
                outs = [self.engine(**live[0].inputs)]
            else:
                names = list(live[0].inputs)
                stacked = {n: torch.cat([r.inputs[n] for r in live]) for n in names}
                outs = _split(self.engine(**stacked), [r.rows for r in live])
        except Exception as e:
            if len(live) > 1:  # one bad request must not fail its batch-mates: run each on its own
                for r in live:
                    self._run_one(r)
                return
            live[0].future.set_exception(e)  # the client gets the error; the worker keeps serving
            return
        self._record(live)
        for r, out in zip(live, outs):
            r.future.set_result(out)

    def _run_one(self, r: _Request) -> None:
        try:
            out = self.engine(**r.inputs)
        except Exception as e:
            r.future.set_exception(e)
            return
        self._record([r])
        r.future.set_result(out)

    def _record(self, done: list[_Request]) -> None:
        now = time.perf_counter()
        with self._stats_lock:
            self.batch_sizes.append(sum(r.rows for r in done))
            self.latencies_s.extend(now - r.t_submit for r in done)


def _group(batch: list[_Request], max_rows: int) -> list[list[_Request]]:
    """Requests of the same input shapes (besides the batch dim) and dtypes, at most max_rows each."""
    groups: dict[tuple, list[list[_Request]]] = {}
    for r in batch:
        runs = groups.setdefault(r.key, [[]])
        if runs[-1] and sum(x.rows for x in runs[-1]) + r.rows > max_rows:
            runs.append([])
        runs[-1].append(r)
    return [g for runs in groups.values() for g in runs]


def _split(out: Any, rows: list[int]) -> list[Any]:
    """Batched outputs (tensor / tuple / list / dict of them) → one output per request."""
    total = sum(rows)
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != total:
            raise RuntimeError(
                f"an output of shape {tuple(out.shape)} has no batch dim of {total} rows; "
                f"serve this artifact with max_batch=1"
            )
        return list(torch.split(out, rows))
    if isinstance(out, Mapping):
        parts = {k: _split(v, rows) for k, v in out.items()}
        return [{k: parts[k][i] for k in out} for i in range(len(rows))]
    if isinstance(out, (tuple, list)):
        parts = [_split(v, rows) for v in out]
        return [type(out)(p[i] for p in parts) for i in range(len(rows))]
    raise TypeError(f"cannot split an output of type {type(out).__name__} per request")


# -- demo / self-check ---------------------------------------------------------------------------
def make_requests(engine: Any, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` one-row requests shaped like the artifact's example inputs, with fresh random values."""
    examples = engine.example_inputs()
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        req = {}
        for spec in engine.inputs:
            ex = torch.as_tensor(examples[spec.name][:1])
            if ex.dtype.is_floating_point:
                req[spec.name] = torch.randn(ex.shape, generator=g, dtype=torch.float32).to(ex.dtype)
            elif ex.dtype == torch.bool or "mask" in spec.name:
                req[spec.name] = torch.ones_like(ex)
            else:  # token ids: stay below the largest id seen in the examples (a safe vocabulary bound)
                hi = int(np.asarray(examples[spec.name]).max()) + 1
                req[spec.name] = torch.randint(0, max(hi, 2), ex.shape, generator=g, dtype=ex.dtype)
        reqs.append(req)
    return reqs


def _same(a: Any, b: Any, atol: float = 0.0) -> bool:
    """Equal structure and values: bit-identical at ``atol=0``, else within ``atol``."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape):
            return False
        a, b = a.cpu(), b.cpu()
        return (
            torch.equal(a, b) if atol == 0 else bool(torch.allclose(a.float(), b.float(), rtol=0, atol=atol))
        )
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k], atol) for k in a)
    if isinstance(a, (tuple, list)):
        return (
            isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b))
        )
    return a == b


def serve_and_check(
    engine: Any,
    *,
    clients: int,
    requests: int,
    workers: int,
    max_batch: int,
    max_wait_ms: float,
    seed: int = 0,
    atol: float = 0.0,
) -> dict[str, Any]:
    """Serve ``clients x requests`` requests from ``clients`` threads; compare every response with
    a single-threaded, unbatched run (bit-identical, or within ``atol``: GPU kernels chosen per
    batch size may change the last bits). Returns counts, timings and the number of mismatches."""
    reqs = make_requests(engine, clients * requests, seed)
    reference = [engine(**r) for r in reqs]  # single-threaded, one request per call
    results: list[Any] = [None] * len(reqs)
    errors: list[BaseException] = []
    with BatchingService(engine, workers=workers, max_batch=max_batch, max_wait_s=max_wait_ms / 1e3) as svc:

        def client(c: int) -> None:
            try:
                futs = [(i, svc.submit(**reqs[i])) for i in range(c * requests, (c + 1) * requests)]
                for i, f in futs:
                    results[i] = f.result()
            except BaseException as e:  # reported below; a client thread must not die silently
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        sizes, lat = list(svc.batch_sizes), sorted(svc.latencies_s)
    mismatches = sum(1 for got, want in zip(results, reference) if got is None or not _same(got, want, atol))
    return {
        "requests": len(reqs),
        "errors": [repr(e) for e in errors],
        "mismatches": mismatches,
        "wall_s": wall,
        "throughput_rps": len(reqs) / wall if wall else float("inf"),
        "batches": len(sizes),
        "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "max_batch_seen": max(sizes) if sizes else 0,
        "service_max_batch": BatchingService._batch_limit(engine),
        "p50_ms": 1e3 * lat[len(lat) // 2] if lat else 0.0,
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Serve batched requests from several threads with one graphopt engine "
        "(any target) and check every response against a single-threaded run."
    )
    ap.add_argument("artifact", help="artifact directory (graphopt compile --out DIR)")
    ap.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    ap.add_argument("--requests", type=int, default=100, help="requests per client (default 100)")
    ap.add_argument("--workers", type=int, default=2, help="service worker threads (default 2)")
    ap.add_argument("--max-batch", type=int, default=8, help="rows per engine call at most (default 8)")
    ap.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="how long a batch may wait to fill (default 2)"
    )
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the runtime (default 1)")
    ap.add_argument(
        "--atol",
        type=float,
        default=0.0,
        help="tolerance vs the single-threaded run (default 0: bit-identical; GPU kernels picked per "
        "batch size may need e.g. 1e-4)",
    )
    args = ap.parse_args(argv)

    import graphopt
    from graphopt.artifact import read_manifest
    from graphopt.errors import GraphoptError

    torch.set_num_threads(max(1, args.threads))
    options = {"threads": args.threads}
    try:
        target = read_manifest(args.artifact)["target"]
        if target != "onnx":
            options = {}  # threads= is an ONNX Runtime option
        engine = graphopt.load(args.artifact, **options)
    except GraphoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = serve_and_check(
        engine,
        clients=args.clients,
        requests=args.requests,
        workers=args.workers,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        atol=args.atol,
    )
    print(
        f"{engine.target} artifact {args.artifact}: {stats['requests']} requests from {args.clients} threads, "
        f"{args.workers} workers"
    )
    print(
        f"  {stats['batches']} engine calls, mean batch {stats['mean_batch']:.2f} rows "
        f"(max {stats['max_batch_seen']}, limit {min(args.max_batch, stats['service_max_batch'])})"
    )
    print(
        f"  {stats['throughput_rps']:.0f} requests/s, latency p50 {stats['p50_ms']:.2f} ms, "
        f"p99 {stats['p99_ms']:.2f} ms"
    )
    print(
        f"  errors: {len(stats['errors'])}, responses differing from the single-threaded run: "
        f"{stats['mismatches']}"
    )
    for e in stats["errors"][:3]:
        print(f"  error: {e}", file=sys.stderr)
    return 0 if not stats["errors"] and not stats["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
