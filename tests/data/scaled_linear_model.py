"""A small model where the sample plugin's ``fold-linear-scale`` pass fires (and cleanup has a
no-op to remove): OPT/Whisper-style attention that scales q right after its projection.

``build()`` returns ``(module, (x,))``; used by ``tests/test_third_party_plugin.py`` as
``graphopt compile tests/data/scaled_linear_model.py:build --pipeline cleanup,fold-linear-scale``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaledQueryAttention(nn.Module):
    def __init__(self, hidden: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q = (self.q_proj(x) * self.scaling).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        att = F.softmax(q @ k.transpose(-2, -1), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, h)
        return x + y.contiguous() * 1  # no-ops for cleanup


def build():
    torch.manual_seed(0)
    model = ScaledQueryAttention().eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    return model, (x,)
