"""The benchmark command: ``python -m bench`` (or ``python bench/run.py``, or ``make bench``).

    python -m bench                                  # every case, full settings, 2 threads
    python -m bench --cases minilm --quick           # one case, tiny iteration counts
    python -m bench --cases compile --set compile.models=nanogpt --quick
    python -m bench --device cuda                    # the same cases on an NVIDIA GPU

Writes ``<out>/<case>.md``, ``<case>.json`` and ``<case>.png`` per case. Exit status: 0 every case
ran, 1 a case failed (its files still say why), 2 usage error (unknown case or parameter, CUDA
asked for but absent).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable, without bench/ on the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.cases import all_cases  # noqa: E402
from bench.harness import BenchContext, BenchError, CaseResult  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cases = all_cases()
    p = argparse.ArgumentParser(
        prog="python -m bench", description="Side-by-side benchmarks of graphopt against its peers.",
        epilog="cases: " + "; ".join(f"{c.name}: {c.measures}" for c in cases.values()))
    p.add_argument("--cases", default=",".join(cases), help=f"comma-separated cases (default: all: {','.join(cases)})")
    p.add_argument("--quick", action="store_true", help="tiny iteration counts (CI, tests); numbers are not meaningful")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu, or cuda: torch on the GPU, graphopt's torch target, ONNX Runtime's CUDA provider")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="CASE.KEY=VALUE",
                   help="a case parameter, e.g. minilm.batch=1 (repeatable)")
    p.add_argument("--iters", type=int, help="timed rounds for every case (overrides the case's own)")
    p.add_argument("--warmup", type=int, help="warm-up rounds for every case (overrides the case's own)")
    p.add_argument("--only", default="", help="run only systems whose name contains one of these (comma-separated)")
    p.add_argument("--exclude", default="", help="leave out systems whose name contains one of these")
    p.add_argument("--graphopt-targets", default="",
                   help="graphopt targets to benchmark (default: onnx on cpu; torch, plus onnx when ONNX Runtime "
                        "has CUDA, on cuda)")
    p.add_argument("--work", help="keep exported models and artifacts here (default: a temporary folder)")
    p.add_argument("--list", action="store_true", help="list the cases and their parameters, then exit")
    return p.parse_args(argv)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _quiet() -> None:
    """Silence library chatter (progress bars, deprecation notices) so the log shows the run."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for cat in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=cat)
    for name in ("torch.onnx", "torch._dynamo", "torch._inductor", "torch.export", "onnxruntime", "onnxscript",
                 "graphopt"):
        logging.getLogger(name).setLevel(logging.ERROR)


def default_targets(device: str) -> list[str]:
    if device != "cuda":
        return ["onnx"]
    import onnxruntime as ort

    return ["torch"] + (["onnx"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = all_cases()
    if args.list:
        import dataclasses

        for c in cases.values():
            params = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(c.params))
            print(f"{c.name}: {c.measures}\n    parameters: {params}\n    --quick: {c.quick}")
        return 0
    wanted = _split(args.cases)
    unknown = [c for c in wanted if c not in cases]
    if unknown or not wanted:
        print(f"error: unknown case(s) {unknown or args.cases!r}; cases: {', '.join(cases)}", file=sys.stderr)
        return 2
    overrides: dict[str, dict[str, str]] = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        case, dot, name = key.partition(".")
        if not sep or not dot or case not in cases:
            print(f"error: --set {item!r} must be CASE.KEY=VALUE with CASE one of {', '.join(cases)}", file=sys.stderr)
            return 2
        overrides.setdefault(case, {})[name.strip()] = value.strip()
    try:
        params = {c: cases[c].make_params(args.quick, overrides.get(c, {})) for c in wanted}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda needs an NVIDIA GPU that torch can use, and torch {torch.__version__} sees none "
              f"(torch.cuda.is_available() is False). Run on a GPU machine with a CUDA build of torch "
              f"(make setup TORCH_SPEC=\"torch>=2.11\"), or drop --device cuda.", file=sys.stderr)
        return 2
    _quiet()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set: only possible before any parallel work
        pass
    torch.manual_seed(0)

    from bench.machine import busy_note, cpu_during, cpu_seconds, describe, load_average
    from bench.report import write_all

    machine = describe(args.threads, args.device)
    out_dir = Path(args.out)
    status = 0
    timings: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        ctx = BenchContext(threads=args.threads, device=args.device, quick=args.quick, workdir=work,
                           warmup=args.warmup, iters=args.iters, only=_split(args.only), exclude=_split(args.exclude),
                           graphopt_targets=_split(args.graphopt_targets) or default_targets(args.device))
        for name in wanted:
            case = cases[name]
            ctx.log(f"== case {name}: {case.measures}")
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            try:
                result = case.run(ctx, params[name])
                outcome = "ok"
            except Exception as e:  # a failed case still writes its files, saying why
                status = 1
                if not isinstance(e, BenchError):
                    traceback.print_exc()
                outcome = f"failed: {type(e).__name__}: {e}"
                ctx.log(f"case {name} {outcome}")
                result = CaseResult(name, case.title, "latency", {"parameters": vars(params[name])},
                                    notes=[f"the case failed: {type(e).__name__}: {e}"])
            result.elapsed_s = round(time.perf_counter() - t0, 1)
            result.machine = {**machine, "load_average_at_end": load_average(),
                              "cpu_during_case": cpu_during(cpu0, cpu_seconds())}
            if result.kind == "latency" and result.settings is not None:
                result.settings.setdefault("threads", args.threads)
                result.settings.setdefault("device", args.device)
            busy = busy_note(result.machine)
            if busy:
                result.notes.append(busy)
            result.rates = ctx.measured_rates
            paths = write_all(result, out_dir)
            ctx.log(f"case {name}: {outcome} in {result.elapsed_s:.0f}s → {', '.join(str(p) for p in paths)}")
            timings.append((name, result.elapsed_s, outcome))
    print("case        time     outcome")
    for name, secs, outcome in timings:
        print(f"{name:<11} {secs:>6.0f}s  {outcome}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
