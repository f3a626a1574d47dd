"""GraphIR: a torch.fx GraphModule plus everything a compiler needs to know around it.

The graph is normalised at capture: placeholders are the model's tensor inputs in order and the
output node returns a flat tuple of tensors. What the user passed and got back (positional or
keyword inputs; a tensor, tuple, dict or ``ModelOutput``) lives beside the graph as
:class:`TensorSpec` lists and a JSON structure (see :mod:`graphopt.ir.structure`), so passes see a
plain dataflow graph and artifacts can still hand users their original output structure.

Every node carries ``node.meta["graphopt_provenance"]``: ``"capture"`` or the name of the pass
that created it (stamped by the pass manager), shown by :meth:`GraphIR.format`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx

from graphopt.ir import structure as _structure

log = logging.getLogger(__name__)

PROVENANCE = "graphopt_provenance"

_DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
    torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _name
        _DTYPES[_name] = getattr(torch, _name)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass
class TensorSpec:
    """One graph input or output: name, dtype, shape (ints, or a string for a symbolic dim) and the
    dynamic range of each dynamic dim."""

    name: str
    dtype: str
    shape: list[int | str]
    dynamic: dict[int, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dynamic": {str(k): list(v) for k, v in self.dynamic.items()}}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], list(d["shape"]),
                   {int(k): (int(v[0]), int(v[1])) for k, v in d.get("dynamic", {}).items()})

    def __str__(self) -> str:
        dims = ",".join(str(s) for s in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def node_shape(node: torch.fx.Node) -> list[int | str] | None:
    """The node's output shape from its FakeTensor meta (``None`` if unknown or not a tensor)."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(val, torch.Tensor):
        return [int(s) if not isinstance(s, torch.SymInt) else str(s) for s in val.shape]
    if hasattr(val, "shape") and hasattr(val, "dtype"):  # TensorMetadata from ShapeProp
        return [int(s) if not isinstance(s, torch.SymInt) else str(s) for s in val.shape]
    return None


def node_dtype(node: torch.fx.Node) -> torch.dtype | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return getattr(val, "dtype", None)


