"""The harness: systems, interleaved timing, statistics and the latency-case driver.

A case hands :func:`run_latency` a list of :class:`Candidate` (a name and a function that builds a
:class:`System`); the first is the baseline. The driver

1. builds the baseline and records its output (the reference for every quality metric);
2. builds every other system; one that raises :class:`SkipSystem` (a pass not registered yet, no
   CUDA provider) is kept in the results as *skipped* with its reason, one that raises anything
   else as *failed* with the first line of the error: a broken peer never ends the run;
3. calls each system once and compares its output with the reference (the case's ``quality``);
4. checks the baseline still gives the same output (a system that mutated the shared model would
   otherwise silently change every comparison);
5. warms up and times ``iters`` interleaved rounds A, B, C, A, B, C, ... with the garbage
   collector off, so drift hits every system alike;
6. reports per system the latency median / p10 / p90 / IQR, the speedup against the baseline
   computed per round (paired, so drift cancels) and the distance from the physical floor.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BASELINE, PEER, GRAPHOPT = "baseline", "peer", "graphopt"


class SkipSystem(Exception):  # noqa: N818 - a verdict, not an error
    """Raised by a system builder when the system cannot run here; the message says why."""


class BenchError(Exception):
    """A case cannot run at all (its baseline fails, its model is missing); the message says why."""


@dataclass
class System:
    """One thing being timed. ``call()`` does one unit of work (one forward, one generation) and
    returns its raw output; ``extract`` turns that into what the case's quality metric compares."""

    name: str
    call: Callable[[], Any]
    kind: str = PEER
    extract: Callable[[Any], Any] = lambda out: out
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    close: Callable[[], None] | None = None


@dataclass
class Candidate:
    """A system not built yet: building may compile, export or fail."""

    name: str
    build: Callable[[], System]
    kind: str = PEER


@dataclass
class SystemResult:
    name: str
    kind: str
    status: str  # ok | skipped | failed | excluded
    note: str = ""
    group: str = ""  # the model / configuration the system ran (one baseline per group)
    setup_s: float | None = None
    latency_s: dict[str, float] | None = None
    speedup: dict[str, float] | None = None  # baseline time / system time, per round
    floor_ratio: dict[str, float] | None = None  # system time / floor time
    throughput: dict[str, Any] | None = None  # e.g. tokens/s: {"unit", "median", "p10", "p90"}
    quality: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    samples_s: list[float] = field(default_factory=list)


@dataclass
class CaseResult:
    case: str
    title: str
    kind: str  # "latency" (systems timed side by side) or "compile" (compile-time breakdown)
    settings: dict[str, Any]
    baselines: dict[str, str] = field(default_factory=dict)  # group → baseline system
    systems: list[SystemResult] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    floors: dict[str, dict[str, Any]] = field(default_factory=dict)  # group → floor
    notes: list[str] = field(default_factory=list)
    elapsed_s: float | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchContext:
    """What every case gets: the run's settings and shared services."""

    threads: int
    device: str
    quick: bool
    workdir: Path
    warmup: int | None = None  # overrides of the cases' own counts
    iters: int | None = None
    only: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    graphopt_targets: list[str] = field(default_factory=list)
    _rates: dict[str, Any] | None = None

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def wanted(self, name: str) -> bool:
        """``--only`` / ``--exclude``: case-insensitive substrings of system names."""
        low = name.lower()
        if self.only and not any(s.lower() in low for s in self.only):
            return False
        return not any(s.lower() in low for s in self.exclude)

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    @property
    def measured_rates(self) -> dict[str, Any]:
        """The rates if a case asked for them, else {} (the compile case needs none)."""
        return self._rates or {}

    def rates(self) -> dict[str, Any]:
        """GEMM FLOP/s and memory bandwidth of this machine, measured once per run."""
        if self._rates is None:
            from bench.floor import measure_rates

            self.log("measuring GEMM FLOP/s and memory bandwidth for the floor ...")
            self._rates = measure_rates(self.device, quick=self.quick)
        return self._rates


# -- statistics --------------------------------------------------------------------------------

def summarize(samples: list[float]) -> dict[str, float]:
    """median, p10, p90, p25, p75, IQR, min, max, mean and n of ``samples``."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"n": int(a.size), "median": float(p50), "p10": float(p10), "p90": float(p90),
            "p25": float(p25), "p75": float(p75), "iqr": float(p75 - p25),
            "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Per-round ratios ``numerator[i] / denominator[i]`` summarized: rounds are interleaved, so
    pairing them cancels drift that a ratio of two medians would keep."""
    return summarize([a / b for a, b in zip(numerator, denominator) if b > 0])


