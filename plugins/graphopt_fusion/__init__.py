"""graphopt-fusion: canonical attention, norms, activations, GEMM merges and RoPE.

Fusion is what lets the backends pick fast kernels: every common way of writing attention becomes
one ``aten.scaled_dot_product_attention`` node, decomposed norms become ``aten.layer_norm`` /
``aten.rms_norm``, and the onnx backend lowers them to the standard ONNX ``Attention``,
``LayerNormalization``, ``RMSNormalization`` and ``RotaryEmbedding`` ops.

Pipeline alias ``fuse`` runs every fusion pass in order.
"""

from __future__ import annotations

from graphopt.hookspecs import hookimpl

__version__ = "0.1.0"

# Each entry: (module, class). Passes are added here as they land.
_PASSES: list[tuple[str, str]] = [
    ("fuse_attention", "FuseAttention"),
    ("fuse_norms", "FuseNorms"),
    ("fuse_activations", "FuseActivations"),
    ("merge_gemms", "MergeGemms"),
    ("fuse_rope", "FuseRope"),
    ("remove_padding", "RemovePadding"),  # opt-in: changes padded outputs to 0, so not in `fuse`
]


@hookimpl
def graphopt_register_passes(register):
    import importlib

    for module, cls in _PASSES:
        register(getattr(importlib.import_module(f"graphopt_fusion.{module}"), cls))
    # Order: attention first (it reads the raw q/k/v chains); norms and RoPE before merge-gemms
    # (neither cares, but their matches stay where the model code put them); merge-gemms before
    # fuse-activations so SwiGLU is counted on the merged gate/up split it will run as.
    register.alias("fuse", "fuse-attention,fuse-norms,fuse-rope,merge-gemms,fuse-activations")


@hookimpl
def graphopt_register_onnx_translations(register):
    from graphopt_fusion.ops import ONNX_TRANSLATIONS

    for op, function, min_opset in ONNX_TRANSLATIONS:
        register(op, function, min_opset=min_opset)
