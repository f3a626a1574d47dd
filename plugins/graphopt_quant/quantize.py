"""quantize: rewrite the linears with a quantization scheme, guarded by an accuracy bound.

Schemes (``scheme=``):

| scheme        | weights                          | activations                       | needs calibrate |
|---------------|----------------------------------|-----------------------------------|-----------------|
| ``w8a8``        | int8 per output channel          | int8 per tensor, static           | yes             |
| ``smoothquant`` | int8 per channel, × s            | int8 per tensor of x / s          | yes             |
| ``fp8``         | fp8 E4M3 per channel             | fp8 E4M3 per tensor (TensorRT)    | yes             |
| ``int8-weight`` | int8 per channel                 | float                             | no              |
| ``int4-weight`` | int4 blocks of ``block_size``      | float                             | no              |

Everything is symmetric with zero point 0 and scales > 0 (TensorRT's explicit-quantization rules;
per-channel only on weights, blocks only for int4). SmoothQuant (Xiao et al. 2023) moves
activation outliers into the weights per input channel, ``s_j = max|x_j|^α / max|W_:,j|^(1-α)``;
``1/s`` is folded into the preceding norm's weight where the norm feeds only those linears.

Skipped by default: anything named ``*embed*`` / ``*norm*``, and the ``lm_head`` (a linear named
so, tied to an embedding table or producing the logits) except with ``int4-weight``: there it is
quantized like the others (``lm_head=auto``), as onnxruntime-genai's model builder does, because it
is the largest single weight (a fifth of a 1B decoder's bytes, 1 GiB in fp32) and a weight-only
decode step reads it in full; a tied table keeps its float copy for the embedding lookup.
``lm_head=float`` keeps it in float, ``lm_head=quantize`` quantizes it with every scheme.
``skip=a*|b*`` adds patterns, ``include=`` overrides.

Accuracy guard: ``min_cosine=0.99`` / ``min_mean_cosine=0.998`` (worst / mean token cosine of the
first output vs float, real tokens only when the graph has an ``attention_mask``) and/or ``max_ppl_increase=0.02`` (perplexity of the
calibration text, relative). Each layer's damage is measured alone (the sensitivity report, with
its output SQNR); if the fully quantized graph breaks the bound, the most damaging layers go back
to float one at a time until it holds (at most ``max_fallback``). The report keeps the table.

Rewrite of one linear: see :mod:`graphopt_quant.core`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

import graphopt
from graphopt.errors import PassError
from graphopt.fx import attribute
from graphopt.verify import token_cosine
from graphopt_quant import core


class Quantize(graphopt.Pass):
    """Quantize linears: w8a8 | smoothquant | fp8 (Q/DQ) | int8-weight | int4-weight, accuracy-guarded."""

    name = "quantize"
    weight_memory = 0.35  # integer weights and their scales (int8: 1/4, int4 stored in int8)
    runs_after = ("calibrate",)
    verification = graphopt.verify.metric(min_cosine=0.9)  # per instance: verify_cosine

    @dataclasses.dataclass
    class Options:
        scheme: str = "w8a8"
        alpha: float = 0.5               # SmoothQuant migration strength
        block_size: int = 64             # int4-weight: 32 | 64 | 128
        activations: str = "int8"        # int8 (zero point 0) | uint8 (zero point 128: same numerics, ORT x86)
        reduce_range: bool = False       # 7-bit int8 weights: needed by ONNX Runtime on x86 CPUs without VNNI
        skip: list[str] = dataclasses.field(default_factory=list)
        include: list[str] = dataclasses.field(default_factory=list)
        lm_head: str = "auto"            # auto (int4-weight: quantized; others: float) | quantize | float
        min_cosine: float = 0.0          # guard: worst token cosine >= this (0: off)
        min_mean_cosine: float = 0.0     # guard: mean token cosine >= this (0: off)
        max_ppl_increase: float = 0.0    # guard: perplexity <= (1 + this) x float (0: off)
        max_fallback: int = -1           # guard: at most this many layers back to float (-1: any)
        verify_cosine: float = 0.9       # verification policy: worst cosine on the verification inputs

        def __post_init__(self):
            if self.scheme not in core.SCHEMES:
                raise ValueError(f"scheme={self.scheme!r} must be one of {', '.join(core.SCHEMES)}")
            if self.block_size not in (32, 64, 128):
                raise ValueError(f"block_size={self.block_size} must be 32, 64 or 128")
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
            if self.activations not in ("int8", "uint8"):
                raise ValueError(f"activations={self.activations!r} must be int8 or uint8")
            if self.lm_head not in ("auto", "quantize", "float"):
                raise ValueError(f"lm_head={self.lm_head!r} must be auto, quantize or float")

    def __init__(self, options: Any = None):
        super().__init__(options)
        # lossy: judged by quality bounds, per scheme (top-1 agreement matters for decoders' logits)
        self.verification = graphopt.verify.metric(min_cosine=self.options.verify_cosine)

    def run(self, ir: graphopt.GraphIR, ctx: graphopt.PassContext) -> graphopt.PassResult:
        o = self.options
        act = core.act_dtype(o.scheme)
        calib = ctx.data.get("quant.calibration")
        sets = ctx.data.get("quant.calibration_sets")
        if act is not None and calib is None:
            raise PassError(f"quantize(scheme={o.scheme}) needs activation scales: put calibrate(calib=...) "
                            "before it in the pipeline")
        linears = core.find_linears(ir)
        head = o.lm_head == "quantize" or (o.lm_head == "auto" and o.scheme == "int4-weight")
        chosen, skipped = core.select(ir, linears, tuple(o.skip), tuple(o.include), lm_head=head)
        self._inputs = core.layer_inputs(ir, sets[0], chosen) if sets else {}
        self._smooth: dict[str, torch.Tensor] = {}  # one smoothing tensor per activation (this run)
        plans = {lin.name: self._plan(lin, ir, calib, linears) for lin in chosen}
        report: list[dict[str, Any]] = []
        fallback: list[str] = []
        guard = o.min_cosine > 0 or o.min_mean_cosine > 0 or o.max_ppl_increase > 0
        if (guard or sets) and sets:
            report, fallback = self._guard(ir, chosen, plans, sets, guard)
        for name in fallback:
            plans.pop(name)
        n = core.rewrite(ir, plans, ctx.should_rewrite)
        if n:
            # the lowered artifact must reproduce THIS graph's numerics (integer kernels may round an
            # element to the neighbouring level: a cosine bound, not allclose); this pass bounded the
            # distance to the original
            ir.meta["lowering_check"] = {**(ir.meta.get("lowering_check") or {}), "against": "optimized",
                                         "policy": "metric", "min_cosine": 0.97}
        summary = {"scheme": o.scheme, "quantized": n, "skipped": skipped, "fallback": fallback,
                   "guard": getattr(self, "final", None), "layers": report}
        ir.meta.setdefault("quantization", {}).update(summary)
        rec = ctx.report.current() if ctx.report is not None else None
        if rec is not None:
            rec["quantization"] = summary
        return graphopt.PassResult(ir, changed=n > 0, stats={
            "scheme": o.scheme, "quantized": n, "skipped": len(skipped), "fallback": len(fallback),
            **({"worst_sqnr_db": round(min(r["sqnr_db"] for r in report), 1)} if report else {})})

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, lin: core.Linear, ir: graphopt.GraphIR, calib: dict | None, linears) -> core.LayerPlan:
        o = self.options
        scheme = o.scheme
        plan = core.LayerPlan(scheme, block_size=o.block_size if scheme == "int4-weight" else 0,
                              reduce_range=o.reduce_range)
        act = core.act_dtype(scheme)
        if act is None:
            return plan
        layer = (calib or {}).get("layers", {}).get(lin.name)
        if layer is None:
            raise PassError(f"quantize: no calibration for linear {lin.name!r} (node {lin.node.name}); "
                            "calibrate and quantize must run on the same graph, back to back")
        amax = float(layer["amax"])
        if scheme == "smoothquant":
            cm = torch.tensor(layer["channel_absmax"], dtype=torch.float64)
            group = [lin2 for lin2 in linears if lin2.x is lin.x]  # linears sharing x share s
            wmax = torch.stack([attribute(ir.graph_module, g.weight_attr).detach().abs().amax(0).double()
                                for g in group]).amax(0)
            s = (cm.clamp_min(1e-5) ** o.alpha / wmax.clamp_min(1e-5) ** (1 - o.alpha)).clamp_min(1e-5)
            plan.smooth = self._smooth.setdefault(lin.x.name, s.float())  # one multiply per activation
            amax = float((cm / s).max())  # min-max of the smoothed activation (SmoothQuant's static recipe)
        plan.act_scale = max(amax, 1e-8) / core.QMAX[act]
        by = layer.get("amax_by") or {}
        if len(by) > 1 and scheme != "smoothquant" and lin.name in self._inputs:
            # observer=auto: the candidate clip value whose quantized layer output has the best SQNR
            def sqnr(a: float) -> float:
                trial = dataclasses.replace(plan, act_scale=max(a, 1e-8) / core.QMAX[act])
                return core.layer_sqnr(ir, self._inputs[lin.name], lin, trial)
            best = max(sorted(by), key=lambda m: sqnr(by[m]))
            plan.act_scale = max(by[best], 1e-8) / core.QMAX[act]
            plan.observer = best
        if act == "int8" and o.activations == "uint8":
            plan.act_encoding = "uint8"  # numerics identical; only the ONNX encoding differs
        return plan

    # -- accuracy guard ---------------------------------------------------------------------
    def _guard(self, ir, chosen, plans, sets, guard: bool) -> tuple[list[dict], list[str]]:
        o = self.options
        ref = core.simulate(ir, sets, {})
        mask = _real_tokens(ir, sets)

        def score(active: dict) -> dict[str, float]:
            outs = core.simulate(ir, sets, {lin.node: plans[lin.name] for lin in chosen if lin.name in active})
            return _metrics(ir, sets, ref, outs, mask)

        base = _metrics(ir, sets, ref, ref, mask)
        rows = []
        for lin in chosen:
            alone = score({lin.name})
            rows.append({"layer": lin.name, "node": lin.node.name, "scheme": plans[lin.name].scheme, "observer": plans[lin.name].observer,
                         "sqnr_db": round(core.layer_sqnr(ir, self._inputs[lin.name], lin, plans[lin.name]), 2),
                         "alone": {k: round(v, 6) for k, v in alone.items()},
                         "damage": _damage(alone, base)})
        rows.sort(key=lambda r: -r["damage"])
        fallback: list[str] = []
        if guard:
            active = {lin.name for lin in chosen}
            full = score(active)
            limit = len(rows) if o.max_fallback < 0 else o.max_fallback
            while not self._holds(full, base) and len(fallback) < limit:
                worst = next(r["layer"] for r in rows if r["layer"] in active)
                active.discard(worst)
                fallback.append(worst)
                full = score(active)
            if not self._holds(full, base):
                raise PassError(f"quantize: the accuracy bound does not hold even with {len(fallback)} layer(s) "
                                f"in float ({_fmt(full)}); raise max_fallback, loosen the bound, or try another "
                                "observer / scheme")
            for r in rows:
                r["precision"] = "float" if r["layer"] in fallback else plans[r["layer"]].scheme
            self.final = {"base": base, "quantized": full}
        return rows, fallback

    def _holds(self, m: dict[str, float], base: dict[str, float]) -> bool:
        o = self.options
        if o.min_cosine > 0 and m["worst_cosine"] < o.min_cosine:
            return False
        if o.min_mean_cosine > 0 and m["mean_cosine"] < o.min_mean_cosine:
            return False
        if o.max_ppl_increase > 0 and "perplexity" in m and m["perplexity"] > base["perplexity"] * (1 + o.max_ppl_increase):
            return False
        return True


def _real_tokens(ir, sets) -> list[torch.Tensor | None]:
    if "attention_mask" not in ir.input_names:
        return [None] * len(sets)
    i = ir.input_names.index("attention_mask")
    return [flat[i].bool() for flat in sets]


def _metrics(ir, sets, ref, outs, masks) -> dict[str, float]:
    a, b = [], []
    for r, o, m in zip(ref, outs, masks):
        x, y = r[0], o[0]
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            x, y = x[m], y[m]
        a.append(x.reshape(-1, x.shape[-1]))
        b.append(y.reshape(-1, y.shape[-1]))
    cos = token_cosine(torch.cat(a), torch.cat(b))
    out = {"worst_cosine": cos["worst"], "mean_cosine": cos["mean"]}
    if _is_lm(ir, sets, ref):
        out["perplexity"] = _ppl(ir, sets, outs)
    return out


def _is_lm(ir, sets, ref) -> bool:
    """Logits over a vocabulary: ``[B, T, V]`` with every input id < V (a decoder's output)."""
    if "input_ids" not in ir.input_names or ref[0][0].dim() != 3:
        return False
    i = ir.input_names.index("input_ids")
    return all(int(flat[i].max()) < r[0].shape[-1] and r[0].shape[:2] == flat[i].shape for flat, r in zip(sets, ref))


def _ppl(ir, sets, outs) -> float:
    i = ir.input_names.index("input_ids")
    nll, count = 0.0, 0
    for flat, o in zip(sets, outs):
        ids, logits = flat[i], o[0]
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        nll += float(-logp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())
        count += ids[:, 1:].numel()
    return math.exp(nll / max(count, 1))


def _damage(m: dict[str, float], base: dict[str, float]) -> float:
    d = 1.0 - m["worst_cosine"]
    if "perplexity" in m:
        d = max(d, m["perplexity"] / base["perplexity"] - 1.0)
    return round(d, 8)


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.5g}" for k, v in m.items())
