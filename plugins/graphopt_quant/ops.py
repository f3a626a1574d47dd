"""Custom ops that carry quantization through the graph until lowering.

Two ops, each the exact numerics of an ONNX ``QuantizeLinear``/``DequantizeLinear`` pattern, so
that every target runs the same arithmetic (torch runs the reference implementations below; the
onnx target emits the standard ops, which ONNX Runtime fuses into its integer kernels and TensorRT
reads as explicit quantization):

``graphopt::quantize_dequantize(x, scale: float, dtype: str) -> Tensor``
    fake quantization of an activation, per tensor, symmetric (zero point 0):
    ``int8``: ``clamp(round_half_even(x / scale), -128, 127) * scale`` →
    ``DequantizeLinear(QuantizeLinear(x, scale, zp), scale, zp)``;
    ``float8_e4m3fn``: ``float(fp8(clamp(x / scale, ±448))) * scale`` (saturating, as ONNX's
    ``saturate=1``).

``graphopt::dequantize_linear(q: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor``
    a quantized weight stored as int8 (values of int4 weights lie in [-8, 7]) or fp8:
    per channel (``block_size == 0``, ``scale`` 1-D along ``axis``) or block-wise
    (``block_size`` > 0: ``scale`` has ``ceil(q.shape[axis] / block_size)`` rows along ``axis``)
    → ``DequantizeLinear(q, scale, axis=axis[, block_size=...])`` (blocked from opset 21).

Zero points are always 0 (TensorRT's explicit-quantization rule); scales are > 0 (the observers
never produce 0). Importing this module registers the ops with torch; the plugin registers their ONNX translations
(:data:`ONNX_TRANSLATIONS`) through its hook.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_linear", "quantize_dequantize", "DTYPES"]

#: activation dtype name → (qmin, qmax)
#: ``uint8`` is int8's numerics encoded with zero point 128 (ONNX Runtime's fast x86 path, u8s8);
#: ``int8`` keeps zero point 0 (TensorRT's rule).
DTYPES = {"int8": (-128.0, 127.0), "uint8": (-128.0, 127.0), "float8_e4m3fn": (-448.0, 448.0)}


@torch.library.custom_op("graphopt::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: float, dtype: str) -> torch.Tensor:
    """Symmetric per-tensor fake quantization of ``x`` to ``dtype`` (``int8`` or ``float8_e4m3fn``)."""
    if dtype in ("int8", "uint8"):
        return torch.clamp(torch.round(x / scale), -128.0, 127.0) * scale
    if dtype == "float8_e4m3fn":
        return torch.clamp(x / scale, -448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype) * scale
    raise ValueError(f"graphopt::quantize_dequantize: dtype {dtype!r} is not one of {sorted(DTYPES)}")


@quantize_dequantize.register_fake
def _qdq_fake(x: torch.Tensor, scale: float, dtype: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("graphopt::dequantize_linear", mutates_args=())
def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """``q * scale`` with ``scale`` broadcast along ``axis`` (per channel) or over blocks.

    One float tensor of ``q``'s size is allocated and scaled in place, block by block through a
    view (no expanded copy of ``scale``, no second product tensor): on a tied 1B lm_head the
    expanded scale and the product were 2 GiB of transient memory."""
    out = q.to(scale.dtype)
    axis = axis % q.dim()
    if block_size <= 0:
        shape = [1] * q.dim()
        shape[axis] = q.shape[axis]
        return out.mul_(scale.reshape(shape))
    n = q.shape[axis]
    whole = n // block_size
    if whole:
        head = out.narrow(axis, 0, whole * block_size)
        split = list(head.shape[:axis]) + [whole, block_size] + list(head.shape[axis + 1:])
        head.view(split).mul_(scale.narrow(axis, 0, whole).unsqueeze(axis + 1))
    if n > whole * block_size:  # a last, shorter block
        out.narrow(axis, whole * block_size, n - whole * block_size).mul_(scale.narrow(axis, whole, 1))
    return out


@dequantize_linear.register_fake
def _dq_fake(q: torch.Tensor, scale: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


# -- ONNX translations (onnxscript, used by the onnx target) -------------------------------------
def _qdq_onnx(x, scale: float, dtype: str):
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset19 as op

    s = op.CastLike(op.Constant(value=ir.tensor(np.array(scale, dtype=np.float32))), x)
    if dtype == "float8_e4m3fn":
        import ml_dtypes

        zp = op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn), dtype=ir.DataType.FLOAT8E4M3FN))
    elif dtype == "uint8":
        zp = op.Constant(value=ir.tensor(np.array(128, dtype=np.uint8)))
    else:
        zp = op.Constant(value=ir.tensor(np.zeros((), dtype=np.int8)))
    return op.DequantizeLinear(op.QuantizeLinear(x, s, zp), s, zp)


def _dq_onnx_opset21(q, scale, axis: int, block_size: int):
    from onnxscript import opset21 as op

    if block_size > 0:
        return op.DequantizeLinear(q, scale, axis=axis, block_size=block_size)
    return op.DequantizeLinear(q, scale, axis=axis)


#: (op, onnxscript function, lowest opset): registered by the plugin's
#: ``graphopt_register_onnx_translations`` hook (graphopt_quant/__init__.py). Block-wise
#: DequantizeLinear (int4 weights) exists from opset 21: graphs with such weights get >= 21.
ONNX_TRANSLATIONS = [
    (torch.ops.graphopt.quantize_dequantize.default, _qdq_onnx, 19),
    (torch.ops.graphopt.dequantize_linear.default, _dq_onnx_opset21, 21),
]