class NamedIO:
    """What has ``inputs`` and ``outputs`` as :class:`TensorSpec` lists (a graph, a loaded engine):
    their names, in order."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


class GraphIR(NamedIO):
    """A captured model: ``graph_module`` (flat tensors in, flat tuple out) plus its interface.

    Attributes:
        graph_module: the ``torch.fx.GraphModule`` passes rewrite.
        inputs / outputs: :class:`TensorSpec` per placeholder / output leaf, in order.
        call_convention: ``"positional"`` or ``"keyword"`` - how the user passed example inputs.
        out_structure: JSON structure that rebuilds the user's outputs from the flat leaves.
        example_inputs: flat list of example tensors, one per input.
        meta: free-form facts (capture method, model class, ...), copied into the manifest.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], *, call_convention: str = "positional",
                 out_structure: dict | None = None, example_inputs: list[torch.Tensor] | None = None,
                 meta: dict | None = None):
        self.graph_module = graph_module
        self.inputs = inputs
        self.outputs = outputs
        self.call_convention = call_convention
        self.out_structure = out_structure or {
            "type": "tuple", "items": [{"type": "tensor", "index": i, "name": o.name}
                                       for i, o in enumerate(outputs)]}
        self.example_inputs = list(example_inputs or [])
        self.meta = dict(meta or {})
        #: the user's own example inputs when capture widened a size-1 dynamic dim (they are
        #: verified too); ``None`` otherwise
        self.user_example_inputs: list[torch.Tensor] | None = None
        #: the model's own outputs on ``example_inputs`` (flat, in output order) when capture ran
        #: it eagerly, else ``None``; set by capture and not carried by :meth:`copy` (a copy may be
        #: rewritten): ``compile`` saves them as the artifact's expected outputs
        self.captured_outputs: list[torch.Tensor] | None = None

    # -- views ---------------------------------------------------------------------------
    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def dynamic(self) -> dict[str, dict[int, tuple[int, int]]]:
        return {s.name: dict(s.dynamic) for s in self.inputs if s.dynamic}

    def placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def output_node(self) -> torch.fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def output_values(self) -> list[torch.fx.Node]:
        return list(self.output_node().args[0])

    def call_nodes(self) -> list[torch.fx.Node]:
        return [n for n in self.graph.nodes if n.op in ("call_function", "call_method", "call_module")]

    def node_count(self) -> int:
        """Compute nodes (calls), the figure passes are judged by."""
        return len(self.call_nodes())

    def param_count(self) -> int:
        return sum(t.numel() for t in self.graph_module.state_dict().values())

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.call_nodes():
            key = op_name(n)
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    # -- running -------------------------------------------------------------------------
    def run(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run the graph eagerly on flat inputs (default: the example inputs); flat outputs."""
        with torch.no_grad():
            out = self.graph_module(*(self.example_inputs if inputs is None else inputs))
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def structured(self, flat_outputs: list[Any]) -> Any:
        """Rebuild the user's output structure (dicts for ModelOutputs) from flat outputs."""
        return _structure.unflatten(self.out_structure, flat_outputs)

    # -- rewriting helpers ---------------------------------------------------------------
    def copy(self) -> GraphIR:
        """A copy whose graph, modules and metadata are new but whose weights are SHARED.

        Passes may rewrite the copy's graph freely; a pass that changes a weight puts a new tensor
        in its place (``setattr`` / ``register_buffer``), which the original never sees, and never
        writes into an existing tensor (copy-on-write: tests/test_shared_weights.py checks every
        built-in pass). So a snapshot costs the graph, not the weights: a 1B-parameter model is
        not duplicated for verification."""
        gm = copy_graph_module(self.graph_module)
        return GraphIR(gm, copy.deepcopy(self.inputs), copy.deepcopy(self.outputs),
                       call_convention=self.call_convention,
                       out_structure=copy.deepcopy(self.out_structure),
                       example_inputs=self.example_inputs, meta=copy.deepcopy(self.meta))

    def recompile(self) -> GraphIR:
        """Lint, drop unused parameters/submodules, regenerate code. Returns self (fluent)."""
        self.graph.lint()
        _delete_unused_attributes(self.graph_module)
        self.graph_module.recompile()
        return self

    def propagate_shapes(self, dirty: set | None = None, rewired: dict | None = None) -> GraphIR:
        """Re-derive ``node.meta["val"]`` for every node (FakeTensor propagation, symbolic where the
        placeholders are symbolic), or only for the ``dirty`` nodes (ids of the nodes a pass made or
        changed) and what their new shapes reach; ``rewired`` nodes (same op, other input nodes) only
        if their inputs' shapes changed. Falls back to a concrete run on the example inputs."""
        from graphopt.ir.shapes import propagate_shapes

        propagate_shapes(self, dirty, rewired)
        return self

    def nx(self) -> nx.DiGraph:
        """A networkx view: one node per fx node (by name), an edge per use. Attributes: op, target,
        shape, dtype, provenance. Read-only: rewriting happens on the fx graph."""
        g = nx.DiGraph()
        for n in self.graph.nodes:
            g.add_node(n.name, op=n.op, target=op_name(n), shape=node_shape(n),
                       dtype=dtype_name(node_dtype(n)) if node_dtype(n) is not None else None,
                       provenance=n.meta.get(PROVENANCE, "capture"))
            for inp in n.all_input_nodes:
                g.add_edge(inp.name, n.name)
        return g

    # -- printing ------------------------------------------------------------------------
    def format(self, *, provenance: bool = True) -> str:
        """Readable listing: one line per node with shape, dtype and the pass that made it."""
        lines = ["graph(" + ", ".join(str(s) for s in self.inputs) + "):"]
        for n in self.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                lines.append("  return (" + ", ".join(_ref(a) for a in self.output_values()) + ")")
                continue
            shape = node_shape(n)
            dt = node_dtype(n)
            ty = f"{_short_dtype(dt)}[{','.join(str(s) for s in shape)}]" if shape is not None else "?"
            args = ", ".join(_fmt_arg(a) for a in n.args)
            if n.kwargs:
                args += (", " if args else "") + ", ".join(f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items())
            line = f"  %{n.name}: {ty} = {op_name(n)}({args})"
            if n.op == "get_attr":
                line = f"  %{n.name}: {ty} = get_attr[{n.target}]"
            prov = n.meta.get(PROVENANCE, "capture")
            if provenance and prov != "capture":
                line += f"  # {prov}"
            lines.append(line)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return (f"GraphIR(inputs=[{', '.join(map(str, self.inputs))}], outputs={self.output_names}, "
                f"nodes={self.node_count()})")


def shared_tensors(root: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Every parameter, buffer and plain tensor attribute of ``root``'s module tree, by ``id``."""
    found: dict[int, torch.Tensor] = {}
    for mod in root.modules():
        values = list(mod._parameters.values()) + list(mod._buffers.values())  # noqa: SLF001 - no public view keeps non-persistent/None entries
        values += [v for v in vars(mod).values() if isinstance(v, torch.Tensor)]
        for t in values:
            if isinstance(t, torch.Tensor):
                found[id(t)] = t
    return found


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``copy.deepcopy(gm)`` except for tensors: parameters, buffers and tensor constants are the
    same objects in the copy (seeded into deepcopy's memo), the graph, node metadata and the module
    tree are new. Rewrite the copy by replacing tensors, never by writing into them."""
    return copy.deepcopy(gm, dict(shared_tensors(gm)))


def op_name(n: torch.fx.Node) -> str:
    """``aten.linear``, ``graphopt.attention``, a method or module name: what a node computes."""
    if n.op == "call_function":
        t = n.target
        if isinstance(t, torch._ops.OpOverload):  # noqa: SLF001 - public type, private module path
            return f"{t.namespace}.{t._opname}" if hasattr(t, "_opname") else str(t)
        return getattr(t, "__name__", str(t))
    if n.op in ("call_method", "call_module", "get_attr"):
        return str(n.target)
    return n.op


def _short_dtype(dt: torch.dtype | None) -> str:
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
             "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "b8"}
    return short.get(dtype_name(dt), dtype_name(dt)) if dt is not None else "?"


def _ref(a: Any) -> str:
    return f"%{a.name}" if isinstance(a, torch.fx.Node) else repr(a)


def _fmt_arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return repr(a) if len(repr(a)) <= 12 else f"{a:.6g}"
    return repr(a) if not isinstance(a, torch.dtype) else dtype_name(a)


def _delete_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Drop parameters, buffers and submodules no get_attr/call_module node refers to any more."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    used_prefixes = set()
    for t in used:
        parts = str(t).split(".")
        for i in range(1, len(parts) + 1):
            used_prefixes.add(".".join(parts[:i]))
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        # a call_module node uses every parameter of its submodule (symbolic_trace graphs)
        parts = name.split(".")
        if name not in used_prefixes and not any(".".join(parts[:i]) in used for i in range(1, len(parts))):
            _delattr_path(gm, name)
    for attr in list(vars(gm).keys()):
        # plain tensor constants (torch.export lifts some as attributes, not buffers)
        if isinstance(getattr(gm, attr, None), torch.Tensor) and attr not in used_prefixes and not attr.startswith("_"):
            delattr(gm, attr)
    gm.delete_all_unused_submodules()


def _delattr_path(root: torch.nn.Module, path: str) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        mod = getattr(mod, p, None)
        if mod is None:
            return
    if hasattr(mod, leaf):
        delattr(mod, leaf)
