"""Verification: policies, metrics, the per-pass verifier, bisection and reproducers."""

from graphopt.verify.metrics import perplexity, token_cosine, top1_agreement
from graphopt.verify.policies import (
    AllClose,
    Equivalence,
    Evidence,
    Exact,
    Metric,
    Outcome,
    Policy,
    Reference,
    allclose,
    equivalence,
    exact,
    metric,
    reference,
)

__all__ = [
    "AllClose", "Equivalence", "Evidence", "Exact", "Metric", "Outcome", "Policy", "Reference",
    "allclose", "equivalence", "exact", "metric", "reference",
    "perplexity", "token_cosine", "top1_agreement",
]
