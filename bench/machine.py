"""The machine description stamped on every result: a number means nothing without it."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
from pathlib import Path
from typing import Any


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


#: CPU features that move the figures most: the vector width of fp32 GEMMs and the int8 dot
#: product of ONNX Runtime's int4/int8 kernels (a VM can move to a host without them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def isa() -> list[str]:
    """The :data:`ISA_FLAGS` this CPU reports in /proc/cpuinfo (empty where it does not say)."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in ISA_FLAGS if f in have]
    return []


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where it does not say."""
    cores, phys = set(), "0"
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``), None when unlimited or unknown."""
    text = _read("/sys/fs/cgroup/cpu.max").split()
    if len(text) == 2 and text[0] != "max":
        try:
            return round(int(text[0]) / int(text[1]), 2)
        except ValueError:
            return None
    return None


def ram_gib() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def gpu() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_seconds() -> dict[str, float] | None:
    """CPU seconds so far: the machine's busy time and the hypervisor's steal time (``/proc/stat``,
    all CPUs), this process's and its finished children's (``getrusage``), and a wall clock. Two
    readings tell what else ran on the cores meanwhile (:func:`cpu_during`)."""
    import resource
    import time

    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    vals += [0] * (8 - len(vals))
    user, nice, system, idle, iowait, irq, softirq, steal = vals
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"busy_s": (user + nice + system + irq + softirq) / hz, "steal_s": steal / hz,
            "ours_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, "wall_s": time.monotonic()}


def cpu_during(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Average CPUs in use between two :func:`cpu_seconds` readings: by the bench (this process and
    the subprocesses it started and waited for: servers, ranks), by other processes, and taken by
    the hypervisor for other machines (steal)."""
    if not before or not after or after["wall_s"] <= before["wall_s"]:
        return None
    wall = after["wall_s"] - before["wall_s"]
    ours = (after["ours_s"] - before["ours_s"]) / wall
    busy = (after["busy_s"] - before["busy_s"]) / wall
    return {"bench_cpus": round(ours, 2), "other_cpus": round(max(busy - ours, 0.0), 2),
            "steal_cpus": round((after["steal_s"] - before["steal_s"]) / wall, 2)}


def describe(threads: int, device: str) -> dict[str, Any]:
    import torch

    import graphopt

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "isa": isa(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical_cores(),
        "cgroup_cpu_quota": cpu_quota(),
        "ram_gib": ram_gib(),
        "threads": threads,
        "device": device,
        "gpu": gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {"graphopt": graphopt.__version__, "torch": torch.__version__,
                     "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
                     "onnx": _version("onnx"), "transformers": _version("transformers"),
                     "numpy": _version("numpy")},
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                  "GOMP_SPINCOUNT") if k in os.environ},
        "load_average_at_start": load_average(),
    }


def one_line(m: dict[str, Any]) -> str:
    """``AMD EPYC, 2 CPUs, 2 threads, 23.5 GiB, torch 2.13.0+cpu, ... , 2026-01-01``"""
    gpu_ = f", GPU {m['gpu']['name']}" if m.get("gpu") else ""
    v = m["versions"]
    isa_ = f" ({'+'.join(m['isa'])})" if m.get("isa") else ""
    return (f"{m['cpu']}{isa_}, {m['usable_cpus']} CPUs, {m['threads']} thread{'s' if m['threads'] != 1 else ''}, {m['ram_gib']} GiB RAM{gpu_}; "
            f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, graphopt {v['graphopt']}; {m['date'][:10]}")


def busy_note(m: dict[str, Any]) -> str | None:
    """A warning when something else took CPU while the case ran: other processes (the machine's
    busy time less the bench's own, subprocesses included) or the hypervisor (steal time). Without
    those readings, the load average at the run's start (the one at the end counts the case's own
    threads and servers)."""
    cpus = m.get("usable_cpus") or 1
    during = m.get("cpu_during_case")
    if during:
        parts = []
        if during["other_cpus"] >= 0.25:
            parts.append(f"other processes used {during['other_cpus']} of the {cpus} CPUs on average")
        if during["steal_cpus"] >= 0.1:
            parts.append(f"the hypervisor took {during['steal_cpus']} CPUs for other machines (steal time)")
        if parts:
            return f"while the case ran {' and '.join(parts)}: these timings are noisy"
        return None
    start = m.get("load_average_at_start")
    if start and start[0] > cpus:
        return (f"the machine was busy (1-minute load average {start[0]} on {cpus} usable CPUs at the start): "
                "other processes competed for the cores, so these timings are noisy")
    return None
