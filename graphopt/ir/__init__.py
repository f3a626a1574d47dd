"""The IR: GraphIR over a torch.fx GraphModule, specs, shapes, analyses, printing."""

from graphopt.ir.graph_ir import (
    PROVENANCE,
    GraphIR,
    TensorSpec,
    copy_graph_module,
    dtype_from_name,
    dtype_name,
    node_dtype,
    node_shape,
    op_name,
)

__all__ = ["PROVENANCE", "GraphIR", "TensorSpec", "copy_graph_module", "dtype_from_name", "dtype_name", "node_dtype", "node_shape", "op_name"]
