"""Quality metrics shared by verification policies and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double()
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


def token_cosine(original: torch.Tensor | None, candidate: torch.Tensor | None) -> dict[str, float]:
    """Cosine similarity along the last dim, per row (per token for [B, T, H] outputs):
    ``{"worst": min, "mean": mean}``. Two all-zero rows count as identical."""
    if original is None or candidate is None or original.numel() == 0:
        return {"worst": 1.0, "mean": 1.0}
    a, b = _rows(original), _rows(candidate)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-300)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    cos = torch.nan_to_num(cos, nan=-1.0)
    return {"worst": float(cos.min()), "mean": float(cos.mean())}


def top1_agreement(original: torch.Tensor | None, candidate: torch.Tensor | None) -> float:
    """Fraction of rows whose argmax over the last dim agrees."""
    if original is None or candidate is None or original.numel() == 0:
        return 1.0
    a, b = _rows(original), _rows(candidate)
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean cross-entropy) of next-token ``targets`` [B, T] under ``logits`` [B, T, V]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return float(math.exp(float(nll.mean())))


def logit_cosine(original: torch.Tensor | None, candidate: torch.Tensor | None) -> float:
    """Mean cosine similarity of the logit vectors (last dim) of ``original`` and
    ``candidate``: ``token_cosine(original, candidate)["mean"]``."""
    return token_cosine(original, candidate)["mean"]


def _as_logits(out) -> torch.Tensor:
    """Logits from what a forward function returned: a tensor, a ``ModelOutput`` / dict with
    ``"logits"`` (what an HF module or a graphopt Engine gives back), or a tuple (first item)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out:
        return _as_logits(out[0])
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"forward_fn returned {type(out).__name__}; expected logits [B, T, V] (or something holding 'logits')")


def heldout_windows(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """``(start, first_scored)`` for every window :func:`heldout_perplexity` evaluates.

    Window ``k`` starts at ``s = k * stride``: its inputs are ``ids[s : s + window]`` and its
    targets ``ids[s + 1 : s + window + 1]``. Only full windows are used, so there are
    ``(n_tokens - 1 - window) // stride + 1`` of them (0 when ``n_tokens <= window``) and
    the last ``(n_tokens - 1 - window) % stride`` targets are never scored. A window scores
    the targets from index ``first_scored`` (relative to ``s``) on: every target
    (``first_scored == 0``) unless windows overlap (``stride < window``), in which case it
    scores only the last ``stride`` targets, those that the previous window did not score.
    """
    stride = window if stride is None else stride
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    if n_tokens - 1 < window:
        return []
    count = (n_tokens - 1 - window) // stride + 1
    overlap = max(window - stride, 0)
    return [(k * stride, 0 if k == 0 else overlap) for k in range(count)]


def heldout_perplexity(
    forward_fn,
    token_ids: torch.Tensor,
    *,
    window: int = 128,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> float:
    """Perplexity of a decoder on held-out text: ``exp(total NLL / scored tokens)``.

    ``forward_fn(ids[B, T]) -> logits[B, T, V]`` (an eager module wrapped in a lambda, a
    GraphIR's module, a graphopt ``Engine``; a ``ModelOutput`` or dict holding ``"logits"``
    is accepted too). ``token_ids`` is the held-out stream, 1-D (or ``[1, N]``).

    Windows (see :func:`heldout_windows`): with the default ``stride=window`` they do NOT
    overlap: window ``k`` feeds ``ids[k*window : (k+1)*window]`` and scores the next-token
    targets ``ids[k*window+1 : (k+1)*window+1]``, so each target is scored exactly once
    with 0..window-1 tokens of context from its own window only (no state carries across
    windows). Only full windows count; ``max_windows`` keeps the first ``max_windows``.
    Windows are run ``batch_size`` at a time (every row has length ``window``, so no
    padding and no attention mask). NLL is accumulated in float64.
    """
    ids = token_ids.reshape(-1).long()
    spans = heldout_windows(ids.numel(), window, stride)
    if max_windows is not None:
        spans = spans[:max_windows]
    if not spans:
        raise ValueError(f"{ids.numel()} held-out tokens are too few for one window of {window} (+1 target)")
    total_nll, total_count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(spans), batch_size):
            chunk = spans[i : i + batch_size]
            batch = torch.stack([ids[s : s + window + 1] for s, _ in chunk])
            logits = _as_logits(forward_fn(batch[:, :-1]))
            if tuple(logits.shape[:2]) != (len(chunk), window):
                raise ValueError(f"forward_fn returned logits {tuple(logits.shape)}; expected [{len(chunk)}, {window}, V]")
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll = -logp.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)
            for row, (_, first) in enumerate(chunk):
                total_nll += float(nll[row, first:].sum())
                total_count += window - first
    return math.exp(total_nll / total_count)


