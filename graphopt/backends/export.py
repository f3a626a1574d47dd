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


_DETACH = (torch.ops.aten.detach.default, torch.ops.aten.detach_.default)


class NotDirect(Exception):
    """The graph needs a re-export (:func:`export_program`); the message says why."""


def program_from_ir(ir: GraphIR) -> torch.export.ExportedProgram:
    """An ``ExportedProgram`` of ``ir.graph_module`` built without re-tracing it (module docstring).

    The graph is copied (the IR's nodes and metadata are left as they are); the weights are shared.
    ``aten.to.dtype`` (an alias torch.export's decomposition would rewrite) becomes
    ``aten._to_copy``; ``detach``/``detach_`` (autograd only) are dropped. Raises :class:`NotDirect` when the graph needs :func:`export_program`."""
    from torch.export.graph_signature import (
        InputKind,
        InputSpec,
        OutputKind,
        OutputSpec,
        TensorArgument,
    )
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch.utils._sympy.value_ranges import ValueRanges

    try:
        from torch._export.non_strict_utils import make_fake_inputs
    except ImportError as e:  # another torch layout
        raise NotDirect(f"this torch has no torch._export.non_strict_utils.make_fake_inputs ({e})") from e
    if len(ir.example_inputs) != len(ir.inputs):
        raise BackendError(f"the IR has {len(ir.inputs)} inputs ({', '.join(ir.input_names)}) but "
                           f"{len(ir.example_inputs)} example inputs; capture it again with every input")
    src = ir.graph_module
    weights: list[tuple[torch.fx.Node, torch.Tensor]] = []
    for n in src.graph.nodes:
        if n.op == "call_module":
            raise NotDirect(f"node {n.name} calls submodule {n.target}")
        if n.op == "call_function" and not isinstance(n.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) \
                and getattr(n.target, "__module__", None) not in ("_operator", "operator"):
            raise NotDirect(f"node {n.name} calls {getattr(n.target, '__name__', n.target)!r}, not an ATen op")
        if n.op == "get_attr":
            t = src
            for part in n.target.split("."):
                t = getattr(t, part)
            if not isinstance(t, torch.Tensor):
                raise NotDirect(f"node {n.name} reads {n.target}, a {type(t).__name__}")
            weights.append((n, t))

    reuse = _reusable_values(ir)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    input_specs, state_dict = [], {}
    for n, t in weights:  # lifted weights come first, as torch.export orders them
        p = graph.placeholder(f"p_{n.name}")
        env[n] = p
        parameter = isinstance(t, torch.nn.Parameter)
        input_specs.append(InputSpec(kind=InputKind.PARAMETER if parameter else InputKind.BUFFER,
                                     arg=TensorArgument(name=p.name), target=n.target,
                                     persistent=None if parameter else True))
        state_dict[n.target] = t
        if reuse is not None:
            with reuse[0]:
                p.meta["val"] = reuse[0].from_tensor(t, static_shapes=True)
    for n in ir.placeholders():
        p = graph.placeholder(n.name)
        p.meta.update({k: v for k, v in n.meta.items() if k != "val" or reuse is not None})
        env[n] = p
        input_specs.append(InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=p.name), target=None))
    output_specs = []
    for n in src.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "call_function" and n.target in _DETACH:  # no autograd here: the value itself
            env[n] = env[n.args[0]]
            continue
        new = graph.node_copy(n, lambda a: env[a])
        if reuse is None:
            new.meta.pop("val", None)
        env[n] = new
        if new.op == "call_function" and new.target is torch.ops.aten.to.dtype:
            dtype = new.args[1] if len(new.args) > 1 else new.kwargs["dtype"]
            new.target, new.args, new.kwargs = torch.ops.aten._to_copy.default, (new.args[0],), {"dtype": dtype}
        if new.op == "output":
            for a in new.args[0]:
                if not isinstance(a, torch.fx.Node):
                    raise NotDirect(f"the graph returns a constant ({a!r})")
                output_specs.append(OutputSpec(kind=OutputKind.USER_OUTPUT, arg=TensorArgument(name=a.name),
                                               target=None))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    if reuse is not None:
        return _program(gm, ir, input_specs, output_specs, state_dict, reuse[1])

    dynamic_shapes = dynamic_shapes_for(ir)
    try:
        fake_mode, fake_args, _, equalities, signature, _ = make_fake_inputs(src, tuple(ir.example_inputs), {},
                                                                             dynamic_shapes)
        with fake_mode:
            fake_weights = [fake_mode.from_tensor(t, static_shapes=True) for _, t in weights]
        fake_mode.cache_enabled = False  # see fake_tensor_cache_off; torch.onnx's reruns use this mode too
        with torch.no_grad():
            FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*fake_weights, *fake_args)
    except Exception as e:  # noqa: BLE001 - the re-export reports what is really wrong, if anything
        raise NotDirect(f"symbolic shape propagation failed: {type(e).__name__}: {_first_lines(str(e), 2)}") from e
    if dynamic_shapes is not None:
        # what torch.export checks after its trace: did the graph specialise or narrow a dim that
        # was declared dynamic (a reshape to a constant size, say)?
        from torch._export.non_strict_utils import produce_guards_and_solve_constraints

        try:
            produce_guards_and_solve_constraints(fake_mode, gm, dynamic_shapes, equalities, signature)
        except Exception as e:  # noqa: BLE001 - ConstraintViolationError and friends
            raise NotDirect(f"the graph does not hold for the declared dynamic dims: {_first_lines(str(e), 2)}") from e
    ranges: dict[Any, ValueRanges] = {}
    for spec, fake in zip(ir.inputs, fake_args):
        for d, (lo, hi) in spec.dynamic.items():
            size = fake.shape[d]
            if isinstance(size, torch.SymInt) and not size.node.expr.is_number:
                ranges[size.node.expr] = ValueRanges(int(lo), int(hi))
    return _program(gm, ir, input_specs, output_specs, state_dict, ranges)


