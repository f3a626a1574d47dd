"""prune: remove weights by magnitude or Wanda, as whole heads/channels, 2:4 blocks, or one by one.

Why: unstructured sparsity alone makes nothing faster: a dense GEMM multiplies zeros as fast as
anything else. Pruning that pays either removes whole attention heads and FFN channels (the
weights physically shrink, every backend runs a smaller model) or follows the 2:4 pattern that
NVIDIA sparse tensor cores run (the artifact records it for TensorRT). Unstructured masks are
there for comparison and report size/quality only.

``structure=heads`` / ``channels`` (see :mod:`graphopt_prune.dependency`)::

    %q = linear(%h, Wq[64,64])                 %q = linear(%h, Wq'[48,64])
    %v = view(%q, [b, t, 4, 16])        →      %v = view(%q, [b, t, 3, 16])
    ...                                        ...
    %r = reshape(%a, [b, t, 64])               %r = reshape(%a, [b, t, 48])   (or -1, left alone)
    %o = linear(%r, Wo[64,64])                 %o = linear(%r, Wo'[64,48])

A grouped-query KV head goes with its query heads; merged QKV / gate-up linears (``merge-gemms``,
GPT-2's ``c_attn``) shrink every segment and their ``split_with_sizes``. The pass then checks its
own rewrite: the shrunk graph must equal the original with the removed units' consumer columns
zeroed (max error in the stats as ``shrink_vs_mask_err``), before the ``metric`` policy judges
quality against the original.

``structure=unstructured`` / ``2:4`` mask weights in place: ``magnitude`` compares ``|W|`` over a
whole matrix; ``wanda`` compares ``|W| * ||X||`` within each output row (the paper's comparison
group); 2:4 keeps the 2 most important of every 4 consecutive input weights of each output.
``ir.meta["sparsity"]`` records the pattern and the weights, and the manifest carries it.

Options: ``prune(method=wanda,structure=heads,amount=0.25,calib=train.txt,tokenizer=tok.json)``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Literal

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.errors import PassError
from graphopt.ir import GraphIR

from . import dependency, importance, rewrite
from .dependency import Group
from .policy import PruneQuality
from .sites import Site, get_constant, sites

log = logging.getLogger(__name__)

#: Weights left alone unless ``exclude`` says otherwise: embeddings and output heads (what the Wanda
#: and SparseGPT papers leave dense too).
DEFAULT_EXCLUDE = r"(^|[._])(lm_head|embed\w*|wte|wpe|classifier|score|pooler)([._]|$)"


class Prune(Pass):
    """Prune weights (magnitude or Wanda): structured heads/channels, 2:4, or unstructured."""

    name = "prune"
    weight_memory = 1.0  # the shrunk or masked copies of the pruned weights
    verification = PruneQuality(min_mean_cosine=0.3)

    @dataclasses.dataclass
    class Options:
        method: Literal["magnitude", "wanda"] = "magnitude"
        structure: Literal["unstructured", "2:4", "heads", "channels"] = "unstructured"
        amount: float = 0.5
        scope: Literal["global", "layer"] = "global"
        calib: str = ""
        calib_samples: int = 32
        calib_seq: int = 128
        calib_fraction: float = 1.0
        tokenizer: str = ""
        exclude: str = DEFAULT_EXCLUDE
        min_cosine: float = 0.3
        max_ppl_ratio: float | None = None

        def __post_init__(self):
            if not 0.0 < self.amount < 1.0:
                raise ValueError(f"amount={self.amount} must be a fraction in (0, 1), e.g. amount=0.25")
            if self.structure == "2:4" and self.amount != 0.5:
                raise ValueError("structure=2:4 always removes 2 of every 4 weights; leave amount out")
            if self.method == "wanda" and not self.calib:
                raise ValueError(
                    "method=wanda needs calibration data: calib=PATH (a training-text file with "
                    "tokenizer=tokenizer.json, or an .npz of inputs)"
                )
            if self.calib_samples < 1 or self.calib_seq < 2 or not 0.0 < self.calib_fraction <= 1.0:
                raise ValueError("calib_samples must be >= 1, calib_seq >= 2 and calib_fraction in (0, 1]")
            try:
                re.compile(self.exclude)
            except re.error as e:
                raise ValueError(f"exclude={self.exclude!r} is not a regular expression: {e}") from None

    def __init__(self, options=None):
        super().__init__(options)
        o = self.options
        self.verification = PruneQuality(min_mean_cosine=o.min_cosine, max_ppl_ratio=o.max_ppl_ratio)

    # -- run ---------------------------------------------------------------------------------
    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        o = self.options
        gm = ir.graph_module
        params_before = ir.param_count()
        all_sites = sites(gm)
        norms = None
        if o.method == "wanda":
            from graphopt.fx import load_calibration

            sets = load_calibration(
                o.calib,
                ir=ir,
                tokenizer=o.tokenizer or None,
                max_samples=o.calib_samples,
                seq_len=o.calib_seq,
                batch_size=8,
                text_span=(0.0, o.calib_fraction),
            )
            norms = importance.input_norms(gm, all_sites, sets)
        if o.structure in ("heads", "channels"):
            stats = self._structured(ir, ctx, norms)
        else:
            stats = self._masks(ir, ctx, all_sites, norms)
        ir.recompile()
        stats = {
            "method": o.method,
            "structure": o.structure,
            "amount": o.amount,
            "params_before": params_before,
            "params_after": ir.param_count(),
            **stats,
        }
        changed = stats.get("units_removed", 0) > 0 or stats.get("weights_pruned", 0) > 0
        if (
            changed
        ):  # the artifact must reproduce the pruned graph; the policy bounds its distance to the original
            ir.meta["lowering_check"] = {**(ir.meta.get("lowering_check") or {}), "against": "optimized"}
        return PassResult(ir, changed, stats)

    # -- structured --------------------------------------------------------------------------
    def _structured(self, ir: GraphIR, ctx: PassContext, norms) -> dict:
        o = self.options
        gm = ir.graph_module
        exclude = re.compile(o.exclude)
        groups = dependency.trace(gm)
        blocked = {g.label: g.blocked for g in groups if g.blocked and g.sinks and g.kind == o.structure}
        eligible = []
        for g in groups:
            if g.blocked or g.kind != o.structure or g.units < 2:
                continue
            names = [s.name for _, s in g.producers] + [s.name for _, s in g.sinks]
            if any(exclude.search(n) for n in names):
                continue
            eligible.append(g)
        if not eligible:
            return {
                "units_removed": 0,
                "groups": 0,
                "blocked": blocked,
                "note": f"no {o.structure} group to prune"
                + (f" ({len(blocked)} blocked)" if blocked else ""),
            }
        scores = [self._unit_scores(gm, g, norms) for g in eligible]
        plan = [
            (g, keep)
            for g, keep in zip(eligible, _select(eligible, scores, o.amount, o.scope))
            if len(keep) < g.units and ctx.should_rewrite(f"prune {g.label}: {g.units}->{len(keep)} {g.kind}")
        ]
        check_inputs = _check_inputs(ir)
        masked = rewrite.masked_copy(gm, plan)
        with torch.no_grad():
            want = [_flat(masked(*inp)) for inp in check_inputs]
        layers = {}
        for g, keep in plan:
            before = _group_params(gm, g)
            rewrite.apply(gm, g, keep)
            layers[g.label] = f"{g.kind} {g.units}->{len(keep)}, params {before}->{_group_params(gm, g)}"
        gm.recompile()
        with torch.no_grad():
            got = [_flat(gm(*inp)) for inp in check_inputs]
        err = _check(want, got, [g.label for g, _ in plan])
        return {
            "units_removed": sum(g.units - len(k) for g, k in plan),
            "units_total": sum(g.units for g in eligible),
            "groups": len(plan),
            "shrink_vs_mask_err": err,
            "layers": layers,
            "blocked": blocked,
        }

    def _unit_scores(self, gm: torch.fx.GraphModule, g: Group, norms) -> torch.Tensor:
        o = self.options
        scores = torch.zeros(g.units, dtype=torch.float64)
        for chain, site, dim in [(c, s, s.in_dim) for c, s in g.producers] + [
            (c, s, s.out_dim) for c, s in g.sinks
        ]:
            s = importance.weight_scores(gm, site, o.method, norms).double()
            per = (s.pow(2) if o.method == "magnitude" else s).sum(dim=dim)
            for u, idx in enumerate(g.unit_slices(chain)):
                scores[u] += per[idx].sum()
        return scores.sqrt() if o.method == "magnitude" else scores

    # -- masks -------------------------------------------------------------------------------
    def _masks(self, ir: GraphIR, ctx: PassContext, all_sites: list[Site], norms) -> dict:
        o = self.options
        gm = ir.graph_module
        targets = _maskable(gm, all_sites, re.compile(o.exclude))
        layers, names, zeros, total, skipped = {}, [], 0, 0, {}
        for site in targets:
            w = get_constant(gm, site.weight)
            if o.structure == "2:4" and w.shape[site.in_dim] % 4:
                skipped[site.name] = f"{w.shape[site.in_dim]} input features are not a multiple of 4"
                continue
            if not ctx.should_rewrite(f"mask {site.name}"):
                continue
            s = importance.weight_scores(gm, site, o.method, norms)
            mask = _mask(s, site.in_dim, o.structure, o.method, o.amount)
            rewrite.replace_constant(gm, site.node, site.weight, w.detach() * mask.to(w.dtype))
            n0 = int((~mask).sum())
            layers[site.name] = f"sparsity {n0 / mask.numel():.3f} ({n0}/{mask.numel()})"
            names.append(str(site.weight.target))
            zeros += n0
            total += mask.numel()
        if names:
            ir.meta["sparsity"] = {
                "pattern": o.structure,
                "method": o.method,
                "weights": names,
                **({"amount": o.amount} if o.structure == "unstructured" else {}),
            }
        return {
            "weights_pruned": len(names),
            "sparsity": round(zeros / total, 4) if total else 0.0,
            "layers": layers,
            **({"skipped": skipped} if skipped else {}),
        }


def _maskable(gm: torch.fx.GraphModule, all_sites: list[Site], exclude: re.Pattern) -> list[Site]:
    """Sites whose weight only GEMMs read (not tied to an embedding) and whose name is not excluded."""
    site_nodes = {s.node for s in all_sites}
    out = []
    for s in all_sites:
        target = s.weight.target
        readers = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]
        if exclude.search(str(target)) or any(u not in site_nodes for u in readers):
            continue
        out.append(s)
    return out


def _mask(scores: torch.Tensor, in_dim: int, structure: str, method: str, amount: float) -> torch.Tensor:
    """True where a weight is kept."""
    s = scores.movedim(in_dim, -1)  # [out, in]
    if structure == "2:4":
        g = s.reshape(s.shape[0], -1, 4)
        drop = g.topk(2, dim=-1, largest=False).indices
        keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, drop, False).reshape(s.shape)
    elif method == "wanda":  # per output row
        k = int(amount * s.shape[1])
        drop = s.argsort(dim=1)[:, :k]
        keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, drop, False)
    else:  # magnitude over the whole matrix
        k = int(amount * s.numel())
        drop = s.flatten().argsort()[:k]
        keep = torch.ones(s.numel(), dtype=torch.bool).index_fill_(0, drop, False).reshape(s.shape)
    return keep.movedim(-1, in_dim)


def _select(groups: list[Group], scores: list[torch.Tensor], amount: float, scope: str) -> list[list[int]]:
    """Kept units per group: the least important ``amount`` of units go, at least one stays per group.
    ``global`` ranks every unit of every group together (scores normalized by their group's mean),
    so layers that matter less lose more; ``layer`` removes the same fraction from each group."""
    drops: list[set[int]] = [set() for _ in groups]
    if scope == "layer":
        for i, (g, s) in enumerate(zip(groups, scores)):
            k = min(round(amount * g.units), g.units - 1)
            drops[i] = set(s.argsort()[:k].tolist())
    else:
        pool = []
        for i, s in enumerate(scores):
            norm = s / s.mean().clamp_min(1e-30)
            pool.extend((float(norm[u]), i, u) for u in range(len(s)))
        k = round(amount * len(pool))
        for _, i, u in sorted(pool):
            if k <= 0:
                break
            if len(drops[i]) < groups[i].units - 1:
                drops[i].add(u)
                k -= 1
    return [sorted(set(range(g.units)) - d) for g, d in zip(groups, drops)]


def _group_params(gm: torch.fx.GraphModule, g: Group) -> int:
    seen, n = set(), 0
    for _, s in g.producers + g.sinks:
        for node in (s.weight, s.bias):
            t = get_constant(gm, node) if node is not None else None
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
    return n


def _check_inputs(ir: GraphIR) -> list[list[torch.Tensor]]:
    from graphopt.fx import make_verification_inputs

    return make_verification_inputs(ir, n_random=1, seed=7)


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check(want: list[list[torch.Tensor]], got: list[list[torch.Tensor]], labels: list[str]) -> float:
    worst = 0.0
    for a_set, b_set in zip(want, got):
        for a, b in zip(a_set, b_set):
            if a.shape != b.shape:
                raise PassError(
                    f"prune: the shrunk graph changed an output shape {tuple(a.shape)} -> {tuple(b.shape)}"
                )
            if not a.is_floating_point():
                continue
            err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            scale = float(a.double().abs().max()) if a.numel() else 0.0
            if not err <= 1e-4 * (1.0 + scale):
                raise PassError(
                    f"prune: the shrunk graph differs from the original with the same units masked (max error "
                    f"{err:.3g}): a dependent shape or weight was not fixed in {', '.join(labels)}; "
                    "report this model, and leave its structure out of the pipeline meanwhile"
                )
            worst = max(worst, err)
    return worst
