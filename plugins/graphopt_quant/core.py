"""What calibrate and quantize share: finding the linears, observing them, quantizing weights,
simulating a quantization plan and rewriting the graph with it.

A *plan* maps a linear's name to a :class:`LayerPlan` (its scheme and scales). Simulation runs the
ORIGINAL fx graph through an interpreter that computes the planned linears with the quantized
numerics (exactly the custom ops' arithmetic), so the accuracy guard can try many plans without
rewriting the graph each time; :func:`rewrite` then applies the chosen plan once.

Rewrite of one W8A8 linear (weights pre-transposed so the ONNX MatMul reads the DequantizeLinear
directly — the pattern ONNX Runtime fuses into its integer GEMM, and TensorRT's explicit
quantization expects)::

    %y = aten.linear(%x, %w, %b)   →   %xq = graphopt.quantize_dequantize(%x, s_x, "int8")
                                       %wq = get_attr[..._qweight]            # int8 [in, out]
                                       %wd = graphopt.dequantize_linear(%wq, %ws, 1, 0)
                                       %y  = aten.add(aten.matmul(%xq, %wd), %b)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from graphopt.fx import attribute, replace_attribute
from graphopt.ir import GraphIR
from graphopt_quant import ops
from graphopt_quant.observers import Observer

aten = torch.ops.aten
QDQ = torch.ops.graphopt.quantize_dequantize.default
DQ = torch.ops.graphopt.dequantize_linear.default

#: scheme → (activation dtype or None, weight format)
SCHEMES: dict[str, tuple[str | None, str]] = {
    "w8a8": ("int8", "int8"),
    "smoothquant": ("int8", "int8"),
    "fp8": ("float8_e4m3fn", "float8_e4m3fn"),
    "int8-weight": (None, "int8"),
    "int4-weight": (None, "int4"),
}
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "int4": 7.0}
#: Default skip list: layers kept in float (embeddings and norms are never linears here).
DEFAULT_SKIP = ("*lm_head*", "*embed*", "*norm*")


@dataclass
class Linear:
    node: torch.fx.Node
    name: str
    weight_attr: str
    bias: Any
    x: torch.fx.Node


@dataclass
class LayerPlan:
    scheme: str
    act_scale: float | None = None
    smooth: torch.Tensor | None = None   # SmoothQuant: x / smooth, W * smooth (per input channel)
    block_size: int = 0
    act_encoding: str = ""               # "uint8": int8 numerics encoded with zero point 128 in ONNX
    reduce_range: bool = False           # int8 weights in [-64, 63] (x86 AVX2 u8s8 kernels saturate otherwise)
    observer: str = ""                   # observer=auto: the one chosen for this layer


@dataclass
class Stats:
    """Per-linear observations: the per-tensor |x| observer and the per-channel |x| maximum."""

    observer: Observer = field(default_factory=Observer)
    channel_absmax: torch.Tensor | None = None


def find_linears(ir: GraphIR) -> list[Linear]:
    """Every ``aten.linear`` whose weight is a 2-D ``get_attr`` constant."""
    out = []
    for n in ir.graph.nodes:
        if n.op != "call_function" or n.target is not aten.linear.default:
            continue
        w = n.args[1]
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        wt = attribute(ir.graph_module, w.target)
        if not isinstance(wt, torch.Tensor) or wt.dim() != 2 or not wt.is_floating_point():
            continue
        bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        name = w.target.removesuffix(".weight").removesuffix("_weight")
        out.append(Linear(n, name, w.target, bias, n.args[0]))
    return out


def is_lm_head(ir: GraphIR, lin: Linear) -> bool:
    """Named lm_head, tied to an embedding table, or the linear whose output is a graph output
    over a vocabulary (a decoder's logits)."""
    if "lm_head" in lin.name:
        return True
    w = lin.node.args[1]
    if any(u.target is aten.embedding.default for u in w.users):
        return True
    return lin.node in ir.output_values() and len(ir.output_values()) == 1 and \
        attribute(ir.graph_module, lin.weight_attr).shape[0] > 4 * attribute(ir.graph_module, lin.weight_attr).shape[1]


def select(ir: GraphIR, linears: list[Linear], skip: Sequence[str], include: Sequence[str],
           lm_head: bool = False) -> tuple[list[Linear], list[str]]:
    """Linears to quantize and the names skipped: :data:`DEFAULT_SKIP` and the user's ``skip``
    patterns, and the lm_head unless ``lm_head`` (a tied lm_head is named after its embedding
    table, which the default patterns skip: it is kept out of them); ``include`` patterns win."""
    chosen, skipped = [], []
    for lin in linears:
        forced = any(fnmatch.fnmatch(lin.name, p) for p in include)
        head = is_lm_head(ir, lin)
        drop = any(fnmatch.fnmatch(lin.name, p) for p in skip) or (
            not lm_head if head else any(fnmatch.fnmatch(lin.name, p) for p in DEFAULT_SKIP))
        (skipped.append(lin.name) if drop and not forced else chosen.append(lin))
    return chosen, skipped


# -- observation ---------------------------------------------------------------------------------
class _Tap(torch.fx.Interpreter):
    """Runs the graph and hands the input activation of each watched linear to ``fn``."""

    def __init__(self, gm: torch.fx.GraphModule, watched: dict[torch.fx.Node, str], fn: Callable):
        super().__init__(gm)
        self.watched, self.fn = watched, fn

    def run_node(self, n: torch.fx.Node) -> Any:
        if n in self.watched:
            self.fn(self.watched[n], self.env[n.args[0]])
        return super().run_node(n)


def observe(ir: GraphIR, sets: list[list[torch.Tensor]], linears: list[Linear], *, histogram: bool,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Stats]:
    """Per-linear statistics over ``sets``: pass 1 the maxima, pass 2 (if ``histogram``) the
    histograms over [0, max]."""
    watched = {lin.node: lin.name for lin in linears}
    stats = {lin.name: Stats() for lin in linears}

    def first(name: str, x: torch.Tensor) -> None:
        st = stats[name]
        st.observer.update_max(x)
        cm = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double()
        st.channel_absmax = cm if st.channel_absmax is None else torch.maximum(st.channel_absmax, cm)

    def second(name: str, x: torch.Tensor) -> None:
        stats[name].observer.update_hist(x)

    passes = [first, second] if histogram else [first]
    total, done = len(sets) * len(passes), 0
    with torch.no_grad():
        for fn in passes:
            tap = _Tap(ir.graph_module, watched, fn)
            for flat in sets:
                tap.run(*flat)
                done += 1
                if progress:
                    progress(done, total)
    return stats


# -- weights --------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, fmt: str, block_size: int = 0,
                    reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``w [out, in]`` → ``(q [in, out], scale, axis, block_size)`` for ``dequantize_linear``:
    int8 / fp8 per output channel (axis 1 of the transposed weight), int4 in blocks of
    ``block_size`` input channels (axis 0), symmetric, zero point 0. ``reduce_range``: int8 weights
    use 7 bits ([-64, 63]) so that u8 x s8 pair sums fit int16 (x86 AVX2 kernels without VNNI).

    Output channels are independent, so they are quantized in chunks of about 64 MiB of float
    values: a 1 GiB lm_head no longer needs its transposed copy, padded copy, expanded scales and
    quotient (4 GiB) at once."""
    n_out, k = w.shape
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    q = torch.empty(k, n_out, dtype=torch.float8_e4m3fn if fmt == "float8_e4m3fn" else torch.int8)
    scales = []
    with torch.no_grad():
        for r0 in range(0, n_out, step):
            qc, sc = _quantize_columns(w[r0:r0 + step].detach().t().contiguous().float(), fmt, block_size, reduce_range)
            q[:, r0:r0 + step] = qc
            scales.append(sc)
    scale = torch.cat(scales, dim=-1)  # int4 [blocks, N], per channel [N]
    return (q, scale, 0, block_size) if fmt == "int4" else (q, scale, 1, 0)


_CHUNK_ELEMENTS = 16 << 20


def _quantize_columns(wt: torch.Tensor, fmt: str, block_size: int, reduce_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``wt [K, n]`` (columns = output channels) → quantized values and their scales."""
    if fmt == "int4":
        k, n = wt.shape
        nb = math.ceil(k / block_size)
        pad = nb * block_size - k
        wp = torch.cat([wt, wt.new_zeros(pad, n)]) if pad else wt
        amax = wp.reshape(nb, block_size, n).abs().amax(1)  # [nb, n]
        scale = torch.where(amax > 0, amax / QMAX["int4"], torch.ones_like(amax))
        q = torch.clamp(torch.round(wt / scale.repeat_interleave(block_size, 0)[:k]), -8, 7).to(torch.int8)
        return q, scale
    amax = wt.abs().amax(0)  # [n]
    qmax = 63.0 if (fmt == "int8" and reduce_range) else QMAX[fmt]
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    if fmt == "int8":
        return torch.clamp(torch.round(wt / scale), -qmax - 1, qmax).to(torch.int8), scale
    return torch.clamp(wt / scale, -448, 448).to(torch.float8_e4m3fn), scale


def weight_format(scheme: str) -> str:
    return SCHEMES[scheme][1]


def act_dtype(scheme: str) -> str | None:
    return SCHEMES[scheme][0]


def quantized_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: LayerPlan) -> torch.Tensor:
    """The planned numerics of one linear (what the rewritten graph computes)."""
    if plan.smooth is not None:
        x = x / plan.smooth.to(x.dtype)
        w = w * plan.smooth.to(w.dtype)
    adt = act_dtype(plan.scheme)
    if adt is not None:
        x = ops.quantize_dequantize(x, plan.act_scale, adt)
    q, s, axis, bs = quantize_weight(w, weight_format(plan.scheme), plan.block_size, plan.reduce_range)
    wd = ops.dequantize_linear(q, s, axis, bs)
    y = torch.matmul(x, wd.to(x.dtype))
    return y + b if b is not None else y


