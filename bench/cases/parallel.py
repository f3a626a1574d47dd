"""parallel: one rank vs N tensor-parallel ranks on the same checkpoint: compile, memory per rank,
decode tokens/s, tokens identical.

Model: the Qwen2.5-0.5B shape (bench/cases/scale.py's checkpoint writer: random weights, seeded,
a byte-level BPE trained on tinyshakespeare). Both artifacts are compiled by the graphopt CLI from
the checkpoint directory for the torch target (the one whose programs carry collectives), with
verification on; the N-rank artifact's check runs its N rank programs in N processes on gloo:

- 1 rank: ``cleanup,fuse,kv-cache``;
- N ranks: ``cleanup,fuse,kv-cache,tensor-parallel(world_size=N)`` (attention and MLPs split, the
  embedding table / tied lm_head replicated);
- N ranks, vocab sharded: ``...,tensor-parallel(world_size=N,vocab=sharded)`` (the table and the
  lm_head split by vocabulary too).

Decode (prompt 16 tokens, 64 new, batch 1, greedy): the 1-rank artifact in one process with all
the run's threads; the N-rank artifact under ``torchrun --standalone --nproc-per-node N`` with
threads / N per rank (same cores in total), on gloo (CPU) or NCCL (``--set parallel.device=cuda``
on a machine with N GPUs: one per rank). The two run in alternating processes for ``rounds``
rounds, each timing ``iters`` generations after ``warmup``. Every rank reports its program's weight
bytes and its own peak RSS (VmHWM, its address space alone); the parent samples each compile's RSS
with its children (the check's rank processes) every 0.1 s.

What to expect on a 2-core CPU: little speed-up (one core per rank instead of two threads in one
process, plus an all-reduce of the hidden state twice per layer per token through loopback TCP),
but each rank holds its share of the sharded weights: the point of tensor parallelism on a device
that cannot hold the model. On GPUs the same artifact splits the memory traffic over N devices.

Workers: ``python -m bench.cases.parallel decode SPEC.json RESULT.json`` (under torchrun for N
ranks: each rank writes RESULT.json.rank<r>).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import Case
from bench.cases.scale import (
    CORPUS,
    GIB,
    MODELS,
    _graphopt_report,
    _read_result,
    _record,
    _row,
    _slug,
    child_env,
    dir_bytes,
    run_measured,
    worker_cmd,
)
from bench.harness import BASELINE, GRAPHOPT, BenchContext, CaseResult, summarize


@dataclass
class Params:
    model: str = "qwen0.5b"
    world_size: int = 2
    pipeline: str = "cleanup,fuse,kv-cache"
    max_batch: int = 4
    max_seq: int = 256
    prompt_len: int = 16
    new_tokens: int = 64
    warmup: int = 1
    iters: int = 3
    rounds: int = 2
    vocab_sharded: bool = True  # also N ranks with tensor-parallel(..., vocab=sharded)
    device: str = "cpu"  # "cuda": NCCL, one GPU per rank
    tokenizer_vocab: int = 4096
    seed: int = 0
    timeout_s: int = 3600


def compile_cmd(ckpt: Path, pipeline: str, out: Path, p: Params) -> list[str]:
    cmd = [sys.executable, "-m", "graphopt.cli", "compile", str(ckpt), "--pipeline", pipeline, "--target", "torch",
           "--out", str(out), "--report", "json"]
    for name in ("input_ids", "attention_mask"):
        cmd += ["--dynamic", f"{name}:0=1..{p.max_batch}", "--dynamic", f"{name}:1=1..{p.max_seq}"]
    return cmd


def run(ctx: BenchContext, p: Params) -> CaseResult:
    if p.model not in MODELS:
        raise ValueError(f"unknown model {p.model!r} for the parallel case; known: {', '.join(MODELS)}")
    if p.world_size < 2:
        raise ValueError("parallel.world_size must be at least 2")
    warmup = ctx.warmup if ctx.warmup is not None else p.warmup
    iters = ctx.iters if ctx.iters is not None else p.iters
    n = p.world_size
    title, config = MODELS[p.model]
    tp_pipeline = f"{p.pipeline},tensor-parallel(world_size={n})"
    result = CaseResult("parallel", CASE.title, "parallel", {
        "model": title, "target": "torch",
        "device": p.device, "backend": "nccl" if p.device.startswith("cuda") else "gloo",
        "threads": f"{ctx.threads} for 1 rank, {max(1, ctx.threads // n)} per rank for {n}",
        "prompt_len": p.prompt_len, "new_tokens": p.new_tokens, "batch": 1, "warmup": warmup, "iters": iters,
        "rounds": p.rounds, "memory": "compile: peak RSS of the process and its children (sampled every 0.1 s); "
                                      "decode: each rank's own VmHWM"})
    work = ctx.workdir / "parallel" / p.model
    ckpt, logs = work / "checkpoint", work / "logs"
    env = child_env(ctx.threads)

    ctx.log(f"parallel: writing the {title} checkpoint (random weights, seed {p.seed}) ...")
    cmd, res_file = worker_cmd("write", {"config": config, "dir": str(ckpt), "dtype": "float32", "seed": p.seed,
                                         "tokenizer_vocab": p.tokenizer_vocab, "corpus": str(CORPUS),
                                         "prompt_len": p.prompt_len}, logs)
    proc = run_measured(cmd, logs / "write.log", timeout_s=p.timeout_s, env=env)
    info = _read_result(res_file)
    if not proc.ok or not info:
        result.notes.append(f"the checkpoint could not be written ({proc.failure()})")
        return result
    result.settings["parameters"] = info["params"]
    prompt = info["prompt"]

    variants = [("1 rank", 1, p.pipeline), (f"{n} ranks", n, tp_pipeline)]
    if p.vocab_sharded:
        variants.append((f"{n} ranks, vocab sharded", n, tp_pipeline[:-1] + ",vocab=sharded)"))
    arts: dict[str, Path] = {}
    for name, ranks, pipeline in variants:
        out = work / _slug(name)
        shutil.rmtree(out, ignore_errors=True)
        label = f"graphopt {pipeline}"
        ctx.log(f"parallel: compiling {label} ...")
        row = _row(result, p.model, label, GRAPHOPT, "compile", ranks=ranks)
        proc = run_measured(compile_cmd(ckpt, pipeline, out, p), logs / f"{_slug(label)}.log", timeout_s=p.timeout_s,
                            env=env, tree=True)
        _record(row, proc)
        row["artifact_bytes"] = dir_bytes(out)
        if proc.ok:
            row.update(_graphopt_report(out))
            arts[name] = out
        ctx.log(f"  {row['status']} in {proc.time_s:.1f}s, peak RSS {proc.peak_rss_bytes / GIB:.2f} GiB (with children)")
    if "1 rank" not in arts or len(arts) < 2:
        result.notes.append("an artifact failed to compile; no decode comparison")
        return result

    spec = {"prompt": prompt, "new_tokens": p.new_tokens, "warmup": warmup, "iters": iters, "device": p.device}
    decodes: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants if name in arts}
    for rnd in range(p.rounds):
        for name, ranks, _ in variants:
            if name not in arts:
                continue
            cmd, res_file = worker_cmd("decode", {**spec, "artifact": str(arts[name])},
                                       logs / f"decode-{_slug(name)}-{rnd}", module="bench.cases.parallel")
            denv = dict(env)
            if ranks > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                       *cmd[1:]]
                denv["OMP_NUM_THREADS"] = str(max(1, ctx.threads // ranks))
            ctx.log(f"parallel: decode round {rnd + 1}/{p.rounds}, {name} ...")
            proc = run_measured(cmd, logs / f"decode-{_slug(name)}-{rnd}.log", timeout_s=p.timeout_s, env=denv,
                                tree=True)
            files = [res_file] if ranks == 1 else [Path(f"{res_file}.rank{r}") for r in range(ranks)]
            per_rank = [_read_result(f) for f in files]
            if not proc.ok or not all(per_rank):
                result.notes.append(f"decode, {name}, round {rnd + 1}: {proc.failure()}")
                continue
            decodes[name].append({"ranks": per_rank, "tree_peak_rss_bytes": proc.peak_rss_bytes})

    if not decodes["1 rank"]:
        return result
    ref = decodes["1 rank"][0]["ranks"][0]
    one_tps = None
    for name, ranks, pipeline in variants:
        runs = decodes.get(name) or []
        if not runs:
            continue
        times = [t for r in runs for t in r["ranks"][0]["times_s"]]
        tps = summarize([p.new_tokens / t for t in times])
        one_tps = one_tps or tps["median"]
        first = runs[0]["ranks"]
        same = all(x["tokens"] == ref["tokens"] for r in runs for x in r["ranks"])
        row = _row(result, p.model, f"decode, {name}", BASELINE if ranks == 1 else GRAPHOPT, "decode", ranks=ranks,
                   pipeline=pipeline, tokens_per_s=tps, vs_one_rank=round(tps["median"] / one_tps, 3),
                   weight_bytes_per_rank=[x["weight_bytes"] for x in first],
                   peak_rss_per_rank=[max(r["ranks"][k]["hwm_bytes"] for r in runs) for k in range(ranks)],
                   rss_after_load_per_rank=[x["rss_load_bytes"] for x in first],
                   tokens_identical=same, device=first[0]["device"])
        if ranks > 1:
            share = row["weight_bytes_per_rank"][0] / ref["weight_bytes"]
            result.notes.append(f"{name}: each rank holds {share:.1%} of the 1-rank program's weight bytes "
                                f"({_size(row['weight_bytes_per_rank'][0])} of {_size(ref['weight_bytes'])})")
    return result


def _size(b: int) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.2f} MiB"


CASE = Case(
    name="parallel", title="Tensor parallelism: 1 rank vs N ranks (torchrun, gloo on CPU / NCCL on GPUs)",
    measures="Qwen2.5-0.5B shape compiled with and without tensor-parallel(world_size=N) for the torch target: "
             "compile time and peak RSS, weight bytes and peak RSS per rank, greedy decode tokens/s (same tokens)",
    params=Params, run=run,
    quick={"model": "tiny", "warmup": 0, "iters": 1, "rounds": 1, "new_tokens": 8, "max_seq": 64,
           "tokenizer_vocab": 512},
)


# -- worker (each rank, or the one process) ---------------------------------------------------------

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def task_decode(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import graphopt

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = spec["device"]
    eng = graphopt.load(spec["artifact"], **({"device": device} if device != "cpu" else {}))
    rss_load = _status()["VmRSS"]
    prompt = torch.tensor([spec["prompt"]], dtype=torch.int64)
    n = spec["new_tokens"]
    for _ in range(spec["warmup"]):
        eng.generate(prompt, n)
    times, out = [], None
    for _ in range(spec["iters"]):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = eng.generate(prompt, n)
        times.append(time.perf_counter() - t0)
    weights = sum(t.numel() * t.element_size() for t in eng.runner.module.state_dict().values())
    return {"times_s": times, "tokens": out[0, prompt.shape[1]:].tolist(), "weight_bytes": weights,
            "rss_load_bytes": rss_load, "hwm_bytes": _status()["VmHWM"], "rank": eng.rank,
            "world_size": eng.world_size, "device": str(getattr(eng.runner, "device", "cpu"))}


def worker_main(argv: list[str]) -> int:
    task, spec_file, result_file = argv
    import warnings

    warnings.filterwarnings("ignore")
    out = {"decode": task_decode}[task](json.loads(Path(spec_file).read_text()))
    rank = os.environ.get("RANK")
    target = f"{result_file}.rank{rank}" if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else result_file
    Path(target).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
