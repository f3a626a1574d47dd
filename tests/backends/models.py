"""Small models shared by the backend tests: an MLP with two outputs and a causal attention block
(hand-written mask or SDPA), each with dynamic batch/sequence ranges and fresh inputs of other sizes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RANGE = {0: (1, 8), 1: (1, 64)}


# -- models -----------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    """Two linear layers with LayerNorm and GELU; a second output from the input alone."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)

    def forward(self, x, mask):
        return self.fc2(F.gelu(self.norm(self.fc1(x)))) * mask[..., None], x.mean(-1)


class CausalAttention(torch.nn.Module):
    """Pre-norm causal self-attention; ``sdpa=False`` builds the mask by hand (sliced tril buffer)."""

    def __init__(self, sdpa: bool, d: int = 32, heads: int = 4, max_len: int = 128):
        super().__init__()
        self.sdpa, self.heads = sdpa, heads
        self.norm, self.qkv, self.proj = torch.nn.LayerNorm(d), torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.norm(x)).split(d, -1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            y = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(-1) @ v
        return x + self.proj(y.transpose(1, 2).reshape(b, t, d))


def _mlp():
    torch.manual_seed(0)
    return (MLP().eval(), (torch.randn(3, 5, 16), torch.ones(3, 5)), {"x": RANGE, "mask": RANGE},
            (torch.randn(1, 17, 16), torch.rand(1, 17)))


def _attention(sdpa: bool):
    torch.manual_seed(0)
    return (CausalAttention(sdpa).eval(), (torch.randn(2, 7, 32),), {"x": RANGE}, (torch.randn(5, 23, 32),))


CASES = {"mlp": _mlp, "attention-mask": lambda: _attention(False), "attention-sdpa": lambda: _attention(True)}
