"""A model where fold-linear-scale fires: BART/OPT-style attention that scales q right after its
projection, ``q = q_proj(x) * head_dim**-0.5``.

``build()`` returns ``(module, (x,), dynamic)`` for ``graphopt compile scaled_attention.py:build``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaledAttention(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q = self.q_proj(x) * self.scaling  # <- folded into q_proj's weight and bias
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        att = F.softmax(q @ k.transpose(-2, -1), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, h)
        return x + self.out_proj(y)


def build(hidden: int = 32, heads: int = 4, batch: int = 2, seq_len: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = ScaledAttention(hidden, heads).eval()
    x = torch.randn(batch, seq_len, hidden, generator=torch.Generator().manual_seed(seed + 1))
    return model, (x,), {"x": {0: (1, 8), 1: (2, 64)}}
