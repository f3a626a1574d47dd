"""kv-cache: turn a full-sequence decoder graph into one that serves prefill and decode with a cache.

Why: without a cache every new token recomputes the whole prefix (quadratic work per sequence).
Users usually get a cache by rewriting model code or by per-architecture exporters; this pass does
it on the captured graph, for any decoder whose attention is canonical
(``aten.scaled_dot_product_attention``, made by ``fuse-attention`` or captured that way), and proves
the result by greedy decoding (the ``equivalence`` policy).

Calling convention of the rewritten graph (T new tokens, P cached positions, L = P + T)::

    before:  logits[B,T,V] = f(input_ids[B,T] (, attention_mask[B,T]))

    after:   logits[B,T,V], present_attention_mask[B,L],
             present_key_0[B,Hkv,L,D], present_value_0[B,Hkv,L,D], ...
                 = f(input_ids[B,T], attention_mask[B,T], past_attention_mask[B,P],
                     past_key_0[B,Hkv,P,D], past_value_0[B,Hkv,P,D], ...)

The padding mask of the past travels with the cache (``past_attention_mask``), so every input dim
is one of ``batch``, ``seq`` or ``past`` and no input's size depends on another's (torch.export
and TensorRT profiles need independent dims). Prefill is the same graph with P = 0.

The rewrite, per piece of position-dependent computation:

- positions: every ``arange`` over the sequence (position ids for learned absolute embeddings or
  RoPE tables) becomes ``arange(P, P + T)``;
- attention: for each canonical attention node, K and V (at the KV-head count, before any
  grouped-query repeat) are concatenated after the past ones and returned as ``present_*``; the
  repeat to the query head count is re-applied to the concatenation;
- masks: the model's own mask (a causal ``tril``/``masked_fill``, HF mask utilities, an SDPA
  ``is_causal``) is replaced by one mask built from positions and the padding masks:
  ``allowed[b, i, j] = (j <= P + i) and mask[b, j]``. Before replacing it, the pass evaluates the
  model's mask on probe inputs (with left padding) and checks that it IS that causal-and-padding
  mask on every real query row; anything else (ALiBi biases, sliding windows, prefix-LM masks)
  stops the pass with an error naming the node — never a silently wrong graph.

``kv-cache(static=true, max_len=N)`` keeps pre-allocated cache buffers of fixed length N instead
(``past_key_l[B,Hkv,N,D]`` plus ``cache_position[1]`` = P): the new keys and values are written at
positions P..P+T-1 and attention runs over all N slots with the unwritten ones masked (the form
TensorRT optimization profiles and CUDA graphs need).
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphopt import Pass, PassContext, PassResult
from graphopt.errors import PassError, PassOptionError
from graphopt.ir import GraphIR, TensorSpec, dtype_name
from graphopt.verify import equivalence
from graphopt_kvcache.decoding import decoding_equivalence

log = logging.getLogger(__name__)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
MASK_NAME = "attention_mask"


@dataclass
class Options:
    static: bool = False
    max_len: int = 0
    ids: str = ""  # the token-id input (default: the integer input that is not attention_mask)

    def __post_init__(self):
        if self.static and self.max_len <= 0:
            raise ValueError("kv-cache(static=true) needs max_len=N, the cache length to pre-allocate")
        if self.max_len < 0:
            raise ValueError("max_len must be positive")


@dataclass
class _Attention:
    node: torch.fx.Node
    k: torch.fx.Node  # at the KV-head count
    v: torch.fx.Node
    repeat: int  # query heads per KV head (1 = none; the sdpa node's own enable_gqa handles it)
    gqa_kwarg: bool


class KVCache(Pass):
    """Insert a KV cache: one graph for prefill and decode, verified by greedy decoding."""

    name = "kv-cache"
    Options = Options
    runs_after = ("fuse-attention", "eliminate-dead-code", "fold-constants")
    requires_passes = ("fuse-attention",)  # canonical attention; inserted when the pipeline lacks it
    changes_signature = True
    verification = equivalence(decoding_equivalence, "decoding with the cache == full recompute, teacher-forced")

    def capture_requirements(self, inputs, declared, module=None):
        """Batch and sequence dynamic on the token ids and the attention mask (a single prompt of
        shape [1, T] is a valid example): the declared ranges, else batch 1..64 and sequence
        1..min(model's max positions, 4096) (``max_len`` for a static cache)."""
        from graphopt.fx import decoder_requirements

        return decoder_requirements(inputs, declared, module, ids=self.options.ids,
                                    max_len=self.options.max_len if self.options.static else 0)

    def requires(self, ir: GraphIR) -> None:
        if ir.meta.get("generation"):
            raise PassError("the graph already has a KV cache; run kv-cache once")
        if ir.meta.get("tensor_parallel"):  # it would cache every rank's shard as a layer of its own
            raise PassError("the graph is already tensor-parallel; put kv-cache before tensor-parallel (each rank "
                            "then caches its own KV heads)")
        if not any(n.target is SDPA for n in ir.graph.nodes):
            raise PassError("kv-cache needs canonical attention (aten.scaled_dot_product_attention) and this "
                            "graph has none; put fuse-attention before it: --pipeline cleanup,fuse-attention,kv-cache")

    def run(self, ir: GraphIR, ctx: PassContext) -> PassResult:
        ids_spec, mask_spec = _roles(ir, self.options.ids)
        seq_label = ids_spec.shape[1]
        if 1 not in ids_spec.dynamic or not isinstance(seq_label, str):
            raise PassError(f"kv-cache needs a dynamic sequence dim on {ids_spec.name!r} (dim 1); compile with "
                            f"--dynamic {ids_spec.name}:1=1..N")
        if mask_spec is not None and mask_spec.shape[1] != seq_label:
            raise PassError(f"{mask_spec.name!r} must have the same sequence dim as {ids_spec.name!r}")
        if not ctx.should_rewrite(f"kv-cache on {ir.meta.get('model_class', 'graph')}"):
            return PassResult(ir, False)

        graph = ir.graph
        placeholders = ir.placeholders()
        ids_node = placeholders[ir.input_names.index(ids_spec.name)]
        mask_node = placeholders[ir.input_names.index(mask_spec.name)] if mask_spec else None
        seq_sym = ids_node.meta["val"].shape[1]
        attns = _attention_nodes(ir)
        _check_masks(ir, attns, ids_spec, mask_spec)

        # -- new inputs: past mask, then per layer past key / value (after the last placeholder)
        batch_label = ids_spec.shape[0]
        max_len = self.options.max_len or ids_spec.dynamic[1][1]
        batch_range = ids_spec.dynamic.get(0, (int(ir.example_inputs[ir.input_names.index(ids_spec.name)].shape[0]),) * 2)
        static = self.options.static
        past_example = 3
        ex_ids = ir.example_inputs[ir.input_names.index(ids_spec.name)]
        B = int(ex_ids.shape[0])
        new_inputs: list[tuple[str, TensorSpec, torch.Tensor]] = []
        L_static = max_len
        new_inputs.append(("past_attention_mask", TensorSpec(
            "past_attention_mask", mask_spec.dtype if mask_spec else "int64", [batch_label, L_static if static else "past"],
            {0: batch_range} if static else {0: batch_range, 1: (0, max_len - 1)}),
            torch.ones(B, L_static if static else past_example, dtype=torch.int64)))
        if static:
            new_inputs.append(("cache_position", TensorSpec("cache_position", "int64", [1], {}),
                               torch.tensor([past_example], dtype=torch.int64)))
        for i, a in enumerate(attns):
            kval, vval = a.k.meta["val"], a.v.meta["val"]
            for kind, val in (("key", kval), ("value", vval)):
                hk, d = int(val.shape[1]), int(val.shape[3])
                shape = [batch_label, hk, L_static if static else "past", d]
                dyn = {0: batch_range} if static else {0: batch_range, 2: (0, max_len - 1)}
                ex = torch.randn(B, hk, L_static if static else past_example, d, dtype=val.dtype)
                new_inputs.append((f"past_{kind}_{i}", TensorSpec(f"past_{kind}_{i}", dtype_name(val.dtype), shape, dyn), ex))
        last_ph = placeholders[-1]
        new_nodes: dict[str, torch.fx.Node] = {}
        vals = _symbolic_vals(ids_node.meta.get("val"), new_inputs, static, past_example, max_len)
        with graph.inserting_after(last_ph):
            anchor = last_ph
            for name, _spec, ex in new_inputs:
                with graph.inserting_after(anchor):
                    n = graph.placeholder(name)
                # symbolic in the capture's shape environment where there is one (the past length
                # a new symbol), so that propagation and the lowering keep the dims dynamic
                n.meta["val"] = vals.get(name, ex)
                new_nodes[name] = n
                anchor = n

        # -- positions: T new tokens at P..P+T-1 (P from the past's length, or cache_position)
        first_compute = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
        with graph.inserting_before(first_compute):
            T = graph.call_function(aten.sym_size.int, (ids_node, 1))
            if static:
                P, L = None, None
                qpos = graph.call_function(aten.add.Tensor, (
                    new_nodes["cache_position"], graph.call_function(aten.arange.default, (T,), {"dtype": torch.int64})))
            else:
                P = graph.call_function(aten.sym_size.int, (new_nodes["past_key_0"], 2))
                L = graph.call_function(operator.add, (P, T))
                qpos = graph.call_function(aten.arange.start, (P, L), {"dtype": torch.int64})
        rewired, replaced = 0, []
        for n in list(graph.nodes):
            if n.op == "call_function" and n.target in (aten.arange.default, aten.arange.start) and _is_seq_arange(n, seq_sym):
                dtype = n.kwargs.get("dtype")
                with graph.inserting_before(n):
                    new = qpos if dtype in (None, torch.int64) else graph.call_function(aten.to.dtype, (qpos, dtype))
                n.replace_all_uses_with(new)
                graph.erase_node(n)
                replaced.append(new)
                rewired += 1

        # -- the padding mask of past and new tokens [B, L or N], and each row's own positions
        with graph.inserting_before(first_compute):
            full_mask = _full_mask(graph, ids_node, mask_node, new_nodes, qpos, static)
            row_positions = _row_positions(graph, replaced, full_mask, qpos, P, L, static)

        # -- the new mask [B, 1, T, L or N] and the present padding mask [B, L or N]
        with graph.inserting_before(attns[0].node):
            allowed, present_mask = _build_mask(graph, full_mask, qpos, L, static, L_static)

        # -- attention: concatenate (or write) K/V, re-apply the GQA repeat, use the new mask
        presents: list[tuple[str, torch.fx.Node]] = []
        for i, a in enumerate(attns):
            with graph.inserting_before(a.node):
                full = {}
                for kind, cur in (("key", a.k), ("value", a.v)):
                    past = new_nodes[f"past_{kind}_{i}"]
                    if static:
                        pres = graph.call_function(aten.index_copy.default, (past, 2, qpos, cur))
                    else:
                        pres = graph.call_function(aten.cat.default, ([past, cur], 2))
                    presents.append((f"present_{kind}_{i}", pres))
                    full[kind] = (graph.call_function(aten.repeat_interleave.self_int, (pres, a.repeat, 1))
                                  if a.repeat > 1 else pres)
            args = list(a.node.args)
            while len(args) < 4:
                args.append(None)
            args[1], args[2], args[3] = full["key"], full["value"], allowed
            if len(args) > 5:
                args[5] = False
            a.node.args = tuple(args)
            kwargs = dict(a.node.kwargs)
            kwargs.pop("is_causal", None)
            kwargs.pop("attn_mask", None)
            a.node.kwargs = kwargs

        # -- outputs
        out = ir.output_node()
        leaves = list(out.args[0])
        out.args = (tuple(leaves + [present_mask] + [p for _, p in presents]),)

        # metadata assertions would keep the old mask computation alive; they check nothing the
        # cached graph still computes (remove-noops drops them anyway)
        for n in list(graph.nodes):
            if n.target is aten._assert_tensor_metadata.default:
                graph.erase_node(n)
        graph.eliminate_dead_code()
        if mask_node is not None:
            # its sizes are still the batch and the new tokens' count: size reads are fine
            stray = [u for u in mask_node.users if not u.meta.get("graphopt_kv_mask")
                     and u.target not in (aten.sym_size.int, aten._assert_tensor_metadata.default)]
            if stray:
                raise PassError(f"{mask_spec.name!r} is used outside the attention masks (by "
                                f"{stray[0].format_node()}); kv-cache cannot rewrite that safely")
        leftover = [n for n in graph.nodes if n.op == "call_function" and _mentions_seq_square(n, seq_sym)]
        if leftover:
            raise PassError(f"kv-cache: {leftover[0].format_node()} still builds a [seq, seq] tensor (a "
                            "position-dependent computation the pass does not understand); cannot rewrite safely")

        # -- interface: decode steps feed one token (seq >= 1); the new tokens of one call must fit
        for spec in ir.inputs:
            if spec.name in (ids_spec.name, MASK_NAME) and 1 in spec.dynamic:
                lo, hi = spec.dynamic[1]
                spec.dynamic[1] = (1, min(hi, max_len) if static else hi)
        ir.inputs = ir.inputs + [spec for _, spec, _ in new_inputs]
        ir.example_inputs = list(ir.example_inputs) + [ex for _, _, ex in new_inputs]
        total = L_static if static else "past+seq"
        out_specs = list(ir.outputs)
        out_specs.append(TensorSpec("present_attention_mask", "int64", [batch_label, total]))
        for name, _ in presents:
            spec = next(sp for nm, sp, _ in new_inputs if nm == name.replace("present_", "past_"))
            out_specs.append(TensorSpec(name, spec.dtype, [batch_label, spec.shape[1], total, spec.shape[3]]))
        ir.outputs = out_specs
        ir.out_structure = _with_presents(ir.out_structure, [s.name for s in out_specs[len(leaves):]], len(leaves))
        logits = next((s.name for s in ir.outputs[: len(leaves)] if s.name == "logits"), ir.outputs[0].name)
        ir.meta["generation"] = {
            "kind": "kv-cache", "static": static, "max_len": max_len, "ids": ids_spec.name,
            "attention_mask": mask_spec.name if mask_spec else None, "logits": logits,
            "layers": len(attns), "cache_inputs": [name for name, _, _ in new_inputs if name != "cache_position"],
            "cache_outputs": [s.name for s in out_specs[len(leaves):]],
            "cache_position": "cache_position" if static else None,
        }
        if mask_spec is None:
            _add_mask_input(ir, graph, ids_node, new_nodes, batch_label, seq_label, batch_range, ids_spec)
        ir.recompile()
        return PassResult(ir, True, {"layers": len(attns), "positions_rewired": rewired, "row_positions": row_positions,
                                     "gqa": sum(1 for a in attns if a.repeat > 1 or a.gqa_kwarg)})


def _symbolic_vals(ids_val, new_inputs: list, static: bool, past_example: int, max_len: int) -> dict[str, torch.Tensor]:
    """Fake tensors for the new inputs in the fake mode of the captured ``ids`` (``{}`` when the
    graph has none, a ``symbolic_trace`` capture): the batch dim is the ids' batch (a symbol when
    dynamic), the past length a new symbol with range 0..max_len - 1 (dynamic cache). With them
    shape propagation after the pass computes every attention shape for any past length, and the
    ONNX lowering reuses the graph's values instead of propagating it again in a new shape
    environment (seconds per layer-stack on a real-size model)."""
    mode = getattr(ids_val, "fake_mode", None)
    env = getattr(mode, "shape_env", None)
    if env is None:
        return {}
    try:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StrictMinMaxConstraint
        from torch.utils._sympy.value_ranges import ValueRanges

        batch = ids_val.shape[0]
        past = None
        if not static:
            source = ConstantSource("graphopt_kv_cache_past_length")
            sym = env.create_symbol(past_example, source, dynamic_dim=DimDynamic.DYNAMIC,
                                    constraint_dim=StrictMinMaxConstraint(vr=ValueRanges(0, max_len - 1), warn_only=False),
                                    do_not_specialize_zero_one=True)
            past = env.create_symintnode(sym, hint=past_example, source=source)
        vals = {}
        with mode:
            for name, _spec, ex in new_inputs:
                if name == "cache_position":
                    shape = list(ex.shape)
                else:  # [batch, ..., past or the static length, ...]: the past dim is dim 1 (mask) or 2
                    shape = [batch, *ex.shape[1:]]
                    if past is not None:
                        shape[1 if ex.dim() == 2 else 2] = past
                vals[name] = torch.empty(shape, dtype=ex.dtype)
        return vals
    except Exception as e:  # noqa: BLE001 - another torch layout: concrete values, propagated as before
        log.debug("kv-cache: symbolic cache inputs unavailable (%s); using concrete examples", e)
        return {}


def _roles(ir: GraphIR, ids_name: str) -> tuple[TensorSpec, TensorSpec | None]:
    specs = {s.name: s for s in ir.inputs}
    mask = specs.get(MASK_NAME)
    if ids_name:
        if ids_name not in specs:
            raise PassOptionError(f"kv-cache(ids={ids_name}): no such input; inputs are {ir.input_names}")
        ids = specs[ids_name]
    else:
        cands = [s for s in ir.inputs if s.dtype.startswith("int") and s.name != MASK_NAME]
        if len(cands) != 1:
            raise PassError(f"kv-cache cannot tell the token-id input among {[s.name for s in cands]}; "
                            "name it: kv-cache(ids=NAME)")
        ids = cands[0]
    others = [s.name for s in ir.inputs if s.name not in (ids.name, MASK_NAME)]
    if others:
        raise PassError(f"kv-cache handles decoders taking token ids (and an attention_mask); inputs {others} "
                        "would need their own cache semantics")
    return ids, mask


def _attention_nodes(ir: GraphIR) -> list[_Attention]:
    found = []
    for n in ir.graph.nodes:
        if n.target is not SDPA:
            continue
        q, k, v = n.args[:3]
        gqa_kwarg = bool(n.kwargs.get("enable_gqa", False))
        k0, rk = _strip_repeat(k)
        v0, rv = _strip_repeat(v)
        if rk != rv:
            raise PassError(f"kv-cache: keys and values of {n.format_node()} are repeated differently")
        qv, kv = q.meta.get("val"), k0.meta.get("val")
        if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
            raise PassError(f"kv-cache: attention {n.format_node()} is not [batch, heads, seq, head_dim]; "
                            "cannot place a cache")
        found.append(_Attention(n, k0, v0, rk, gqa_kwarg))
    return found


def _strip_repeat(x: torch.fx.Node) -> tuple[torch.fx.Node, int]:
    """``reshape(expand(unsqueeze(kv, 2), [B, Hkv, r, T, D]), [B, Hkv*r, T, D])`` → (kv, r)."""
    if x.op == "call_function" and x.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        e = x.args[0]
        if isinstance(e, torch.fx.Node) and e.target is aten.expand.default:
            u = e.args[0]
            if isinstance(u, torch.fx.Node) and u.target is aten.unsqueeze.default and u.args[1] == 2:
                base = u.args[0]
                bv, xv = base.meta.get("val"), x.meta.get("val")
                if bv is not None and xv is not None and bv.dim() == 4 and xv.dim() == 4:
                    hk, h = int(bv.shape[1]), int(xv.shape[1])
                    if h % hk == 0:
                        return base, h // hk
    if x.op == "call_function" and x.target is aten.repeat_interleave.self_int and x.args[2] == 1:
        return x.args[0], int(x.args[1])
    return x, 1


def _is_seq_arange(n: torch.fx.Node, seq_sym: Any) -> bool:
    val = n.meta.get("val")
    if val is None or val.dim() != 1:
        return False
    start = n.args[0] if n.target is aten.arange.start else 0
    return start == 0 and str(val.shape[0]) == str(seq_sym)


def _mentions_seq_square(n: torch.fx.Node, seq_sym: Any) -> bool:
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or n.meta.get("graphopt_kv_mask"):
        return False
    sizes = [str(s) for s in val.shape]
    return sizes.count(str(seq_sym)) >= 2


def _mask_op(graph, target, *args, **kwargs) -> torch.fx.Node:
    """A node of the pass's own mask computation (the only users the attention mask input may have)."""
    node = graph.call_function(target, args, kwargs)
    node.meta["graphopt_kv_mask"] = True
    return node


def _full_mask(graph, ids_node, mask_node, new_nodes, qpos, static) -> torch.fx.Node:
    """The padding mask of the past and the new tokens, int64 ``[B, L]`` (static: ``[B, N]``, the
    new tokens' mask written at their slots)."""
    past_mask = _mask_op(graph, aten.to.dtype, new_nodes["past_attention_mask"], torch.int64)
    cur = mask_node if mask_node is not None else _mask_op(graph, aten.ones_like.default, ids_node, dtype=torch.int64)
    cur = _mask_op(graph, aten.to.dtype, cur, torch.int64)
    if static:
        return _mask_op(graph, aten.index_copy.default, past_mask, 1, qpos, cur)
    return _mask_op(graph, aten.cat.default, [past_mask, cur], 1)


def _row_positions(graph, replaced: list[torch.fx.Node], full, qpos, P, L, static) -> int:
    """Number each row's tokens from its first real one, as Hugging Face's ``generate`` does
    (``cumsum(mask) - 1``): position ids ``unsqueeze(positions, 0)`` ``[1, T]`` become ``[B, T]``.
    A left-padded prompt then gets the positions it has alone, for learned absolute embeddings
    (GPT-2) as for RoPE, and rows whose caches were filled apart can decode in one batch. The
    slot positions stay for the causal mask (and the static cache's writes). Padding tokens get 0
    (they are masked). Position lookups of the ``[T]`` positions themselves (``wpe(arange(T))``)
    take the ``[B, T]`` ones. Returns the number of position uses rewired."""
    users = list(dict.fromkeys(u for new in replaced for u in list(new.users)
                               if u.target is aten.unsqueeze.default and len(u.args) > 1 and u.args[1] == 0))
    # learned positions looked up with the [T] positions themselves (nanoGPT's wpe(arange(T)))
    lookups = list(dict.fromkeys(u for new in replaced for u in list(new.users)
                                 if u.target is aten.embedding.default and u.args[1] is new))
    if not users and not lookups:
        return 0
    counted = _mask_op(graph, aten.sub.Tensor, _mask_op(graph, aten.cumsum.default, full, 1), 1)
    counted = _mask_op(graph, aten.clamp_min.default, counted, 0)
    if static:
        rows = _mask_op(graph, aten.index_select.default, counted, 1, qpos)
    else:
        rows = _mask_op(graph, aten.slice.Tensor, counted, 1, P, L)
    for u in users:
        src = u.args[0]
        typed = rows if src is qpos else _mask_op(graph, aten.to.dtype, rows, src.args[1])
        u.replace_all_uses_with(typed)
        graph.erase_node(u)
    for u in lookups:  # [T, C] -> [B, T, C]: still adds to the token embeddings [B, T, C]
        src = u.args[1]
        u.args = (u.args[0], rows if src is qpos else _mask_op(graph, aten.to.dtype, rows, src.args[1]), *u.args[2:])
    return len(users) + len(lookups)


def _build_mask(graph, full, qpos, L, static, n_static):
    """``allowed[b, 0, i, j] = (j <= qpos[i]) & full[b, j]``, with an all-false row (a padding
    query) given its own position so attention stays finite. Returns (allowed, full)."""

    def call(target, *args, **kwargs):
        return _mask_op(graph, target, *args, **kwargs)

    if static:
        kpos = call(aten.arange.default, n_static, dtype=torch.int64)
    else:
        kpos = call(aten.arange.default, L, dtype=torch.int64)
    q2 = call(aten.unsqueeze.default, qpos, 1)                                     # [T, 1]
    k2 = call(aten.unsqueeze.default, kpos, 0)                                     # [1, L]
    causal = call(aten.unsqueeze.default, call(aten.unsqueeze.default, call(aten.le.Tensor, k2, q2), 0), 0)
    diag = call(aten.unsqueeze.default, call(aten.unsqueeze.default, call(aten.eq.Tensor, k2, q2), 0), 0)
    pad = call(aten.unsqueeze.default, call(aten.unsqueeze.default, call(aten.ne.Scalar, full, 0), 1), 1)
    allowed = call(aten.logical_and.default, causal, pad)                         # [B, 1, T, L]
    empty = call(aten.logical_not.default, call(aten.any.dim, allowed, -1, True))
    allowed = call(aten.logical_or.default, allowed, call(aten.logical_and.default, empty, diag))
    return allowed, full


def _check_masks(ir: GraphIR, attns: list[_Attention], ids_spec: TensorSpec, mask_spec: TensorSpec | None) -> None:
    """Evaluate each attention's mask on probe inputs and require it to be causal & padding on every
    real (non-padding) query row."""
    from graphopt.fx import record_values

    T, B = 7, 2
    ids_ex = ir.example_inputs[ir.input_names.index(ids_spec.name)]
    lo, hi = int(ids_ex.min()), int(ids_ex.max())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(lo, hi + 1, (B, T), generator=g, dtype=ids_ex.dtype)
    pad = torch.ones(B, T, dtype=torch.int64)
    if mask_spec is not None:
        pad[1, :3] = 0  # left padding in the second row
    inputs = [ids if s.name == ids_spec.name else pad.to(ir.example_inputs[i].dtype) for i, s in enumerate(ir.inputs)]
    values = record_values(ir, inputs)
    expected = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & pad.bool()[:, None, None, :]
    real_rows = pad.bool()[:, None, :, None].expand(B, 1, T, T)
    for a in attns:
        n = a.node
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        causal_flag = (n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False))
        if mask is None:
            if not causal_flag:
                raise PassError(f"kv-cache: attention {n.format_node()} has no mask and is not causal: not a "
                                "decoder self-attention")
            if mask_spec is not None:
                raise PassError(f"kv-cache: attention {n.format_node()} is causal but ignores "
                                f"{mask_spec.name!r} (padding); a cache with padding masks would change it")
            continue
        if not isinstance(mask, torch.fx.Node) or mask.name not in values:
            raise PassError(f"kv-cache: cannot evaluate the mask of {n.format_node()}")
        m = values[mask.name]
        allowed = m if m.dtype == torch.bool else _additive_to_bool(n, m)
        if causal_flag:
            allowed = allowed & torch.tril(torch.ones(T, T, dtype=torch.bool))
        _compare(n, allowed.expand(B, allowed.shape[1], T, T)[:, :1], expected, real_rows)


