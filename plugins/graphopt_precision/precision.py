"""precision: run the graph in fp16 or bf16, with fp32 islands for norms, softmax and reductions.

Why: TensorRT 11 builds strongly typed networks only (no FP16/BF16 builder flags: precision lives
in the graph as tensor types and casts), and the torch and ONNX Runtime CUDA targets also run
whatever dtypes the graph holds. Halving the weights halves the memory traffic of every GEMM, but
norms, softmax, reductions and ``pow``/``exp``/``rsqrt`` lose too much in 16 bits (a sum of
squares overflows fp16 at 65504; softmax of fp16 scores loses the small probabilities), so those
run in fp32 — the policy of ``torch.autocast`` and ModelOpt AutoCast, written down as a table::

    %h   = aten.embedding(%W_emb, %ids)              %h   = aten.embedding(%W_emb:f16, %ids)       f16
    %n   = aten.rms_norm(%h, [64], %g, 1e-6)     →   %h32 = aten._to_copy(%h, float32)
                                                     %n   = aten.rms_norm(%h32, [64], %g:f32, 1e-6)  f32 island
    %q   = aten.linear(%n, %Wq)                      %n16 = aten._to_copy(%n, float16)
                                                     %q   = aten.linear(%n16, %Wq:f16)               f16
    ...                                              ...
    return (%logits)                                 return (aten._to_copy(%logits16, float32))

Rules, per node (the tables below):

- LOW ops (GEMMs, attention, embedding lookups) run in the low dtype: float operands are cast to
  it, and the weights they read are stored in it (converted once, in the graph module);
- FP32 ops (norms, softmax, reductions, pow/exp/log/rsqrt) run in fp32: low-precision operands
  are cast up; the result stays fp32 until a LOW op casts it down (so a decomposed RMSNorm —
  pow → mean → add → rsqrt → mul — is one fp32 island);
- every other op keeps its operands' dtype; operands of mixed dtypes are cast to the widest
  (explicitly: a strongly typed network has no implicit promotion), and an op with a float scalar
  that the low dtype cannot hold (``masked_fill(x, m, -3.4e38)``) runs in fp32;
- explicit casts and tensor factories (``.to(float32)``, ``arange``, ``full``) keep their dtype;
- computations that do not depend on the model's data (positions, rotary tables, masks built from
  integer inputs) are left in fp32: a rotary angle of 255 × inv_freq in fp16 is off by 0.1 rad;
- graph inputs and outputs keep their dtypes (outputs are cast back), so the artifact's interface,
  the Engine and the verification inputs do not change.

Masks handed to ``scaled_dot_product_attention`` are clamped to the low dtype's lowest finite
value before the cast (``finfo(float32).min`` would become ``-inf`` and turn fully masked rows
into NaN).

Verified with the ``reference`` policy: against an fp64 run of the original graph, the error of
the low-precision graph must stay within ``3 × (error of the fp32 graph) + tol``, with ``tol`` (by
default) a fraction of the outputs' RMS: 1 % for fp16, 8 % for bf16 (its 8-bit mantissa). The
pass records the tolerance in ``ir.meta["lowering_check"]`` so the compiler checks the lowered
artifact with the same policy.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.errors import PassError, PassOptionError
from graphopt.fx import attribute, packet, replace_attribute
from graphopt.ir import GraphIR, dtype_name
from graphopt.verify import reference

log = logging.getLogger(__name__)

aten = torch.ops.aten

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: default tolerance of the reference policy, as a fraction of the outputs' RMS
RELATIVE_TOL = {"fp16": 1e-2, "bf16": 8e-2}
MULTIPLIER = 3.0
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _packets(*names: str) -> frozenset:
    """Overload packets by name, skipping any this torch does not have."""
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


# GEMMs, attention, lookups: compute in the low dtype; their weights are stored in it.
LOW_OPS = _packets("linear", "mm", "bmm", "addmm", "matmul", "baddbmm", "addbmm", "einsum",
                   "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                   "scaled_dot_product_attention", "embedding")
# Ops whose output is the model's data even when their inputs are not float (a lookup), or whose
# weight operand makes them data: the sources of the "depends on the model's data" analysis.
DATA_SOURCES = _packets("embedding", "linear", "conv1d", "conv2d", "conv3d", "convolution")
# Norms, softmax, reductions, range-sensitive pointwise ops: fp32 islands.
FP32_OPS = _packets("layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm",
                    "batch_norm", "_native_batch_norm_legit_no_training", "instance_norm",
                    "softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax",
                    "mean", "sum", "var", "var_mean", "std", "std_mean", "prod", "cumsum", "cumprod",
                    "logsumexp", "norm", "linalg_vector_norm",
                    "pow", "rsqrt", "exp", "log", "log1p", "expm1", "reciprocal")
# Explicit casts: keep the dtype the model asked for.
CAST_OPS = _packets("_to_copy", "to", "type_as")
# Tensor factories: their dtype is explicit (or the default float32).
FACTORY_OPS = _packets("arange", "full", "zeros", "ones", "empty", "scalar_tensor", "tensor", "linspace",
                       "rand", "randn", "eye", "empty_strided", "full_like", "zeros_like", "ones_like",
                       "empty_like", "rand_like", "randn_like", "new_full", "new_zeros", "new_ones",
                       "new_empty", "new_tensor")
# Ops that only move or view data: a weight reaches its GEMM through these.
VIEW_OPS = _packets("t", "transpose", "permute", "view", "reshape", "unsqueeze", "squeeze", "expand",
                    "contiguous", "slice", "select", "alias", "clone", "detach", "_unsafe_view")


@dataclass
class Options:
    dtype: Literal["fp16", "bf16"] = "fp16"
    #: absolute tolerance of the reference policy; 0 = a fraction of the outputs' RMS (1 % fp16, 8 % bf16)
    tol: float = 0.0
    #: extra ops to keep in fp32, '|'-separated ATen names (e.g. ``aten.gelu|aten.silu``)
    keep_fp32: str = ""

    def __post_init__(self):
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0 (0: automatic), got {self.tol}")


class Precision(Pass):
    """Cast the graph to fp16/bf16 with fp32 islands for norms, softmax and reductions."""

    name = "precision"
    weight_memory = 0.5  # the low-precision copy of every weight
    Options = Options
    verification = reference(tol=1e-2, multiplier=MULTIPLIER)  # replaced per run: tol from the outputs' RMS

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        low = DTYPES[self.options.dtype]
        keep = _parse_keep(self.options.keep_fp32)
        foreign = [n for n in ir.graph.nodes if n.op in ("call_module", "call_method")]
        if foreign:
            raise PassError(f"precision needs an ATen graph (a torch.export capture), but node "
                            f"{foreign[0].format_node()} calls a {foreign[0].op.replace('call_', '')}; "
                            "capture the model with torch.export (the default) rather than symbolic_trace")
        tol = self.options.tol or _auto_tol(ctx.original or ir, self.options.dtype)
        self.verification = reference(tol=tol, multiplier=MULTIPLIER)
        stats = _Rewriter(ir, low, keep).run()
        ir.recompile()
        ir.meta["precision"] = {"dtype": dtype_name(low), **stats}
        ir.meta["lowering_check"] = {"policy": "reference", "tol": tol, "multiplier": MULTIPLIER,
                                     "why": f"the graph computes in {dtype_name(low)} ({self.spec()})"}
        return PassResult(ir, stats["low_precision_ops"] + stats["weights_converted"] > 0,
                          {**stats, "tol": float(f"{tol:.3g}")})


def _parse_keep(text: str) -> frozenset:
    out = set()
    for name in (t.strip() for t in text.split("|") if t.strip()):
        short = name.removeprefix("aten.")
        if not hasattr(aten, short):
            raise PassOptionError(f"precision(keep_fp32=...): {name!r} is not an ATen op; give names such as "
                                  "aten.gelu|aten.silu")
        out.add(getattr(aten, short))
    return frozenset(out)


def _auto_tol(ir: GraphIR, dtype: str) -> float:
    """``RELATIVE_TOL[dtype]`` × the largest RMS of the original's float outputs on the example inputs."""
    rms = 0.0
    for out in ir.run():
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            rms = max(rms, float(out.double().pow(2).mean().sqrt()))
    return RELATIVE_TOL[dtype] * (rms if rms > 0 and math.isfinite(rms) else 1.0)