@dataclass(frozen=True)
class ReferenceErrors:
    """Errors of an original output ``x`` and a candidate output ``y`` against a float64 reference
    ``r``, as sums that pool over tensors (``a + b``: one output over several input sets): the count
    of compared elements, sums of squares of ``x - r``, ``y - r`` and ``r``, and the largest of each
    in absolute value. Only positions where ``r`` and ``x`` are finite count; ``nonfinite_mismatch``
    says whether ``y`` differs from ``x`` anywhere ``x`` or ``r`` is NaN or infinite (those positions
    must match exactly)."""

    count: int = 0
    sq_orig: float = 0.0
    sq_new: float = 0.0
    sq_ref: float = 0.0
    max_orig: float = 0.0
    max_new: float = 0.0
    max_ref: float = 0.0
    nonfinite_mismatch: bool = False

    def __add__(self, o: ReferenceErrors) -> ReferenceErrors:
        return ReferenceErrors(self.count + o.count, self.sq_orig + o.sq_orig, self.sq_new + o.sq_new,
                               self.sq_ref + o.sq_ref, max(self.max_orig, o.max_orig), max(self.max_new, o.max_new),
                               max(self.max_ref, o.max_ref), self.nonfinite_mismatch or o.nonfinite_mismatch)

    def _rms(self, sq: float) -> float:
        return math.sqrt(sq / self.count) if self.count else 0.0

    @property
    def rms_orig(self) -> float:
        return self._rms(self.sq_orig)

    @property
    def rms_new(self) -> float:
        return self._rms(self.sq_new)

    @property
    def rms_ref(self) -> float:
        return self._rms(self.sq_ref)


def reference_errors(r: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     chunk: int = 1 << 22) -> ReferenceErrors:
    """:class:`ReferenceErrors` of ``x`` and ``y`` against ``r``, in float64, ``chunk`` elements at a
    time (a ``[B, T, vocab]`` logits output is never copied whole into float64)."""
    r, x, y = r.detach().reshape(-1), x.detach().reshape(-1), y.detach().reshape(-1)
    total = ReferenceErrors()
    for i in range(0, r.numel(), chunk):
        rc, xc, yc = (t[i:i + chunk].to(torch.float64) for t in (r, x, y))
        ok = torch.isfinite(rc) & torch.isfinite(xc)
        mismatch = False
        if not bool(ok.all()):  # NaN / inf in the original: the candidate must reproduce them
            bad = ~ok
            same = (xc[bad] == yc[bad]) | (torch.isnan(xc[bad]) & torch.isnan(yc[bad]))
            mismatch = not bool(same.all())
            rc, xc, yc = rc[ok], xc[ok], yc[ok]
        if not rc.numel():
            total = total + ReferenceErrors(nonfinite_mismatch=mismatch)
            continue
        eo, en = (xc - rc).abs(), (yc - rc).abs().nan_to_num(nan=math.inf)
        total = total + ReferenceErrors(rc.numel(), float(eo.square().sum()), float(en.square().sum()),
                                        float(rc.square().sum()), float(eo.max()), float(en.max()),
                                        float(rc.abs().max()), mismatch)
    return total