# -- timing ------------------------------------------------------------------------------------

def interleaved_rounds(systems: list[System], warmup: int, iters: int, sync: Callable[[], None],
                       on_error: Callable[[System, BaseException], None]) -> dict[str, list[float]]:
    """Warm up, then time ``iters`` rounds of A, B, C, ... with the GC off.

    A system whose call raises is reported through ``on_error`` and leaves the rotation.
    """
    active = list(systems)
    times: dict[str, list[float]] = {s.name: [] for s in systems}

    def one(s: System) -> float | None:
        try:
            t0 = time.perf_counter()
            s.call()
            sync()
            return time.perf_counter() - t0
        except Exception as e:  # a peer failing mid-run must not end the run
            on_error(s, e)
            active.remove(s)
            return None

    for _ in range(warmup):
        for s in list(active):
            one(s)
    gc.collect()
    gc.disable()
    try:
        for _ in range(iters):
            for s in list(active):
                dt = one(s)
                if dt is not None:
                    times[s.name].append(dt)
    finally:
        gc.enable()
    return times


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}"[:400]


def run_latency(ctx: BenchContext, candidates: list[Candidate], *, quality: Callable[[Any, Any], dict],
                warmup: int, iters: int, floor_s: float | None = None, group: str = ""
                ) -> tuple[list[SystemResult], list[str]]:
    """Build, check and time ``candidates`` side by side; ``candidates[0]`` is the baseline.

    ``quality(reference, output)`` compares a system's extracted output with the baseline's.
    Returns one :class:`SystemResult` per candidate (in order) and run-level notes.
    """
    warmup = ctx.warmup if ctx.warmup is not None else warmup
    iters = ctx.iters if ctx.iters is not None else iters
    notes: list[str] = []
    results: dict[str, SystemResult] = {}
    built: list[System] = []
    ref = None

    for i, cand in enumerate(candidates):
        res = results[cand.name] = SystemResult(cand.name, cand.kind, "ok", group=group)
        if i > 0 and not ctx.wanted(cand.name):
            res.status, res.note = "excluded", "left out by --only/--exclude"
            continue
        ctx.log(f"building {cand.name!r} ...")
        t0 = time.perf_counter()
        try:
            sys_ = cand.build()
            out = sys_.extract(sys_.call())
            ctx.sync()
        except SkipSystem as e:
            res.status, res.note = "skipped", str(e)
            ctx.log(f"  skipped: {e}")
            continue
        except Exception as e:
            if i == 0:
                raise BenchError(f"the baseline {cand.name!r} failed: {first_line(e)}") from e
            res.status, res.note = "failed", first_line(e)
            ctx.log(f"  failed: {res.note}")
            continue
        res.setup_s = round(time.perf_counter() - t0, 3)
        res.info.update(sys_.info)
        if sys_.notes:
            res.note = "; ".join(sys_.notes)
        if i == 0:
            ref = out
        try:
            res.quality = quality(ref, out)
        except Exception as e:
            res.quality = {"error": first_line(e)}
        built.append(sys_)
        ctx.log(f"  ready in {res.setup_s:.1f}s; quality {res.quality}")

    baseline = built[0]
    again = baseline.extract(baseline.call())
    drift = _max_abs_diff(ref, again)
    if drift:
        notes.append(f"the baseline's output changed by {drift:.3g} after the other systems were built: "
                     "one of them mutated the shared model; quality numbers are suspect")

    def failed(s: System, e: BaseException) -> None:
        results[s.name].status, results[s.name].note = "failed", f"failed while timing: {first_line(e)}"
        ctx.log(f"  {s.name!r} failed while timing: {first_line(e)}")

    ctx.log(f"timing {len(built)} systems: {warmup} warm-up + {iters} interleaved rounds ...")
    times = interleaved_rounds(built, warmup, iters, ctx.sync, failed)
    base_times = times[baseline.name]
    for s in built:
        res = results[s.name]
        if s.close is not None:
            try:
                s.close()
            except Exception:  # closing is best effort
                pass
        if res.status != "ok" or not times[s.name]:
            continue
        res.samples_s = [round(t, 6) for t in times[s.name]]
        res.latency_s = summarize(times[s.name])
        res.speedup = paired_ratio(base_times, times[s.name])
        if floor_s:
            res.floor_ratio = summarize([t / floor_s for t in times[s.name]])
    return [results[c.name] for c in candidates], notes


def _max_abs_diff(a: Any, b: Any) -> float:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return 0.0 if a == b else float("inf")