class _Rewriter:
    """One walk over the graph in order, deciding each node's dtype and inserting the casts."""

    def __init__(self, ir: GraphIR, low: torch.dtype, keep: frozenset):
        self.ir, self.graph, self.low, self.keep = ir, ir.graph, low, keep
        self.dtype: dict[torch.fx.Node, torch.dtype | None] = {}   # dtype of each node after the rewrite
        self.casts: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}
        self.stats = {"low_precision_ops": 0, "fp32_ops": 0, "fp32_islands": 0, "weights_converted": 0,
                      "casts": 0, "kept_fp32_no_data": 0}

    # -- analysis ---------------------------------------------------------------------------
    def data_nodes(self) -> set[torch.fx.Node]:
        """Nodes that depend on the model's data: float inputs, embedding lookups, GEMMs with weights."""
        data: set[torch.fx.Node] = set()
        for n in self.graph.nodes:
            if n.op == "placeholder" and _orig_dtype(n) in FLOATS:
                data.add(n)
            elif n.op == "call_function" and (packet(n) in DATA_SOURCES or any(a in data for a in n.all_input_nodes)):
                data.add(n)
        return data

    def weights_to_convert(self, data: set[torch.fx.Node]) -> set[str]:
        """get_attr targets read (through views) by a data-dependent LOW op."""
        targets = set()
        for n in self.graph.nodes:
            if n.op != "get_attr" or _orig_dtype(n) != torch.float32:
                continue
            frontier, seen = [n], set()
            while frontier:
                cur = frontier.pop()
                for user in cur.users:
                    if user in seen or user.op != "call_function":
                        continue
                    seen.add(user)
                    if packet(user) in LOW_OPS and user in data and packet(user) not in self.keep:
                        targets.add(n.target)
                    elif packet(user) in VIEW_OPS:
                        frontier.append(user)
        return targets

    # -- rewrite ----------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        data = self.data_nodes()
        for target in sorted(self.weights_to_convert(data)):
            _convert_attr(self.ir.graph_module, target, self.low)
            self.stats["weights_converted"] += 1
        for n in list(self.graph.nodes):
            if n.op == "placeholder":
                self.dtype[n] = _orig_dtype(n)
            elif n.op == "get_attr":
                val = attribute(self.ir.graph_module, n.target)
                self.dtype[n] = val.dtype if isinstance(val, torch.Tensor) else None
            elif n.op == "call_function":
                self.dtype[n] = self.visit(n, n in data)
            elif n.op == "output":
                self.fix_outputs(n)
        return self.stats

    def visit(self, n: torch.fx.Node, is_data: bool) -> torch.dtype | None:
        orig = _orig_dtype(n)
        op = packet(n)
        if n.target is operator.getitem:   # an item of a multi-output op (split, var_mean) has its dtype
            src = self.dtype.get(n.args[0])
            return src if orig in FLOATS and src in FLOATS else orig
        floats = [a for a in _tensor_args(n) if self.dtype.get(a) in FLOATS]
        if orig not in FLOATS:
            return orig
        if op in self.keep or op in FP32_OPS:
            if is_data:
                self.stats["fp32_ops"] += 1
            if any(self.dtype[a] != torch.float32 for a in floats):
                self.cast_args(n, torch.float32)
                self.stats["fp32_islands"] += 1
            return torch.float32
        if op in LOW_OPS:
            if not is_data:
                self.stats["kept_fp32_no_data"] += 1
                return self.promote(n, floats, orig)
            self.cast_args(n, self.low)
            self.stats["low_precision_ops"] += 1
            return self.low
        if op in CAST_OPS:
            explicit = _explicit_dtype(n)
            if explicit is not None:
                return explicit
            if op is aten.type_as and len(n.args) > 1:
                return self.dtype.get(n.args[1], orig)
            return self.dtype.get(n.args[0], orig) if n.args else orig
        if op in FACTORY_OPS:
            explicit = _explicit_dtype(n)
            if explicit is not None or not n.args or not isinstance(n.args[0], torch.fx.Node):
                return orig
            return self.dtype.get(n.args[0], orig)      # *_like / new_* follow their input
        return self.promote(n, floats, orig)

    def promote(self, n: torch.fx.Node, floats: list[torch.fx.Node], orig: torch.dtype) -> torch.dtype:
        """Keep the operands' dtype; mixed dtypes (or a scalar the low dtype cannot hold) → widest."""
        if not floats:
            return orig
        kinds = {self.dtype[a] for a in floats}
        if len(kinds) == 1:
            only = next(iter(kinds))
            if only != torch.float32 and _has_unrepresentable_scalar(n, only):
                self.cast_args(n, torch.float32)
                return torch.float32
            return only
        self.cast_args(n, torch.float32)
        return torch.float32

    def cast_args(self, n: torch.fx.Node, dtype: torch.dtype) -> None:
        """Cast every float tensor operand of ``n`` that is not ``dtype`` (in lists too)."""
        sdpa = packet(n) is aten.scaled_dot_product_attention

        def fix(a: Any, position: Any) -> Any:
            if isinstance(a, (list, tuple)):
                return type(a)(fix(x, position) for x in a)
            if not isinstance(a, torch.fx.Node) or self.dtype.get(a) not in FLOATS or self.dtype[a] == dtype:
                return a
            clamp = sdpa and position in (3, "attn_mask") and dtype != torch.float32
            return self.cast(a, dtype, before=n, clamp=clamp)

        n.args = tuple(fix(a, i) for i, a in enumerate(n.args))
        n.kwargs = {k: fix(v, k) for k, v in n.kwargs.items()}

    def cast(self, src: torch.fx.Node, dtype: torch.dtype, *, before: torch.fx.Node, clamp: bool = False) -> torch.fx.Node:
        key = (src, dtype) if not clamp else (src, (dtype, "clamped"))
        if key in self.casts:
            return self.casts[key]
        # before the first user that needs it (later users come after it in graph order)
        with self.graph.inserting_before(before):
            x = src
            if clamp:   # finfo(float32).min would become -inf: fully masked rows → NaN
                x = self.graph.call_function(aten.clamp.default, (src,), {"min": float(torch.finfo(dtype).min)})
                self.dtype[x] = self.dtype[src]
            out = self.graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})
        self.dtype[out] = dtype
        self.casts[key] = out
        self.stats["casts"] += 1
        return out

    def fix_outputs(self, out: torch.fx.Node) -> None:
        values = list(out.args[0])
        for i, v in enumerate(values):
            if isinstance(v, torch.fx.Node) and self.dtype.get(v) in FLOATS:
                want = _orig_dtype(v)
                if want in FLOATS and self.dtype[v] != want:
                    values[i] = self.cast(v, want, before=out)
        out.args = (tuple(values),) + tuple(out.args[1:])