def _program(gm, ir: GraphIR, input_specs: list, output_specs: list, state_dict: dict, ranges: dict):
    import torch.utils._pytree as pytree
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import ExportGraphSignature

    call = ModuleCallSignature(inputs=[], outputs=[], in_spec=pytree.tree_flatten((tuple(ir.example_inputs), {}))[1],
                               out_spec=pytree.tree_flatten(tuple(range(len(output_specs))))[1])
    try:
        return torch.export.ExportedProgram(
            root=gm, graph=gm.graph, graph_signature=ExportGraphSignature(input_specs, output_specs),
            state_dict=state_dict, range_constraints=ranges, module_call_graph=[ModuleCallEntry("", call)])
    except Exception as e:  # noqa: BLE001 - torch's verifier refused the graph as built
        raise NotDirect(f"torch refused the program: {type(e).__name__}: {_first_lines(str(e), 2)}") from e


def _reusable_values(ir: GraphIR) -> tuple[Any, dict] | None:
    """``(fake_mode, range_constraints)`` when the program can take the IR's own ``val``s (every
    node carries one from graphopt's symbolic propagation in the capture's shape environment, the
    kv-cache pass's inputs included) instead of a new propagation in a new environment, which costs
    ~10 ms a node on a real-size graph (8 s of a 0.5B model's lowering). Only when each declared
    dynamic dim is still a free symbol whose range covers the declared one, one symbol per label
    (no pass specialised, narrowed or merged a dim); ``None`` otherwise (the propagation then
    finds and reports what is wrong)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._sympy.value_ranges import ValueRanges

    placeholders = ir.placeholders()
    vals = [p.meta.get("val") for p in placeholders]
    if not vals or not all(isinstance(v, FakeTensor) for v in vals):
        return None
    mode = vals[0].fake_mode
    env = mode.shape_env
    if env is None or any(v.fake_mode is not mode for v in vals):
        return None
    from graphopt.capture import _shape_facts

    if ir.meta.get("capture_shape_facts") != _shape_facts(env):
        return None  # a pass's propagation added a guard or assertion: let a new propagation judge it
    for n in ir.graph.nodes:
        if n.op == "call_function" and "val" not in n.meta:
            return None
    symbols: dict[str, Any] = {}
    ranges: dict[Any, ValueRanges] = {}
    for spec, val in zip(ir.inputs, vals):
        for d, (lo, hi) in spec.dynamic.items():
            if d >= val.dim():
                return None
            size = val.shape[d]
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is None or not expr.is_Symbol or expr in env.replacements:
                return None
            label = dim_label(spec.name, d, spec.shape[d] if d < len(spec.shape) else None)
            if symbols.setdefault(label, expr) != expr or list(symbols.values()).count(expr) > 1:
                return None
            vr = env.var_to_range.get(expr)
            # torch.export assumes sizes 0 and 1 behave like the others (its backed symbols start
            # at 2) and still declares the user's minimum; the lowering check probes the minimum
            if vr is None or not (vr.lower <= max(lo, 2) and vr.upper >= hi):
                return None
            ranges[expr] = ValueRanges(int(lo), int(hi))
    return mode, ranges


def _identifier(label: str) -> str:
    """``torch.export.Dim`` names must be Python identifiers."""
    text = re.sub(r"\W", "_", label)
    return text if text and not text[0].isdigit() else f"d_{text}"


def _first_lines(text: str, n: int = 8) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[:n]) + ("\n    ..." if len(lines) > n else "")
