"""Shape and dtype propagation: refresh ``node.meta["val"]`` after a pass rewrote the graph.

torch.export leaves a FakeTensor (with symbolic sizes for dynamic dims) on every node. New nodes
made by passes have none, so the pass manager re-propagates after each pass: symbolically when the
placeholders carry FakeTensors from export, concretely on the example inputs otherwise
(``torch.fx.symbolic_trace`` captures).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR

log = logging.getLogger(__name__)


def propagate_shapes(ir: GraphIR) -> None:
    placeholders = ir.placeholders()
    vals = [p.meta.get("val") for p in placeholders]
    fake_mode = next((getattr(v, "fake_mode", None) for v in vals if getattr(v, "fake_mode", None)), None)
    if fake_mode is not None and all(isinstance(v, torch.Tensor) for v in vals):
        try:
            # Parameters are real tensors; the export fake mode converts them on the fly.
            prev = fake_mode.allow_non_fake_inputs
            fake_mode.allow_non_fake_inputs = True
            try:
                FakeTensorProp(ir.graph_module, mode=fake_mode).propagate_dont_convert_inputs(*vals)
            finally:
                fake_mode.allow_non_fake_inputs = prev
            return
        except Exception as e:  # fall back to a concrete run, which always works on valid graphs
            log.debug("symbolic shape propagation failed (%s); using the example inputs", e)
    with torch.no_grad():
        ShapeProp(ir.graph_module).propagate(*ir.example_inputs)
    for n in ir.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            n.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
