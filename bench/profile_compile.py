"""Compile one real-size decoder shape in this process and print where time and memory go.

    python -m bench.profile_compile llama1b --pipeline cleanup,fuse,kv-cache [--out DIR] [--json FILE]

The quick way to look at one compile (the ``scale`` case runs every system, peers included, and
takes hours on a 2-core machine): the model is built from the config in ``bench.cases.scale``
(random weights, seeded, fp32, ``sdpa``), compiled with a batch-2 x 16 example, dynamic batch 1..8
and sequence 1..512, verification on, and the per-phase figures of ``report.json`` (time, RSS
after, peak RSS during) are printed and optionally written as JSON with the machine description.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["tiny", "qwen0.5b", "llama1b"])
    ap.add_argument("--pipeline", default="cleanup,fuse,kv-cache")
    ap.add_argument("--target", default="onnx")
    ap.add_argument("--out", default=None, help="keep the artifact in this directory (default: a temporary one, "
                    "deleted at the end)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)

    import tempfile

    import torch
    import transformers

    from bench.cases.scale import MODELS
    from bench.machine import describe
    from graphopt.memory import GIB, rss_bytes

    label, config = MODELS[args.model]
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    cfg.use_cache, cfg._attn_implementation = False, "sdpa"
    cls = getattr(transformers, config["architectures"][0])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = cls(cfg).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{label}: {weights / GIB:.2f} GiB of fp32 weights, built in {time.perf_counter() - t0:.0f}s, "
          f"rss {rss_bytes() / GIB:.2f} GiB", file=sys.stderr)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(cfg.vocab_size, 32000), (2, 16), generator=g)
    dyn = {n: {0: (1, 8), 1: (1, 512)} for n in ("input_ids", "attention_mask")}
    out = args.out or tempfile.mkdtemp(prefix="graphopt-profile-")
    try:
        return _profile(args, label, model, weights, ids, dyn, out, describe)
    finally:
        if args.out is None:  # a 1B artifact is 4.6 GiB: do not leave one behind per run
            shutil.rmtree(out, ignore_errors=True)


def _profile(args, label, model, weights, ids, dyn, out, describe) -> int:
    import torch

    import graphopt
    from graphopt.cli import _Progress
    from graphopt.memory import GIB

    t1 = time.perf_counter()
    art = graphopt.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, pipeline=args.pipeline,
                           target=args.target, out=out, dynamic=dyn, progress=_Progress(False), report=None)
    total = time.perf_counter() - t1
    mem = art.report["memory"]
    verify_s = sum(p.get("verify_s") or 0 for p in mem["phases"]) + sum(
        p["time_s"] for p in mem["phases"] if p["phase"] in ("verify:setup", "verify:lower"))
    result = {"model": args.model, "label": label, "pipeline": args.pipeline, "target": args.target,
              "weights_gib": round(weights / GIB, 3), "compile_s": round(total, 1),
              "verification_s": round(verify_s, 1), "memory": mem,
              "artifact_gib": round(sum(f.stat().st_size for f in Path(art.path).iterdir()) / GIB, 3),
              "lowering_check_s": (art.report["lowering"].get("verify") or {}).get("timings"),
              "machine": describe(torch.get_num_threads(), "cpu")}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    print(f"compile {total:.0f}s (verification {verify_s:.0f}s), peak {mem['peak_rss_gib']:.2f} GiB = "
          f"{mem['peak_rss_gib'] / (weights / GIB):.2f}x the weights", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
