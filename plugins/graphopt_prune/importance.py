"""How much each weight (or prunable unit) matters.

- ``magnitude``: ``|W|`` (squared, for unit norms): needs nothing but the weights.
- ``wanda`` (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"):
  ``|W_ij| * ||X_j||_2``, where ``||X_j||`` is the norm of input feature ``j`` over every
  calibration token. Weights that multiply large activations are kept even when they are small.

Unit scores (structured pruning) sum the scores of every weight a unit owns: producer rows and
consumer columns.
"""

from __future__ import annotations

import torch
import torch.fx

from .sites import Site, get_constant


class _Collect(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, sites: list[Site]):
        super().__init__(gm)
        self.by_node = {s.node: s for s in sites}
        self.sumsq: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def run_node(self, n: torch.fx.Node):
        site = self.by_node.get(n)
        if site is not None:
            x = self.env[site.x]
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            acc = self.sumsq.get(n.name)
            s = rows.pow(2).sum(0)
            self.sumsq[n.name] = s if acc is None else acc + s
        return super().run_node(n)


def input_norms(
    gm: torch.fx.GraphModule, sites: list[Site], input_sets: list[list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input feature of every site (keyed by the site node's name)."""
    col = _Collect(gm, sites)
    with torch.no_grad():
        for inputs in input_sets:
            col.run(*inputs)
    return {k: v.sqrt().float() for k, v in col.sumsq.items()}


def weight_scores(
    gm: torch.fx.GraphModule, site: Site, method: str, norms: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    """Per-weight importance, in the weight's own layout."""
    w = get_constant(gm, site.weight).detach().float()
    if method == "magnitude":
        return w.abs()
    norm = (norms or {}).get(site.node.name)
    if norm is None:
        raise KeyError(f"no calibration activations for {site.node.name}")
    shape = [1, 1]
    shape[site.in_dim] = -1
    return w.abs() * norm.reshape(shape)
