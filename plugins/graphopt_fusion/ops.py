"""Custom ops that fusion passes insert where ATen has no canonical op.

``graphopt::rotary_embedding(x, cos, sin, interleaved=False) -> Tensor`` is rotary position
embedding (RoPE) with the semantics of the ONNX opset-23 ``RotaryEmbedding`` op (without
``position_ids``, full rotation), so that lowering it is a one-to-one translation:

- ``x``: ``[batch, num_heads, seq, head_dim]`` (``head_dim`` even);
- ``cos`` / ``sin``: ``[b, seq, head_dim / 2]`` with ``b`` 1 or ``batch``: one angle per pair of
  rotated values (ONNX wants ``b == batch``; the translation expands a batch of 1);
- rotate-half (``interleaved=False``, Llama/NeoX): pairs are ``(x[..., i], x[..., i + head_dim/2])``;
  interleaved (GPT-J): pairs are ``(x[..., 2i], x[..., 2i + 1])``. For each pair ``(x1, x2)``::

      out1 = x1 * cos - x2 * sin
      out2 = x2 * cos + x1 * sin

For rotate-half this is, term by term, what Hugging Face computes as
``q * cat(cos, cos) + rotate_half(q) * cat(sin, sin)`` (``x1*c + (-x2)*s`` is ``x1*c - x2*s`` in
IEEE arithmetic), so the reference implementation below gives bit-identical results. The fake
(meta) implementation makes FakeTensor shape propagation and ``torch.export`` re-export work.

Importing this module registers the op with torch (``torch.ops.graphopt.rotary_embedding``); its
ONNX translations (``RotaryEmbedding`` from opset 23, the same arithmetic in plain ONNX ops below
it) are listed in :data:`ONNX_TRANSLATIONS`, which the plugin registers through its hook. The fusion plugin imports it when it registers its passes, so every
process that loads plugins (``graphopt.load`` does) can deserialize a ``.pt2`` that uses the op.
"""

from __future__ import annotations

import torch

__all__ = ["rotary_embedding"]


@torch.library.custom_op("graphopt::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     interleaved: bool = False) -> torch.Tensor:
    """RoPE on ``x [B, H, S, D]`` with half-size caches ``cos``/``sin`` ``[1 or B, S, D/2]``."""
    _check_shapes(x, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, S, D/2]: broadcast over heads
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@rotary_embedding.register_fake
def _rotary_embedding_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           interleaved: bool = False) -> torch.Tensor:
    _check_shapes(x, cos, sin)
    return torch.empty_like(x)


def _check_shapes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    torch._check(x.dim() == 4, lambda: f"graphopt::rotary_embedding: x must be [B, H, S, D], got {tuple(x.shape)}")
    torch._check(cos.dim() == 3 and sin.dim() == 3,
                 lambda: f"graphopt::rotary_embedding: cos/sin must be [B, S, D/2], got {tuple(cos.shape)}")
    torch._check(cos.shape[-1] * 2 == x.shape[-1],
                 lambda: f"graphopt::rotary_embedding: cos/sin last dim {cos.shape[-1]} is not half of "
                         f"head_dim {x.shape[-1]}")


# -- ONNX translations (onnxscript, imported lazily: only lowering needs it) --------------------
def _rotary_embedding_opset23(x, cos, sin, interleaved: bool = False):
    """The standard op; ONNX Runtime wants the caches' batch equal to the input's, so a batch of 1
    is expanded (Expand broadcasts ``[1 or B, S, D/2]`` with ``[B, 1, 1]``)."""
    from onnxscript import opset23 as op

    batch = op.Shape(x, start=0, end=1)
    shape = op.Concat(batch, op.Constant(value_ints=[1, 1]), axis=0)
    return op.RotaryEmbedding(x, op.Expand(cos, shape), op.Expand(sin, shape),
                              interleaved=1 if interleaved else 0)


def _rotary_embedding_decomposed(x, cos, sin, interleaved: bool = False):
    """Below opset 23: the reference arithmetic in opset-18 ops."""
    from onnxscript import opset18 as op

    axis1 = op.Constant(value_ints=[1])
    c, s = op.Unsqueeze(cos, axis1), op.Unsqueeze(sin, axis1)
    if interleaved:
        # [B, H, S, D] -> [B, H, S, D/2, 2]: pairs on the last axis
        shape = op.Concat(op.Shape(x, start=0, end=3), op.Constant(value_ints=[-1, 2]), axis=0)
        pairs = op.Reshape(x, shape)
        x1, x2 = op.Split(pairs, axis=-1, num_outputs=2)
        x1, x2 = op.Squeeze(x1, op.Constant(value_ints=[-1])), op.Squeeze(x2, op.Constant(value_ints=[-1]))
        last = op.Constant(value_ints=[-1])
        out = op.Concat(op.Unsqueeze(op.Sub(op.Mul(x1, c), op.Mul(x2, s)), last),
                        op.Unsqueeze(op.Add(op.Mul(x2, c), op.Mul(x1, s)), last), axis=-1)
        return op.Reshape(out, op.Shape(x))
    x1, x2 = op.Split(x, axis=-1, num_outputs=2)
    return op.Concat(op.Sub(op.Mul(x1, c), op.Mul(x2, s)), op.Add(op.Mul(x2, c), op.Mul(x1, s)), axis=-1)


#: (op, onnxscript function, lowest opset): registered by the plugin's
#: ``graphopt_register_onnx_translations`` hook (graphopt_fusion/__init__.py)
ONNX_TRANSLATIONS = [
    (torch.ops.graphopt.rotary_embedding.default, _rotary_embedding_decomposed, 18),
    (torch.ops.graphopt.rotary_embedding.default, _rotary_embedding_opset23, 23),
]