# -- helpers --------------------------------------------------------------------------------
def _orig_dtype(n: torch.fx.Node) -> torch.dtype | None:
    """The captured dtype of ``n`` (of its first float output, for multi-output ops)."""
    val = n.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = next((v for v in val if isinstance(v, torch.Tensor) and v.dtype in FLOATS), None)
    return val.dtype if isinstance(val, torch.Tensor) else None


def _tensor_args(n: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []

    def walk(a: Any) -> None:
        if isinstance(a, torch.fx.Node):
            if _orig_dtype(a) is not None:
                out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                walk(x)

    walk(list(n.args))
    walk(list(n.kwargs.values()))
    return out


def _explicit_dtype(n: torch.fx.Node) -> torch.dtype | None:
    if isinstance(n.kwargs.get("dtype"), torch.dtype):
        return n.kwargs["dtype"]
    for a in n.args:
        if isinstance(a, torch.dtype):
            return a
    return None


def _has_unrepresentable_scalar(n: torch.fx.Node, dtype: torch.dtype) -> bool:
    limit = torch.finfo(dtype).max
    scalars = [a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, float)]
    return any(math.isfinite(s) and abs(s) > limit for s in scalars)


def _convert_attr(root: torch.nn.Module, target: str, dtype: torch.dtype) -> None:
    """Store parameter/buffer/constant ``target`` of the graph module in ``dtype`` (a new tensor)."""
    replace_attribute(root, target, attribute(root, target).detach().to(dtype))
