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


@hookimpl
def graphopt_register_passes(register):
    from graphopt_fusion.fuse_activations import FuseActivations
    from graphopt_fusion.fuse_attention import FuseAttention
    from graphopt_fusion.fuse_norms import FuseNorms
    from graphopt_fusion.fuse_rope import FuseRope
    from graphopt_fusion.merge_gemms import MergeGemms
    from graphopt_fusion.remove_padding import (
        RemovePadding,  # opt-in: changes padded outputs to 0, not in `fuse`
    )

    for pass_cls in (FuseAttention, FuseNorms, FuseActivations, MergeGemms, FuseRope, RemovePadding):
        register(pass_cls)
    # Order: attention first (it reads the raw q/k/v chains); norms and RoPE before merge-gemms
    # (neither cares, but their matches stay where the model code put them); merge-gemms before
    # fuse-activations so SwiGLU is counted on the merged gate/up split it will run as.
    register.alias("fuse", "fuse-attention,fuse-norms,fuse-rope,merge-gemms,fuse-activations")


@hookimpl
def graphopt_register_onnx_translations(register):
    from graphopt_fusion.ops import ONNX_TRANSLATIONS

    for op, function, min_opset in ONNX_TRANSLATIONS:
        register(op, function, min_opset=min_opset)