def _additive_to_bool(n: torch.fx.Node, m: torch.Tensor) -> torch.Tensor:
    big_negative = m <= torch.finfo(m.dtype).min / 2
    if not bool(((m == 0) | big_negative).all()):
        raise PassError(f"kv-cache: the mask of {n.format_node()} carries values other than 0 and -inf "
                        "(position biases such as ALiBi); cannot rewrite safely")
    return ~big_negative


def _compare(n: torch.fx.Node, got: torch.Tensor, expected: torch.Tensor, rows: torch.Tensor) -> None:
    if got.shape[-2:] != expected.shape[-2:] or not bool((got.expand_as(expected) == expected)[rows].all()):
        raise PassError(f"kv-cache: the mask of attention {n.format_node()} is not a causal + padding mask "
                        "(sliding window, prefix-LM or custom masking); cannot rewrite safely")


def _with_presents(structure: dict, names: list[str], first_index: int) -> dict:
    leaves = [{"type": "tensor", "index": first_index + i, "name": name} for i, name in enumerate(names)]
    if structure["type"] == "dict":
        s = copy.deepcopy(structure)
        s["keys"] = list(s["keys"]) + names
        s["items"] = list(s["items"]) + leaves
        return s
    return {"type": "dict", "keys": ["logits"] + names, "items": [structure] + leaves}


def _add_mask_input(ir, graph, ids_node, new_nodes, batch_label, seq_label, batch_range, ids_spec) -> None:
    """Models without an attention_mask input get one in the cached graph (all ones = no padding),
    so the runtime drives every decoder the same way. Inserted in place of the ones_like."""
    ones = next((n for n in graph.nodes if n.target is aten.ones_like.default and n.meta.get("graphopt_kv_mask")), None)
    with graph.inserting_after(ids_node):
        ph = graph.placeholder(MASK_NAME)
    if ones is not None:
        ones.replace_all_uses_with(ph)
        graph.erase_node(ones)
    idx = ir.input_names.index(ids_spec.name) + 1
    ex_ids = ir.example_inputs[idx - 1]
    ir.inputs.insert(idx, TensorSpec(MASK_NAME, "int64", [batch_label, seq_label], dict(ids_spec.dynamic)))
    ir.example_inputs.insert(idx, torch.ones_like(ex_ids, dtype=torch.int64))
    ir.meta["generation"]["attention_mask"] = MASK_NAME
