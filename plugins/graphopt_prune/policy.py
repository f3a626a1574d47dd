"""The verification policy of ``prune``: quality bounds, not closeness.

Pruning changes what a model computes on purpose, so it is judged like other lossy passes by
quality metrics against the ORIGINAL graph on the verification inputs (the example inputs plus
fresh random sets): token cosine similarity and top-1 agreement of the first output (logits for
decoders, hidden states for encoders) and, for decoders (int token ids in, ``[B, T, vocab]`` out),
the perplexity of the next-token targets of the example inputs under both graphs (real text when
the model's factory gives real text, as the trained Shakespeare sample does).
"""

from __future__ import annotations

import math

from graphopt.verify import Evidence, Metric, Outcome, perplexity


class PruneQuality(Metric):
    name = "metric"

    def __init__(self, *, min_mean_cosine: float | None = None, max_ppl_ratio: float | None = None):
        super().__init__(min_mean_cosine=min_mean_cosine)
        self.max_ppl_ratio = max_ppl_ratio

    def check(self, ev: Evidence) -> Outcome:
        out = super().check(ev)
        ppl = _perplexities(ev)
        if ppl is not None:
            out.figures.update(ppl)
            if self.max_ppl_ratio is not None and out.passed and not ppl["ppl_ratio"] <= self.max_ppl_ratio:
                return Outcome(
                    False,
                    f"perplexity ratio {ppl['ppl_ratio']:.3g} on the example inputs exceeds "
                    f"max_ppl_ratio={self.max_ppl_ratio:g}",
                    out.worst_output,
                    out.figures,
                )
            out.message += f", example perplexity {ppl['ppl_original']:.4g} -> {ppl['ppl_candidate']:.4g}"
        return out

    def describe(self) -> str:
        parts = []
        if self.min_mean_cosine is not None:
            parts.append(f"min_mean_cosine={self.min_mean_cosine:g}")
        if self.max_ppl_ratio is not None:
            parts.append(f"max_ppl_ratio={self.max_ppl_ratio:g}")
        return f"metric({', '.join(parts)})"


def _perplexities(ev: Evidence) -> dict[str, float] | None:
    if not ev.inputs or not ev.original or not ev.candidate:
        return None
    ids = ev.inputs[0][0]
    a, b = ev.original[0][0], ev.candidate[0][0]
    if ids.is_floating_point() or ids.dim() != 2 or a.dim() != 3 or tuple(a.shape[:2]) != tuple(ids.shape):
        return None
    if ids.numel() == 0 or int(ids.max()) >= a.shape[-1] or ids.shape[1] < 2:
        return None
    targets = ids[:, 1:]
    p0 = perplexity(a[:, :-1], targets)
    p1 = perplexity(b[:, :-1], targets)
    ratio = p1 / p0 if p0 > 0 and math.isfinite(p0) else math.inf
    return {"ppl_original": p0, "ppl_candidate": p1, "ppl_ratio": ratio}
