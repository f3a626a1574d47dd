"""Failure messages and reproducer directories for passes that fail verification.

A reproducer holds everything needed to replay the failure without the user's model code::

    original.pt2     the ORIGINAL captured graph (torch.export program)
    inputs.npz       the verification inputs it failed on
    pipeline.txt     the pipeline text
    failure.json     the failing pass, the passes before it, the verification record
    README.txt       the command that replays it: graphopt bisect <dir>
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.errors import ArtifactError


def describe_failure(pass_: Any, ctx: Any, vrec: dict, repro: str | None) -> str:
    before = ", ".join(ctx.passes_before) or "none"
    lines = [f"verification failed after pass {pass_.name!r} (#{ctx.index + 1} of {len(ctx.passes)}, "
             f"policy {vrec.get('policy')}): {vrec.get('message')}",
             f"  passes before it: {before}"]
    if vrec.get("worst_output"):
        err = vrec.get("error_vs_original")
        lines.append(f"  worst output: {vrec['worst_output']}" + (f" (max abs error vs original {err:.3g})"
                                                                  if isinstance(err, float) else ""))
    div = vrec.get("first_divergence") or {}
    if div.get("node"):
        err = div.get("max_abs_error")
        lines.append(f"  first diverging node: {div['format']}")
        lines.append(f"    {div['why']}" + (f", max abs error {err:.3g}" if isinstance(err, float) else "")
                     + f"; made by {div['provenance']!r}")
        if div.get("stack_trace"):
            lines.append("    from: " + " | ".join(s.strip() for s in div["stack_trace"]))
    elif div.get("message"):
        lines.append(f"  {div['message']}")
    if repro:
        lines.append(f"  reproducer: {repro}  (replay: graphopt bisect {repro})")
    lines.append(f"  fix the pass, loosen its verification policy if the change is intended, or remove "
                 f"{pass_.name!r} from the pipeline")
    return "\n".join(lines)


def write_reproducer(ctx: Any, pass_: Any, vrec: dict) -> str:
    from graphopt.backends.export import export_program

    out = Path(ctx.repro_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        original = ctx.original
        torch.export.save(export_program(original), str(tmp / "original.pt2"))
        inputs = ctx.verifier.input_sets[0] if ctx.verifier is not None else original.example_inputs
        np.savez(tmp / "inputs.npz", **{n: t.detach().cpu().numpy() for n, t in zip(original.input_names, inputs)})
        (tmp / "pipeline.txt").write_text(ctx.pipeline_text + "\n")
        failure = {"pass": pass_.name, "index": ctx.index + 1, "passes_before": ctx.passes_before,
                   "pipeline": ctx.pipeline_text, "record": vrec, "model": ctx.data.get("model_spec"),
                   "dynamic": {k: {str(d): list(r) for d, r in v.items()} for k, v in original.dynamic.items()},
                   "call_convention": original.call_convention, "out_structure": original.out_structure}
        (tmp / "failure.json").write_text(json.dumps(failure, indent=2, default=str))
        (tmp / "README.txt").write_text(
            f"Pass {pass_.name!r} failed verification.\n\nReplay and locate the guilty pass and rewrite:\n"
            f"  graphopt bisect {out}\n\nor with another pipeline:\n  graphopt bisect {out} --pipeline TEXT\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def load_reproducer(path: str | Path) -> dict[str, Any]:
    """``{"module", "example_inputs", "dynamic", "pipeline", "failure"}`` from a reproducer dir."""
    p = Path(path)
    needed = ["original.pt2", "inputs.npz", "pipeline.txt", "failure.json"]
    missing = [n for n in needed if not (p / n).is_file()]
    if missing:
        raise ArtifactError(f"{p} is not a graphopt reproducer (missing {', '.join(missing)}); "
                            "reproducers are written next to --out when verification fails")
    failure = json.loads((p / "failure.json").read_text())
    module = torch.export.load(str(p / "original.pt2")).module()
    with np.load(p / "inputs.npz", allow_pickle=False) as z:
        inputs = tuple(torch.from_numpy(z[k].copy()) for k in z.files)
    with np.load(p / "inputs.npz", allow_pickle=False) as z:
        names = list(z.files)
    dynamic = {k: {int(d): (int(r[0]), int(r[1])) for d, r in v.items()}
               for k, v in (failure.get("dynamic") or {}).items() if k in names}
    return {"module": module, "example_inputs": inputs, "input_names": names, "dynamic": dynamic,
            "pipeline": (p / "pipeline.txt").read_text().strip(), "failure": failure}