class _Simulate(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, plans: dict[torch.fx.Node, LayerPlan]):
        super().__init__(gm)
        self.plans = plans

    def run_node(self, n: torch.fx.Node) -> Any:
        plan = self.plans.get(n)
        if plan is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return quantized_linear(args[0], args[1], bias, plan)


def simulate(ir: GraphIR, sets: list[list[torch.Tensor]], plans: dict[torch.fx.Node, LayerPlan]) -> list[list[torch.Tensor]]:
    """Outputs of ``ir`` on every set with the planned linears quantized."""
    sim = _Simulate(ir.graph_module, plans)
    with torch.no_grad():
        outs = []
        for flat in sets:
            o = sim.run(*flat)
            outs.append(list(o) if isinstance(o, (tuple, list)) else [o])
        return outs


def layer_inputs(ir: GraphIR, flat: list[torch.Tensor], linears: list[Linear]) -> dict[str, torch.Tensor]:
    """The input activation of every linear in ``linears`` on one input set (one graph run)."""
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        _Tap(ir.graph_module, {lin.node: lin.name for lin in linears}, lambda n, x: got.setdefault(n, x)).run(*flat)
    return got


def layer_sqnr(ir: GraphIR, x: torch.Tensor, lin: Linear, plan: LayerPlan) -> float:
    """SQNR (dB) of one linear's output, quantized vs float, on its real input activation ``x``."""
    w = attribute(ir.graph_module, lin.weight_attr)
    b = attribute(ir.graph_module, lin.bias.target) if isinstance(lin.bias, torch.fx.Node) and lin.bias.op == "get_attr" else None
    with torch.no_grad():
        ref = F.linear(x, w, b).double()
        q = quantized_linear(x, w, b, plan).double()
    noise = float(((ref - q) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref ** 2).sum()) / noise)


