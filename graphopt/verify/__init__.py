"""Verification: policies, metrics, the per-pass verifier, bisection and reproducers."""

from graphopt.verify.metrics import heldout_perplexity, logit_cosine, perplexity, token_cosine, top1_agreement
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
    "heldout_perplexity", "logit_cosine", "perplexity", "token_cosine", "top1_agreement",
]
