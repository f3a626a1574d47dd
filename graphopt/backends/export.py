"""GraphIR → ``torch.export.ExportedProgram``, the common first step of the onnx and torch backends.

Passes rewrite ``ir.graph_module`` as a plain ``torch.fx.GraphModule``; both backends need an
``ExportedProgram`` again (the ONNX exporter translates one, ``torch.export.save`` writes one), so
the optimized graph is re-exported here with the same dynamic dims as at capture:

- one ``torch.export.Dim`` per dim label (``"batch"``, ``"seq"``): dims that carry the same label
  in the input specs must be equal at run time, and export requires them to be the same Dim;
- ``min=lo``: the declared range. torch.export may still guard a size (``batch != 1``); the
  compiler probes each dim's minimum on the lowered program and narrows the manifest's range when
  the program refuses it.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import BackendError

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR

log = logging.getLogger(__name__)


def dim_label(spec_name: str, dim: int, shape_entry: Any) -> str:
    """The label of dynamic dim ``dim`` of an input: its shape string, or ``<input>_d<dim>``."""
    if isinstance(shape_entry, str) and shape_entry:
        return shape_entry
    return f"{spec_name}_d{dim}"


def dynamic_shapes_for(ir: GraphIR) -> tuple[dict[int, torch.export.Dim] | None, ...] | None:
    """``dynamic_shapes`` for ``torch.export.export(ir.graph_module, ...)``: a tuple with one entry
    per flat input (``None`` for static inputs), or ``None`` when no input has a dynamic dim.

    Dims with the same label share one ``Dim``; its range is the intersection of the ranges given
    for that label (capture gives them all the same range)."""
    ranges: dict[str, tuple[int, int]] = {}
    for spec in ir.inputs:
        for d, (lo, hi) in spec.dynamic.items():
            label = dim_label(spec.name, d, spec.shape[d] if d < len(spec.shape) else None)
            if label in ranges:
                plo, phi = ranges[label]
                lo, hi = max(lo, plo), min(hi, phi)
                if lo > hi:
                    raise BackendError(
                        f"dynamic dim {label!r} is given disjoint ranges on different inputs (last: "
                        f"{spec.name}[{d}] in ({lo}, {hi})); give every dim with one label one range")
            ranges[label] = (int(lo), int(hi))
    if not ranges:
        return None
    dims: dict[str, torch.export.Dim | None] = {}
    for label, (lo, hi) in ranges.items():
        if hi < 2 or lo == hi:  # (0, 1) or a single size is no range for torch.export: the dim stays static
            dims[label] = None
            continue
        dims[label] = torch.export.Dim(_identifier(label), min=lo, max=hi)
    shapes: list[dict[int, torch.export.Dim] | None] = []
    for spec in ir.inputs:
        per_dim = {d: dims[dim_label(spec.name, d, spec.shape[d] if d < len(spec.shape) else None)]
                   for d in sorted(spec.dynamic)}
        per_dim = {d: dim for d, dim in per_dim.items() if dim is not None}
        shapes.append(per_dim or None)
    return tuple(shapes) if any(s is not None for s in shapes) else None


def export_program(ir: GraphIR) -> torch.export.ExportedProgram:
    """Re-export ``ir.graph_module`` on ``ir.example_inputs`` with the IR's dynamic dims.

    Raises:
        BackendError: the graph cannot be exported with those dynamic dims (a pass specialised a
            dynamic size to a constant, say), naming the failure and how to find its cause.
    """
    if len(ir.example_inputs) != len(ir.inputs):
        raise BackendError(f"the IR has {len(ir.inputs)} inputs ({', '.join(ir.input_names)}) but "
                           f"{len(ir.example_inputs)} example inputs; capture it again with every input")
    dynamic_shapes = dynamic_shapes_for(ir)
    args = tuple(ir.example_inputs)
    try:
        with torch.no_grad():
            return torch.export.export(ir.graph_module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        dyn = ", ".join(f"{s.name}{sorted(s.dynamic)}" for s in ir.inputs if s.dynamic) or "none"
        hint = ("a pass may have baked a dynamic size into the graph (a reshape to a constant, a "
                "size-dependent branch): run the pipeline with fewer passes (`graphopt bisect`) to find it, "
                "or mark fewer dims dynamic")
        if dynamic_shapes is None:
            hint = "run with GRAPHOPT_DEBUG=1 for the full traceback"
        raise BackendError(f"torch.export could not re-export the optimized graph (dynamic dims: {dyn}): "
                           f"{type(e).__name__}: {_first_lines(str(e))}\nhint: {hint}") from e


def _identifier(label: str) -> str:
    """``torch.export.Dim`` names must be Python identifiers."""
    text = re.sub(r"\W", "_", label)
    return text if text and not text[0].isdigit() else f"d_{text}"


def _first_lines(text: str, n: int = 8) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[:n]) + ("\n    ..." if len(lines) > n else "")
