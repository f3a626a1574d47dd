"""Quality metrics shared by verification policies and the benchmarks."""

from __future__ import annotations

import math

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
