"""Resident memory of this process, per compile phase, and the compile's memory estimate.

Large models are the normal case: a compile must say where its memory goes (``report.json`` keeps,
per phase, the time, the RSS after it and the peak RSS during it) and refuse up front when it
cannot fit, instead of being killed by the kernel minutes later.

Peak per phase: Linux keeps the process's high-water mark (``VmHWM`` in ``/proc/self/status``) and
resets it when ``5`` is written to ``/proc/self/clear_refs``; a phase resets it at its start and
reads it at its end. Where that is not allowed, a sampling thread (every 20 ms) stands in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = float(1 << 30)


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    if kib is None:
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except Exception:  # noqa: BLE001 - no memory figures on this platform
            return 0
    return kib * 1024


def peak_rss_bytes() -> int:
    """The process's resident high-water mark since start (or since the last reset)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else rss_bytes()


def available_bytes() -> int | None:
    """``MemAvailable`` of the machine (or of the cgroup limit when that is lower)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit in ("max", "") or int(limit) > (1 << 50):
                continue
            free = int(limit) - int(Path(usage_file).read_text().strip())
            avail = free if avail is None else min(avail, free)
        except (OSError, ValueError):
            continue
    return avail


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system. Tensors of a few MB to 32 MB
    come from glibc's heap (its mmap threshold grows to 32 MB as large blocks are freed), and a
    freed heap block stays resident until ``malloc_trim`` returns it: without it, the weights a
    compile drops before its ONNX Runtime check would still count in the process's RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Samples RSS every ``interval`` s on a thread; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="graphopt-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


@dataclass
class PhaseRecord:
    phase: str
    time_s: float = 0.0
    rss_gib: float = 0.0
    peak_rss_gib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "time_s": round(self.time_s, 3), "rss_gib": round(self.rss_gib, 3),
                "peak_rss_gib": round(self.peak_rss_gib, 3), **self.extra}


class PhaseTracker:
    """Times phases and measures their memory. ``with tracker.phase("lower"): ...`` appends a
    :class:`PhaseRecord`; ``progress("phase", ...)`` is called at the start and end of each (the
    CLI prints elapsed time and RSS from it)."""

    def __init__(self, progress: Callable[..., None] | None = None):
        self.progress = progress
        self.records: list[PhaseRecord] = []
        self.t0 = time.perf_counter()
        self.baseline_rss = rss_bytes()
        self._use_hwm = _reset_peak() if os.environ.get("GRAPHOPT_RSS_SAMPLING") != "1" else False
        self.process_peak = peak_rss_bytes() if self._use_hwm else self.baseline_rss

    @contextlib.contextmanager
    def phase(self, name: str, **extra: Any) -> Iterator[PhaseRecord]:
        rec = PhaseRecord(name, extra=dict(extra))
        start = self.start(name)
        try:
            yield rec
        finally:
            self.end(rec, start)

    def start(self, name: str) -> tuple[float, _Sampler | None]:
        if self.progress:
            self.progress("phase", name=name, status="start", elapsed_s=time.perf_counter() - self.t0,
                          rss_gib=rss_bytes() / GIB)
        sampler = None
        if self._use_hwm:
            self.process_peak = max(self.process_peak, peak_rss_bytes())
            _reset_peak()
        else:
            sampler = _Sampler()
        return time.perf_counter(), sampler

    def end(self, rec: PhaseRecord, start: tuple[float, _Sampler | None]) -> PhaseRecord:
        t, sampler = start
        rec.time_s = time.perf_counter() - t
        rss = rss_bytes()
        peak = sampler.stop() if sampler is not None else peak_rss_bytes()
        rec.rss_gib, rec.peak_rss_gib = rss / GIB, max(peak, rss) / GIB
        self.process_peak = max(self.process_peak, peak)
        self.records.append(rec)
        if self.progress:
            self.progress("phase", name=rec.phase, status="end", elapsed_s=time.perf_counter() - self.t0,
                          time_s=rec.time_s, rss_gib=rec.rss_gib, peak_rss_gib=rec.peak_rss_gib)
        return rec

    def summary(self) -> dict[str, Any]:
        return {"baseline_rss_gib": round(self.baseline_rss / GIB, 3),
                "peak_rss_gib": round(max([self.process_peak / GIB] + [r.peak_rss_gib for r in self.records]), 3),
                "phases": [r.to_json() for r in self.records]}


# -- the compile's memory estimate ----------------------------------------------------------------
#: what the compile itself needs besides the weights' extra copies: graphs, FakeTensor metadata,
#: the exporters, ONNX Runtime's arena for one verification run (measured on 0.5B-1B decoders)
FIXED_OVERHEAD = 1 << 30


@dataclass
class MemoryEstimate:
    weight_bytes: int
    baseline_bytes: int
    peak_bytes: int
    available_bytes: int | None
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes - self.baseline_bytes <= self.available_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        avail = f"{self.available_bytes / GIB:.1f} GiB available" if self.available_bytes is not None else "unknown"
        return (f"estimated peak {self.peak_bytes / GIB:.1f} GiB = now {self.baseline_bytes / GIB:.1f} GiB + "
                f"{(self.peak_bytes - self.baseline_bytes) / GIB:.1f} GiB (the larger of the passes' and the "
                f"check's, plus the rest: {parts}); {avail}")


def module_weight_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers, each tensor once (tied weights count once)."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + list(module.buffers()) if hasattr(module, "parameters") else []
    for t in tensors:
        key = id(t)
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        except (RuntimeError, NotImplementedError):
            pass
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def estimate_compile_memory(weight_bytes: int, passes: list[Any], *, verify: bool, target: str,
                            baseline_bytes: int | None = None) -> MemoryEstimate:
    """Peak resident memory of a compile, before it starts: the process now (the model is loaded),
    plus the larger of two phases that never overlap: the passes and the lowering, holding the new
    weight tensors the passes make (each pass declares ``weight_memory``, the fraction of the weight
    bytes it may add: merge-gemms' stacked Q/K/V and gate/up, precision's low-precision copies,
    quantize's integer weights, prune's shrunk ones), and, with verification, the compile's own
    check of the lowered model, whose weights ONNX Runtime touches (memory-mapped pages count as
    resident) after the torch graphs holding the passes' weights are dropped; plus a fixed
    overhead. Shared weights (GraphIR.copy) cost nothing. Weights memory-mapped from a checkpoint
    and not yet read are not in the process's memory now but will be from the first forward on
    (the Llama-3.1-8B shape, 15 GiB of bf16 weights mapped, started at 0.4 GiB): when the weights
    are larger than the process, the difference is counted too."""
    base = rss_bytes() if baseline_bytes is None else baseline_bytes
    parts = {"weights not yet resident (memory-mapped)": max(0, weight_bytes - base),
             "passes' new weights": int(sum(float(getattr(p, "weight_memory", 0.0)) for p in passes) * weight_bytes)}
    if verify and target in ("onnx", "tensorrt"):
        parts["ONNX Runtime check"] = weight_bytes
    parts["graphs and runtime"] = FIXED_OVERHEAD
    peak = (base + parts["weights not yet resident (memory-mapped)"]
            + max(parts["passes' new weights"], parts.get("ONNX Runtime check", 0)) + FIXED_OVERHEAD)
    return MemoryEstimate(weight_bytes, base, peak, available_bytes(), parts)
