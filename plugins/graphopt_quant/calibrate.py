"""calibrate: observe the activations every quantizable linear sees on calibration data.

Why: static quantization (W8A8, SmoothQuant, fp8) fixes each activation's scale at build time;
the scale can only be as good as the data it was measured on. The graph is not changed::

    graph  ──run on calibration sets (fx interpreter)──▶  per linear: |x| max, histogram,
                                                         per-channel |x| max (SmoothQuant)
           ──observer (minmax / percentile / entropy / mse)──▶  amax → ctx.data["quant.calibration"]

The result is keyed by sha256(graph text + calibration data + observer options) and written into
the artifact as ``calibration.json``; rebuilding into the same ``--out`` with the same graph and
data reuses it (stats ``reused=1``) instead of observing again. Calibrating twice on the same data
gives bit-identical scales (fixed two-pass histograms, no sampling).

Data: ``calib=`` a text file (tokenized with the model's tokenizer, ``tokenizer=`` or the
factory's), an ``.npz`` of inputs, or (API) an iterable via ``PassSpec("calibrate", {"calib": it})``;
see :mod:`graphopt.calibration`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

import graphopt
from graphopt.errors import PassError
from graphopt.fx import CalibrationError, fingerprint, load_calibration
from graphopt_quant import core
from graphopt_quant.observers import OBSERVERS

log = logging.getLogger(__name__)

CACHE_FILE = "calibration.json"
CACHE_VERSION = 1


class Calibrate(graphopt.Pass):
    """Observe activations on calibration data (min-max / percentile / entropy / MSE); no rewrite."""

    name = "calibrate"
    # the graph is not changed; earlier passes' rounding differences vs the original carry over
    verification = graphopt.verify.reference()
    runs_before = ("quantize",)

    @dataclasses.dataclass
    class Options:
        calib: object = ""               # text file, .npz, or (API) an iterable of inputs
        observer: str = "percentile"     # minmax | percentile | entropy | mse | auto (best SQNR per layer)
        percentile: float = 99.99
        max_samples: int = 32
        seq_len: int = 128
        batch_size: int = 0              # 0: 1 for a dynamic batch dim, else the example batch
        text_mode: str = "stream"        # stream (decoders) | lines (encoders)
        text_start: float = 0.0          # fraction of the text's characters to start at
        text_end: float = 1.0            # ... and to stop at (e.g. 0.9: the training split)
        tokenizer: str = ""              # tokenizer.json; default: the model factory's
        cache: bool = True               # reuse calibration.json of the artifact being rebuilt

        def __post_init__(self):
            if self.observer not in (*OBSERVERS, "auto"):
                raise ValueError(f"observer={self.observer!r} must be one of {', '.join(OBSERVERS)}, auto")
            if not 0 < self.percentile <= 100:
                raise ValueError(f"percentile={self.percentile} must be in (0, 100]")

    def run(self, ir: graphopt.GraphIR, ctx: graphopt.PassContext) -> graphopt.PassResult:
        o = self.options
        if o.calib in ("", None):
            raise PassError("calibrate needs calibration data: calibrate(calib=path/to/text.txt or inputs.npz); "
                            "from Python pass an iterable with PassSpec('calibrate', {'calib': samples})")
        tokenizer = o.tokenizer or ctx.data.get("tokenizer")
        sets = load_calibration(o.calib, ir=ir, tokenizer=tokenizer or None, max_samples=o.max_samples,
                                seq_len=o.seq_len, batch_size=o.batch_size or None, text_mode=o.text_mode,
                                text_span=(o.text_start, o.text_end))
        _check_runs(ir, sets)
        linears = core.find_linears(ir)
        key = calibration_key(ir, sets, o)
        cached = _read_cache(ctx, key) if o.cache else None
        if cached is not None:
            result, reused = cached, 1
        else:
            progress = _progress(ctx)
            stats = core.observe(ir, sets, linears, histogram=o.observer != "minmax", progress=progress)
            # "auto" records every observer's amax; quantize picks per layer the one with the best SQNR
            result = {"version": CACHE_VERSION, "key": key, "observer": o.observer, "percentile": o.percentile,
                      "samples": sum(int(s[0].shape[0]) for s in sets), "sets": len(sets),
                      "layers": {name: {"amax": st.observer.amax(o.observer, percentile=o.percentile),
                                        "amax_by": {m: st.observer.amax(m, percentile=o.percentile) for m in
                                                    (OBSERVERS if o.observer == "auto" else (o.observer,))},
                                        "max": st.observer.max,
                                        "channel_absmax": [float(v) for v in st.channel_absmax.tolist()]}
                                 for name, st in stats.items()}}
            reused = 0
        ctx.data["quant.calibration"] = result
        ctx.data["quant.calibration_sets"] = sets
        files = ir.meta.setdefault("artifact_files", {})
        files[CACHE_FILE] = json.dumps(result, sort_keys=True) + "\n"
        return graphopt.PassResult(ir, changed=False, stats={
            "layers": len(result["layers"]), "sets": len(sets), "observer": o.observer, "reused": reused,
            "key": key[:12]})


def calibration_key(ir: graphopt.GraphIR, sets: list[list[torch.Tensor]], o: Any) -> str:
    h = hashlib.sha256()
    h.update(ir.format(provenance=False).encode())
    h.update(fingerprint(sets).encode())
    h.update(f"{o.observer}|{o.percentile}|{CACHE_VERSION}".encode())
    return h.hexdigest()


def _read_cache(ctx: graphopt.PassContext, key: str) -> dict | None:
    out = ctx.data.get("artifact_dir")
    if not out:
        return None
    path = Path(out) / CACHE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        log.info("calibrate: %s is unreadable; calibrating again", path)
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("version") != CACHE_VERSION:
        log.info("calibrate: %s was made for another graph or data; calibrating again", path)
        return None
    return data


def _check_runs(ir: graphopt.GraphIR, sets: list[list[torch.Tensor]]) -> None:
    try:
        with torch.no_grad():
            ir.graph_module(*sets[0])
    except Exception as e:
        shapes = [tuple(t.shape) for t in sets[0]]
        raise CalibrationError(f"the graph cannot run the first calibration set (shapes {shapes}): "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check that the "
                               f"data matches the inputs {ir.input_names}") from None


def _progress(ctx: graphopt.PassContext):
    if not ctx.progress:
        return None

    def report(done: int, total: int) -> None:
        ctx.progress("calibrate", done=done, total=total)
    return report