# -- rewriting ---------------------------------------------------------------------------------------
def rewrite(ir: GraphIR, plans: dict[str, LayerPlan], should_rewrite: Callable[[str], bool]) -> int:
    """Apply ``plans`` (by linear name) to ``ir``; returns the number of linears rewritten."""
    gm, graph = ir.graph_module, ir.graph
    by_name = {lin.name: lin for lin in find_linears(ir)}
    qdq_cache: dict[tuple, torch.fx.Node] = {}
    done = 0
    for name, plan in plans.items():
        lin = by_name.get(name)
        if lin is None or not should_rewrite(f"quantize {name} ({plan.scheme})"):
            continue
        w = attribute(gm, lin.weight_attr)
        tag = _unique(gm, name.replace(".", "_"))
        with graph.inserting_before(lin.node):
            x = lin.x
            if plan.smooth is not None:
                skey = (x, id(plan.smooth))
                if skey not in qdq_cache:
                    gm.register_buffer(f"{tag}_smooth_inv", (1.0 / plan.smooth).to(w.dtype))
                    qdq_cache[skey] = graph.call_function(aten.mul.Tensor, (x, graph.get_attr(f"{tag}_smooth_inv")))
                x = qdq_cache[skey]
                w = w * plan.smooth.to(w.dtype)
            adt = act_dtype(plan.scheme)
            if adt is not None:
                adt = plan.act_encoding or adt
                key = (x, plan.act_scale, adt)
                if key not in qdq_cache:
                    qdq_cache[key] = graph.call_function(QDQ, (x, float(plan.act_scale), adt))
                x = qdq_cache[key]
            q, s, axis, bs = quantize_weight(w, weight_format(plan.scheme), plan.block_size, plan.reduce_range)
            gm.register_buffer(f"{tag}_qweight", q)
            gm.register_buffer(f"{tag}_wscale", s.to(w.dtype))
            wd = graph.call_function(DQ, (graph.get_attr(f"{tag}_qweight"), graph.get_attr(f"{tag}_wscale"),
                                          axis, bs))
            y = graph.call_function(aten.matmul.default, (x, wd))
            if lin.bias is not None:
                y = graph.call_function(aten.add.Tensor, (y, lin.bias))
        lin.node.replace_all_uses_with(y)
        graph.erase_node(lin.node)
        done += 1
    fold_smoothing(ir)
    ir.recompile()
    return done


