"""remove-padding: per-token work runs on the real tokens only, not on the padding.

A batch of sentences is padded to one length; with short sentences most of the ``B x T`` tokens
are padding (the MiniLM benchmark batch: 245 real tokens of 1024), and every linear, norm and
activation of an encoder computes them anyway. This pass packs the real tokens, the "effective
transformer" of FasterTransformer and TensorRT's variable-length BERT, written in the graph so
every backend runs it::

    idx = nonzero(attention_mask.view(-1)).view(-1)                     # [N]: the real tokens
    h   = embeddings(...)                   [B, T, H]
    hp  = index_select(h.view(-1, H), 0, idx)                           # [N, H]   pack
    ... linear / layer_norm / gelu / residual adds on [N, ...] ...
    inv = cumsum(mask.view(-1)) * mask.view(-1)                         # [B*T]: 0 at padding
    q   = index_select(cat([zeros(1, H), qp]), 0, inv).view(B, T, H)    # unpack where tokens meet
    a   = scaled_dot_product_attention(q, k, v, mask)                    # (attention, outputs)
    ap  = index_select(a.view(-1, H), 0, idx)                            # pack again

Which nodes run packed is decided on data flow: a node is per-token when its output and every
``[B, T, ...]`` input share the mask's leading ``B, T`` dims and the op never mixes positions
(elementwise ops with operands broadcast over the trailing dims only, linear, layer/RMS norm over
the trailing dims, activations, splits, views and transposes that keep ``B, T`` in front, softmax
and reductions over trailing dims). Everything else (attention, positional slices, pooling,
graph outputs) sees the padded layout again, with zeros at the padded positions.

Semantics: outputs at real tokens are unchanged (the same per-row arithmetic); outputs at padded
positions become zeros, as in PyTorch's nested-tensor fast path of ``nn.TransformerEncoder``.
Padding carries no meaning for models that mask it: the pass is opt-in (it is not in ``fuse``).
It checks itself on the example inputs with random right padding put into the mask (whatever
padding the examples carry, maybe none): the real tokens must not change, else a ``PassError``
says that the model's real tokens read the padding (attention without a key mask). Its
verification is then the fp64 rule (``reference()``) over the real tokens only, on the verification
inputs: the packed GEMMs block their sums differently.

Options: ``mask`` (default ``attention_mask``): the input whose nonzero entries mark real tokens,
``[B, T]``.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.errors import PassError
from graphopt.ir import GraphIR
from graphopt.verify import reference

from .patterns import aten, copy_source_meta, packet, real_users, tensor_val

log = logging.getLogger(__name__)

Node = torch.fx.Node

#: meta key: ``{"mask": input name, "outputs": [names of outputs zeroed at padded positions]}``.
META_KEY = "padding_removed"

_UNARY = frozenset({
    aten.gelu, aten.silu, aten.relu, aten.tanh, aten.sigmoid, aten.erf, aten.exp, aten.neg, aten.rsqrt,
    aten.sqrt, aten.reciprocal, aten.abs, aten.clone, aten.contiguous, aten.alias, aten.detach,
    aten.dropout, aten.hardtanh, aten.leaky_relu, aten.elu, aten.mish, aten.hardswish, aten.hardsigmoid,
    aten.pow, aten._to_copy, aten.to, aten.type_as,
})
_BINARY = frozenset({aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.where})
_RESHAPE = frozenset({aten.view, aten.reshape, aten._unsafe_view})
_DIM_OPS = frozenset({aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax})
_REDUCE = frozenset({aten.mean, aten.sum, aten.amax, aten.amin, aten.var})
_SPLIT = frozenset({aten.split, aten.split_with_sizes, aten.chunk, aten.unbind})
#: ops worth packing their inputs for; everything else is packed only when an input already is
_HEAVY = frozenset({aten.linear, aten.matmul, aten.mm, aten.addmm, aten.layer_norm, aten.rms_norm})


@dataclass
class Options:
    mask: str = "attention_mask"


class RemovePadding(Pass):
    """Run per-token ops on the real tokens only (packed by the padding mask); padded outputs become 0."""

    name = "remove-padding"
    Options = Options
    runs_after = ("fuse-attention", "fuse-norms", "fuse-rope", "merge-gemms", "fuse-activations")
    verification = reference().ignoring_padding("attention_mask")  # per instance: mask=

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.verification = reference().ignoring_padding(self.options.mask)

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        mask = next((p for p in ir.placeholders() if p.name == self.options.mask or p.target == self.options.mask), None)
        if mask is None:
            raise PassError(f"remove-padding: the graph has no input {self.options.mask!r} (inputs: "
                            f"{', '.join(ir.input_names)}); name the padding mask: remove-padding(mask=NAME)")
        mv = tensor_val(mask)
        if mv is None or mv.dim() != 2 or mv.is_floating_point():
            raise PassError(f"remove-padding: input {self.options.mask!r} must be an integer or bool [batch, seq] "
                            f"mask (1 = real token), not {None if mv is None else (tuple(mv.shape), mv.dtype)}")
        probes = padded_probes(ir, self.options.mask)
        want = [ir.run(p) for p in probes]
        rw = _Rewriter(ir, mask, (str(mv.shape[0]), str(mv.shape[1])), ctx)
        stats = rw.rewrite()
        if not stats["nodes_packed"]:
            return PassResult(ir, False, stats)
        out_names = [name for name, node in zip(ir.output_names, rw.output_nodes()) if rw.was_packed(node)]
        ir.meta[META_KEY] = {"mask": self.options.mask, "outputs": out_names}
        lc = dict(ir.meta.get("lowering_check") or {})
        lc["padding_mask"] = self.options.mask
        ir.meta["lowering_check"] = lc
        stats["outputs_zeroed_at_padding"] = len(out_names)
        ir.recompile()
        stats["probe_error"] = _check_probes(ir, probes, want, self.options.mask)
        return PassResult(ir, True, stats)


class _Rewriter:
    """Token layouts: ``[B, T, ...]`` (lead 2) and its flattened form ``[B*T, ...]`` (lead 1, GPT-2's
    ``view(-1, H)`` before ``addmm``). Both pack to ``[N, ...]``: dims past the lead shift by
    ``lead - 1``; negative dims stay."""

    def __init__(self, ir: GraphIR, mask: Node, bt: tuple[str, str], ctx: PassContext):
        self.ir, self.graph, self.mask, self.bt, self.ctx = ir, ir.graph, mask, bt, ctx
        mv = tensor_val(mask)
        self.rows = str(mv.shape[0] * mv.shape[1])
        self.packed: dict[Node, Node] = {}      # original node → its packed twin
        self.gathers: dict[Node, Node] = {}     # unpacked value → packed copy (index_select)
        self.idx: Node | None = None
        self.inv: Node | None = None
        self.sizes: tuple[Node, Node] | None = None
        self._origs: list[Node] = []

    # -- shapes ------------------------------------------------------------------------------
    def lead_of(self, v: Any) -> int:
        """2 for ``[B, T, ...]``, 1 for ``[B*T, ...]``, 0 for anything else."""
        if not isinstance(v, torch.Tensor) or v.dim() < 1:
            return 0
        if v.dim() >= 2 and (str(v.shape[0]), str(v.shape[1])) == self.bt:
            return 2
        return 1 if str(v.shape[0]) == self.rows and self.rows not in self.bt else 0

    def lead(self, x: Any) -> int:
        if not isinstance(x, Node) or x.op == "get_attr":  # weights are never per-token values
            return 0
        return self.lead_of(tensor_val(x))

    def trailing_of(self, v: torch.Tensor) -> list[int] | None:
        out = []
        for d in v.shape[self.lead_of(v):]:
            try:
                out.append(int(d))
            except Exception:
                return None
        return out

    def trailing(self, x: Node) -> list[int] | None:
        return self.trailing_of(tensor_val(x))

    def output_nodes(self) -> list[Any]:
        out = next(n for n in self.graph.nodes if n.op == "output")
        flat = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        return list(flat)

    def was_packed(self, node: Any) -> bool:
        return isinstance(node, Node) and node.meta.get("graphopt_unpacked", False)

    # -- which nodes run per token -------------------------------------------------------------
    def choose(self) -> list[Node]:
        """The nodes to run packed: every per-token GEMM and norm, the light per-token ops downstream
        of them, and the light ones whose every reader runs packed (so a gather sits above a
        quantize-dequantize, not between it and its GEMM, where it would hide the pair)."""
        nodes = [n for n in self.graph.nodes if n.op == "call_function"]
        chosen: set[Node] = set()
        changed = True
        while changed:
            changed = False
            for n in nodes:  # forward: heavy ops, and light ops reading a packed value
                if n not in chosen and self.tokenwise(n, chosen):
                    chosen.add(n)
                    changed = True
            for n in reversed(nodes):  # backward: light ops all of whose readers run packed
                users = real_users(n)
                if (n not in chosen and users and all(u in chosen for u in users)
                        and self.tokenwise(n, chosen, light_ok=True)):
                    chosen.add(n)
                    changed = True
        # Light ops that lead to no packed GEMM or norm stay padded: the unpack then happens once,
        # at the GEMM's output, instead of once per view of it (Q, K and V of a merged QKV linear).
        useful: set[Node] = set()
        for n in reversed(nodes):
            if n in chosen and (packet(n) in _HEAVY or any(u in useful for u in n.users)):
                useful.add(n)
        useful |= {n for n in chosen if n.target is operator.getitem and n.args[0] in useful}
        return [n for n in nodes if n in useful]

    def tokenwise(self, n: Node, chosen: set[Node], light_ok: bool = False) -> bool:
        if n.op != "call_function":
            return False
        if n.target is operator.getitem:
            return n.args[0] in chosen
        p = packet(n)
        v = n.meta.get("val")
        outs = [v] if isinstance(v, torch.Tensor) else list(v) if isinstance(v, (list, tuple)) else []
        if not outs or not all(self.lead_of(o) for o in outs) or any(self.trailing_of(o) is None for o in outs):
            return False
        out_lead = self.lead_of(outs[0])
        tensors = [a for a in _flat_args(n) if isinstance(a, Node) and isinstance(tensor_val(a), torch.Tensor)]
        tok_inputs = [a for a in tensors if self.lead(a)]
        if not tok_inputs:
            return False
        if p not in _HEAVY and not light_ok and not any(a in chosen for a in tok_inputs):
            return False  # light ops join a packed region; only GEMMs and norms start one
        tail = outs[0].dim() - out_lead  # the output's per-token rank
        if _elementwise(n, p):
            # operands: per-token values of the output's per-token rank, or broadcast over trailing dims
            return all(self.lead(a) and tensor_val(a).dim() - self.lead(a) == tail or
                       not self.lead(a) and tensor_val(a).dim() <= tail for a in tensors)
        others_fixed = all(a is tok_inputs[0] or not self.lead(a) for a in tensors) and len(tok_inputs) == 1
        if p in (aten.linear, aten.matmul, aten.mm):
            w = n.args[1]
            return (n.args[0] is tok_inputs[0] and others_fixed
                    and (p is aten.linear or isinstance(w, Node) and tensor_val(w).dim() == 2))
        if p is aten.addmm:  # bias + x @ W on [B*T, K] rows
            return n.args[1] is tok_inputs[0] and others_fixed
        if p in (aten.layer_norm, aten.rms_norm):
            shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
            return n.args[0] is tok_inputs[0] and others_fixed and len(shape) <= tail
        if len(tok_inputs) != 1 or len(tensors) != 1:
            return False
        src_rank, src_lead = tensor_val(tok_inputs[0]).dim(), self.lead(tok_inputs[0])
        if p in _RESHAPE:
            return True  # per-token in and out: only the trailing dims are regrouped
        if src_lead != out_lead:
            return False
        if p is aten.transpose:
            return all(_norm(d, src_rank) >= src_lead for d in n.args[1:3])
        if p is aten.permute:
            perm = [_norm(d, src_rank) for d in n.args[1]]
            return perm[:src_lead] == list(range(src_lead))
        if p in (aten.unsqueeze, aten.squeeze) and len(n.args) > 1 and isinstance(n.args[1], int):
            return _norm(n.args[1], outs[0].dim() if p is aten.unsqueeze else src_rank) >= src_lead
        if p in _DIM_OPS or p in _SPLIT:
            d = n.args[2] if p in (aten.split, aten.split_with_sizes, aten.chunk) and len(n.args) > 2 else \
                n.kwargs.get("dim", n.args[1] if p in _DIM_OPS or p is aten.unbind else 0)
            if p is aten.unbind:
                d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            return isinstance(d, int) and _norm(d, src_rank) >= src_lead
        if p in _REDUCE:
            d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if d is None:
                return False
            d = [d] if isinstance(d, int) else list(d)
            return all(_norm(x, src_rank) >= src_lead for x in d)
        return False

    # -- rewriting ---------------------------------------------------------------------------
    def index(self) -> Node:
        if self.idx is None:
            last_ph = [p for p in self.graph.nodes if p.op == "placeholder"][-1]
            with self.graph.inserting_after(last_ph):
                b = self.graph.call_function(aten.sym_size.int, (self.mask, 0))
            with self.graph.inserting_after(b):
                t = self.graph.call_function(aten.sym_size.int, (self.mask, 1))
            with self.graph.inserting_after(t):
                flat = self.graph.call_function(aten.reshape.default, (self.mask, [-1]))
            with self.graph.inserting_after(flat):
                nz = self.graph.call_function(aten.nonzero.default, (flat,))
            with self.graph.inserting_after(nz):
                self.idx = self.graph.call_function(aten.reshape.default, (nz, [-1]))
            # unpacking gathers too: padded position p reads row inv[p] of [zeros; packed], where
            # inv = (running count of real tokens) at real tokens and 0 at padding
            with self.graph.inserting_after(self.idx):
                real = self.graph.call_function(aten.ne.Scalar, (flat, 0))
            with self.graph.inserting_after(real):
                ones = self.graph.call_function(aten._to_copy.default, (real,), {"dtype": torch.int64})
            with self.graph.inserting_after(ones):
                count = self.graph.call_function(aten.cumsum.default, (ones, 0))
            with self.graph.inserting_after(count):
                self.inv = self.graph.call_function(aten.mul.Tensor, (count, ones))
            self.sizes = (b, t)
        return self.idx

    def gather(self, x: Node, before: Node) -> Node:
        if x in self.gathers:
            return self.gathers[x]
        idx = self.index()
        trail = self.trailing(x)
        with self.graph.inserting_before(before):
            flat = self.graph.call_function(aten.reshape.default, (x, [-1, *trail]))
            g = self.graph.call_function(aten.index_select.default, (flat, 0, idx))
        self.gathers[x] = g
        return g

    def unpack(self, orig: Node, packed: Node) -> Node:
        trail = self.trailing(orig)
        b, t = self.sizes
        with self.graph.inserting_after(packed):
            zero = self.graph.call_function(aten.new_zeros.default, (packed, [1, *trail]))
        with self.graph.inserting_after(zero):
            rows = self.graph.call_function(aten.cat.default, ([zero, packed], 0))
        with self.graph.inserting_after(rows):
            out = full = self.graph.call_function(aten.index_select.default, (rows, 0, self.inv))
        if self.lead(orig) == 2:
            with self.graph.inserting_after(full):
                out = self.graph.call_function(aten.reshape.default, (full, [b, t, *trail]))
        copy_source_meta(orig, out)
        out.meta["graphopt_unpacked"] = True
        return out

    def packed_args(self, n: Node) -> tuple[tuple, dict]:
        def conv(a: Any) -> Any:
            if isinstance(a, Node):
                if a in self.packed:
                    return self.packed[a]
                if self.lead(a):
                    return self.gather(a, n)
                return a
            if isinstance(a, (list, tuple)):
                return type(a)(conv(x) for x in a)
            return a

        args, kwargs = conv(n.args), {k: conv(v) for k, v in n.kwargs.items()}
        p = packet(n)
        src = next((a for a in _flat_args(n) if isinstance(a, Node) and self.lead(a)), None)
        src_rank = tensor_val(src).dim() if src is not None else 0
        lead = self.lead(src) if src is not None else 2

        def sh(d: int) -> int:
            return _shift(d, lead)

        if p in _RESHAPE:
            args = (args[0], [-1, *self.trailing(n)])
        elif p is aten.transpose:
            args = (args[0], sh(args[1]), sh(args[2]))
        elif p is aten.permute:
            args = (args[0], [0] + [_norm(d, src_rank) - (lead - 1) for d in args[1][lead:]])
        elif p in (aten.unsqueeze, aten.squeeze) and len(args) > 1:
            args = (args[0], sh(args[1]), *args[2:])
        elif p in _DIM_OPS or p is aten.unbind:
            if len(args) > 1:
                args = (args[0], sh(args[1]), *args[2:])
            elif "dim" in kwargs:
                kwargs["dim"] = sh(kwargs["dim"])
        elif p in (aten.split, aten.split_with_sizes, aten.chunk):
            if len(args) > 2:
                args = (args[0], args[1], sh(args[2]), *args[3:])
            elif "dim" in kwargs:
                kwargs["dim"] = sh(kwargs["dim"])
        elif p in _REDUCE:
            d = args[1]
            args = (args[0], sh(d) if isinstance(d, int) else [sh(x) for x in d], *args[2:])
        return args, kwargs

    def rewrite(self) -> dict[str, Any]:
        for n in self.choose():
            if n.target is operator.getitem and n.args[0] not in self.packed:
                continue  # its split was left alone (bisect's rewrite limit)
            if not self.ctx.should_rewrite(f"remove-padding: pack {n.name}"):
                continue
            args, kwargs = self.packed_args(n)
            with self.graph.inserting_before(n):
                new = self.graph.call_function(n.target, args, kwargs)
            copy_source_meta(n, new)
            self.packed[n] = new
            self._origs.append(n)
        if not self.packed:
            return {"nodes_packed": 0}
        self.index()
        unpacked = 0
        for n in self._origs:
            if n.target is not operator.getitem and isinstance(n.meta.get("val"), (list, tuple)):
                continue  # a split: its getitems carry the values
            outside = [u for u in list(n.users) if u not in self.packed]
            if outside:
                full = self.unpack(n, self.packed[n])
                unpacked += 1
                for u in outside:
                    u.replace_input_with(n, full)
        for n in reversed(self._origs):
            if not real_users(n):
                for u in list(n.users):  # assertion nodes on the padded value
                    self.graph.erase_node(u)
                self.graph.erase_node(n)
        return {"nodes_packed": len(self.packed), "packs": len(self.gathers), "unpacks": unpacked}


def padded_probes(ir: GraphIR, mask: str, n: int = 2, seed: int = 0) -> list[list[torch.Tensor]]:
    """The example inputs with the mask replaced by random right padding (every row keeps at least
    one token, the first row keeps all): whatever padding the examples carry (maybe none), the
    pass is checked on inputs that have some."""
    i = ir.input_names.index(mask)
    ex = ir.example_inputs[i]
    b, t = ex.shape
    out = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t
        m = (torch.arange(t)[None, :] < lengths[:, None]).to(ex.dtype)
        probe = list(ir.example_inputs)
        probe[i] = m
        out.append(probe)
    return out


def _check_probes(ir: GraphIR, probes: list, want: list, mask: str, tol: float = 1e-4) -> float:
    """Real tokens of the packed graph must match the padded graph on the padded probes; a model
    whose real tokens read the padding (no key mask) fails here, before any later pass runs."""
    from graphopt.fx import max_abs_error, zero_padding

    got = [ir.run(p) for p in probes]
    names = ir.output_names
    err, where = max_abs_error(zero_padding(want, probes, ir.input_names, mask),
                               zero_padding(got, probes, ir.input_names, mask), names)
    scale = max((float(t.abs().max()) for outs in want for t in outs
                 if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()), default=1.0)
    if not err <= tol * max(1.0, scale):
        k = names.index(where) if where in names else 0
        m = probes[0][ir.input_names.index(mask)]
        if tuple(want[0][k].shape[:2]) != tuple(m.shape):
            raise PassError(
                f"remove-padding: output {where!r} ({tuple(want[0][k].shape)}) is not per token [batch, seq, ...] "
                f"and changes on inputs with padding (max abs error {err:.3g}): it holds values computed at "
                "padded positions (a KV cache, a pooled sum), which become zeros when padding is removed; "
                "leave remove-padding out of the pipeline for this model")
        raise PassError(
            f"remove-padding: on inputs with padding, the real tokens of output {where!r} change (max abs "
            f"error {err:.3g}): the model's real tokens read the padded positions (attention without a "
            f"key mask from {mask!r}, or a mask the model ignores), so padding cannot be removed; leave "
            "remove-padding out of the pipeline for this model")
    return err


def _elementwise(n: Node, p: Any) -> bool:
    """Ops that compute each element from the elements at the same position: the unary and binary
    sets above, ATen ops tagged pointwise, and graphopt-quant's per-tensor fake quantization."""
    if p in _UNARY or p in _BINARY:
        return True
    if str(n.target).startswith("graphopt.quantize_dequantize"):
        return True
    return torch.Tag.pointwise in getattr(n.target, "tags", ())


def _flat_args(n: Node) -> list[Any]:
    out: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                walk(x)
        else:
            out.append(a)

    walk(n.args)
    walk(list(n.kwargs.values()))
    return out


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _shift(d: int, lead: int) -> int:
    """A dim of a per-token layout with ``lead`` token dims in the packed ``[N, ...]`` layout
    (negative dims stay)."""
    return d if d < 0 else d - (lead - 1)