def fold_smoothing(ir: GraphIR) -> int:
    """``x * inv_s`` where ``x`` is a norm (or a multiply by a 1-D constant) that feeds nothing
    else: fold ``inv_s`` into that norm's weight (and bias) and drop the multiply."""
    gm = ir.graph_module
    folded = 0
    for n in list(ir.graph.nodes):
        if n.op != "call_function" or n.target is not aten.mul.Tensor:
            continue
        x, s = n.args
        if not (isinstance(s, torch.fx.Node) and s.op == "get_attr" and s.target.endswith("_smooth_inv")):
            continue
        if not isinstance(x, torch.fx.Node) or len(x.users) != 1:
            continue
        inv = attribute(gm, s.target)
        targets = []
        if x.target in (aten.layer_norm.default, aten.rms_norm.default):
            wi = 2
            targets = [a for a in x.args[wi:wi + (2 if x.target is aten.layer_norm.default else 1)]
                       if isinstance(a, torch.fx.Node)]
        elif x.target is aten.mul.Tensor:
            targets = [a for a in x.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                       and attribute(gm, a.target).dim() == 1]
            targets = targets[:1]
        if not targets or any(t.op != "get_attr" or len(t.users) != 1 or attribute(gm, t.target).shape != inv.shape
                              for t in targets):
            continue
        for t in targets:
            replace_attribute(gm, t.target, (attribute(gm, t.target) * inv).detach())
        n.replace_all_uses_with(x)
        ir.graph.erase_node(n)
        folded += 1
    return folded


def _unique(gm: torch.nn.Module, base: str) -> str:
    base = "q_" + base.strip("_")
    name, k = base, 1
    while hasattr(gm, f"{name}_qweight"):
        name, k = f"{base}_{k}", k + 1
    return name
