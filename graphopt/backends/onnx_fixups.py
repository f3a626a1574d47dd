"""The ONNX lowering's fix-ups of the exported graph, in the order they run (:data:`GRAPH_FIXUPS`
on the graphsurgeon graph, then :data:`MODEL_FIXUPS` on the exported ModelProto): exporter
patterns that ONNX Runtime or TensorRT take badly, rewritten into the forms they run fast. Each is
a function that returns how many places it changed; :func:`cleanup` runs them all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.errors import BackendError

if TYPE_CHECKING:
    import onnx

    from graphopt.ir.graph_ir import GraphIR

log = logging.getLogger(__name__)


def cleanup(model: onnx.ModelProto, ir: GraphIR, base_dir: Path | None = None,
             fold_attention: bool = True) -> onnx.ModelProto:
    """Name graph inputs/outputs as in the IR, rewrite a few exporter patterns for ONNX Runtime
    (``fold_attention``: :func:`fold_attention_layout`), then ``cleanup().toposort()`` with
    graphsurgeon. Initializers that point into an external data file (under ``base_dir``) stay
    pointers: graphsurgeon exports them untouched."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    name_io(graph, ir.input_names, ir.output_names)
    for _what, fixup, option in GRAPH_FIXUPS:
        if option is None or {"fold_attention": fold_attention}[option]:
            fixup(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    for _what, fixup in MODEL_FIXUPS:
        fixup(out, base_dir)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.doc_string = model.doc_string
    for prop in model.metadata_props:
        out.metadata_props.add(key=prop.key, value=prop.value)
    return out


def pack_int4_block_weights(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Store the weights of block-wise ``DequantizeLinear`` nodes as INT4 when their values fit.

    The torch graph carries int4 weights in int8 tensors (torch has no int4 dtype). Kept as INT8,
    ONNX Runtime runs a generic dequantize + fp32 MatMul, and TensorRT refuses block quantization
    of INT8 (it supports it for INT4/FP8 only). As INT4 initializers (two values per byte) the file
    is half the size, ONNX Runtime fuses ``DequantizeLinear → MatMul`` into its ``MatMulNBits``
    kernel, and TensorRT reads them as explicit int4 weight-only quantization. Only int8 initializers
    whose every value lies in [-8, 7], used by nothing but such nodes, are converted. Returns the
    number converted."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: i for i, t in enumerate(graph.initializer)}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def blocked_dq(node: Any) -> bool:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            return False
        if len(node.input) >= 3 and node.input[2]:
            return False  # an explicit zero point fixes the weight's type
        return any(a.name == "block_size" and a.i > 0 for a in node.attribute)

    done = 0
    for name, idx in inits.items():
        tensor = graph.initializer[idx]
        if tensor.data_type != onnx.TensorProto.INT8 or not users.get(name):
            continue
        if not all(blocked_dq(n) and n.input[0] == name for n in users[name]):
            continue
        values = numpy_helper.to_array(tensor, base_dir=str(base_dir) if base_dir is not None else "")
        if values.size == 0 or values.min() < -8 or values.max() > 7:
            continue
        packed = numpy_helper.from_array(values.astype(ml_dtypes.int4), name)
        del values
        graph.initializer[idx].CopyFrom(packed)  # embedded now (half the int8 bytes); saved externally later
        done += 1
    if done:
        log.debug("onnx lowering: stored %d block-quantized weight(s) as INT4", done)
    return done


def broadcast_rotary_caches(graph: Any) -> int:
    """Give every ``RotaryEmbedding`` without ``position_ids`` caches of its input's batch size.

    The ONNX spec wants ``cos``/``sin`` of shape ``[batch, seq, rot/2]`` there, and ONNX Runtime
    refuses a batch of 1 against a larger input ("expected to have the same shape as input 'x'").
    At opset 23 the torch.onnx optimizer (onnxscript 0.7 ``onnx_fusions``) turns Hugging Face's
    rotate-half RoPE into ``RotaryEmbedding`` with the model's ``[1, seq, rot/2]`` caches, which
    breaks every batch > 1. An ``Expand`` to ``[batch, 1, 1]`` fixes that (a no-op where the batch
    already matches). Returns the number of nodes fixed."""
    import numpy as np
    import onnx_graphsurgeon as gs

    fixed = 0
    for node in list(graph.nodes):
        if node.op != "RotaryEmbedding" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 3:
            continue
        x, caches = node.inputs[0], node.inputs[1:3]
        if any(not c.inputs or c.inputs[0].op == "Expand" for c in caches if isinstance(c, gs.Variable)):
            continue  # graph inputs / constants are used as given; expanded caches are fine already
        batch = gs.Variable(f"{node.name}__batch", dtype=np.int64, shape=[1])
        shape = gs.Variable(f"{node.name}__cache_shape", dtype=np.int64, shape=[3])
        ones = gs.Constant(f"{node.name}__ones", np.array([1, 1], dtype=np.int64))
        graph.nodes.append(gs.Node("Shape", inputs=[x], outputs=[batch], attrs={"start": 0, "end": 1}))
        graph.nodes.append(gs.Node("Concat", inputs=[batch, ones], outputs=[shape], attrs={"axis": 0}))
        for i, cache in enumerate(caches, start=1):
            expanded = gs.Variable(f"{cache.name}__expanded_{node.name}", dtype=cache.dtype)
            graph.nodes.append(gs.Node("Expand", inputs=[cache, shape], outputs=[expanded]))
            node.inputs[i] = expanded
        fixed += 1
    if fixed:
        log.debug("onnx lowering: expanded the caches of %d RotaryEmbedding node(s) to the input batch", fixed)
    return fixed


def share_rotary_caches(graph: Any) -> int:
    """Expand each ``RotaryEmbedding`` cache to the batch once for the whole graph, not once per
    node: ``graphopt::rotary_embedding``'s translation (and :func:`broadcast_rotary_caches`) give
    every node ``Expand(cache, Concat(Shape(x)[0:1], [1, 1]))`` with its own ``x``, 4 Expand, 2
    Shape and 2 Concat per layer that ONNX Runtime runs at every decode step (~2 ms of a 1B int4
    model's ~90 ms step on 2 cores). Where ``x``'s batch dim is a named symbolic dim of a graph
    input (the exporter names dims from torch's shape environment: equal names, equal sizes), the
    batch is read from that input instead, so the expansions of one cache are all the same node.
    Returns the number of cache inputs rewired."""
    import numpy as np
    import onnx_graphsurgeon as gs

    sources: dict[str, tuple[Any, int]] = {}
    for inp in graph.inputs:
        for i, dim in enumerate(inp.shape or []):
            if isinstance(dim, str) and dim:
                sources.setdefault(dim, (inp, i))
    shapes: dict[str, Any] = {}
    shared: dict[tuple[str, str], Any] = {}
    rewired = 0
    for node in list(graph.nodes):
        if node.op != "RotaryEmbedding" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 3:
            continue
        x = node.inputs[0]
        dim = x.shape[0] if getattr(x, "shape", None) else None
        if not isinstance(dim, str) or dim not in sources:
            continue
        for i in (1, 2):
            expanded = node.inputs[i]
            expand = expanded.inputs[0] if expanded.inputs else None
            if expand is None or expand.op != "Expand":
                continue
            cache, shape = expand.inputs
            concat = shape.inputs[0] if shape.inputs else None
            batch = concat.inputs[0].inputs[0] if concat is not None and concat.op == "Concat" \
                and concat.inputs and concat.inputs[0].inputs else None
            if batch is None or batch.op != "Shape" or batch.inputs[0] is not x or \
                    batch.attrs.get("start", 0) != 0 or batch.attrs.get("end") != 1:
                continue
            if dim not in shapes:
                src, k = sources[dim]
                size = gs.Variable(f"rotary_batch_{len(shapes)}", dtype=np.int64, shape=[1])
                shapes[dim] = gs.Variable(f"rotary_cache_shape_{len(shapes)}", dtype=np.int64, shape=[3])
                ones = gs.Constant(f"rotary_cache_ones_{len(shapes)}", np.array([1, 1], dtype=np.int64))
                graph.nodes.append(gs.Node("Shape", inputs=[src], outputs=[size], attrs={"start": k, "end": k + 1}))
                graph.nodes.append(gs.Node("Concat", inputs=[size, ones], outputs=[shapes[dim]], attrs={"axis": 0}))
            key = (cache.name, dim)
            if key not in shared:
                shared[key] = gs.Variable(f"{cache.name}__batch_{dim}", dtype=expanded.dtype)
                graph.nodes.append(gs.Node("Expand", inputs=[cache, shapes[dim]], outputs=[shared[key]]))
            node.inputs[i] = shared[key]
            rewired += 1
    if rewired:
        log.debug("onnx lowering: %d RotaryEmbedding cache input(s) share %d expansion(s)", rewired, len(shared))
    return rewired


def fold_attention_layout(graph: Any) -> int:
    """Give ``Attention`` the 3-D ``[batch, seq, heads * head_dim]`` layout and the KV cache.

    The exporter writes attention the way the torch graph has it: per head tensor ``Reshape`` to
    ``[B, S, H, D]`` and ``Transpose`` to ``[B, H, S, D]`` (then ``RotaryEmbedding``), the cache
    ``Concat(past, new)``, and after ``Attention`` a ``Transpose`` and ``Reshape`` back: 10 small
    ops per layer that ONNX Runtime runs (and copies through) at every decode step. The opset-23
    ``Attention`` takes 3-D Q/K/V with ``q_num_heads``/``kv_num_heads``, ``past_key``/``past_value``
    inputs and gives ``present_key``/``present_value``, and ``RotaryEmbedding`` takes 3-D input with
    ``num_heads``: same values, without the copies. Only the exact chain is rewritten (every
    intermediate used once, ``is_causal`` 0, no present/past already, ``perm`` ``[0, 2, 1, 3]``
    both ways, static head counts); TensorRT's Attention has no cache inputs, so its lowering
    keeps the 4-D form. Returns the number of Attention nodes rewritten."""
    graph.cleanup()  # the rotary rewrites leave dead Shape nodes, which count as users
    import onnx_graphsurgeon as gs

    outputs = {id(t) for t in graph.outputs}

    def onnx_op(node: Any, op: str) -> bool:
        return node is not None and node.op == op and node.domain in (None, "", "ai.onnx")

    def producer(t: Any) -> Any:
        return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None

    def used_once(t: Any) -> bool:
        return len(t.outputs) == 1 and id(t) not in outputs

    def static(shape: Any, rank: int) -> bool:
        return shape is not None and len(shape) == rank

    def heads(t: Any) -> tuple[Any, int, int, Any] | None:
        """``t`` = [RotaryEmbedding of] Transpose(Reshape(x3)) → (x3, heads, head_dim, rotary)."""
        rot, node = None, producer(t)
        if onnx_op(node, "RotaryEmbedding") and len(node.inputs) == 3 and used_once(node.inputs[0]) \
                and not node.attrs.get("num_heads"):
            rot, node = node, producer(node.inputs[0])
        if not onnx_op(node, "Transpose") or list(node.attrs.get("perm", [])) != [0, 2, 1, 3] \
                or not used_once(node.inputs[0]):
            return None
        reshape = producer(node.inputs[0])
        if not onnx_op(reshape, "Reshape"):
            return None
        x3, y4 = reshape.inputs[0], reshape.outputs[0]
        if not (static(x3.shape, 3) and static(y4.shape, 4)):
            return None
        h, d = y4.shape[2], y4.shape[3]
        if not (isinstance(h, int) and isinstance(d, int) and x3.shape[2] == h * d):
            return None
        return x3, h, d, rot

    def cached(t: Any) -> tuple[Any, Any] | None:
        """``t`` = Concat(past graph input, new) on the sequence axis → (past, new); None if not."""
        node = producer(t)
        if not onnx_op(node, "Concat") or node.attrs.get("axis") not in (2, -2) or len(node.inputs) != 2:
            return None
        past = node.inputs[0]
        if not any(past is i for i in graph.inputs) or not used_once(node.inputs[1]):
            return None
        if any(user.op != "Attention" for user in t.outputs):
            return None
        return past, node.inputs[1]

    folded = 0
    for att in [n for n in graph.nodes if onnx_op(n, "Attention")]:
        if len(att.inputs) > 4 or len([o for o in att.outputs if o.name]) != 1 or att.attrs.get("is_causal") \
                or att.attrs.get("q_num_heads") or att.attrs.get("kv_num_heads"):
            continue
        q, k, v = att.inputs[:3]
        mask = att.inputs[3] if len(att.inputs) == 4 else None
        k_cache, v_cache = cached(k), cached(v)
        if (k_cache is None) != (v_cache is None) or len(k.outputs) != 1 or len(v.outputs) != 1:
            continue
        k_new = k_cache[1] if k_cache else k
        v_new = v_cache[1] if v_cache else v
        qh, kh, vh = heads(q), heads(k_new), heads(v_new)
        y = att.outputs[0]
        back = y.outputs[0] if len(y.outputs) == 1 and id(y) not in outputs else None
        if qh is None or kh is None or vh is None or vh[3] is not None or not onnx_op(back, "Transpose") \
                or list(back.attrs.get("perm", [])) != [0, 2, 1, 3] or not used_once(back.outputs[0]):
            continue
        merge = back.outputs[0].outputs[0]
        y3 = merge.outputs[0]
        if not onnx_op(merge, "Reshape") or not static(y3.shape, 3) or y3.shape[2] != qh[1] * qh[2] \
                or kh[1] != vh[1] or kh[2] != qh[2] or vh[2] != qh[2]:
            continue
        ins = []
        for x3, n_heads, _, rot in (qh, kh):
            if rot is None:
                ins.append(x3)
                continue
            r3 = gs.Variable(f"{rot.outputs[0].name}__3d", dtype=rot.outputs[0].dtype, shape=list(x3.shape))
            graph.nodes.append(gs.Node("RotaryEmbedding", name=f"{rot.name}__3d", domain=rot.domain,
                                       attrs={**rot.attrs, "num_heads": n_heads},
                                       inputs=[x3, *rot.inputs[1:]], outputs=[r3]))
            ins.append(r3)
        ins.append(vh[0])
        ins.append(mask if mask is not None else gs.Variable.empty())
        outs = [y3]
        if k_cache:
            ins += [k_cache[0], v_cache[0]]
            outs += [k, v]
            for t in (k, v):
                t.inputs.clear()  # the Concat's output is the Attention's present now
        merge.outputs.clear()
        graph.nodes.append(gs.Node("Attention", name=f"{att.name}__3d", domain=att.domain,
                                   attrs={**att.attrs, "q_num_heads": qh[1], "kv_num_heads": kh[1]},
                                   inputs=ins, outputs=outs))
        att.outputs.clear()
        folded += 1
    if folded:
        log.debug("onnx lowering: %d Attention node(s) take 3-D Q/K/V and the KV cache", folded)
    return folded


def prepare_attention_masks(graph: Any) -> int:
    """Make every ``Attention`` mask mean in ONNX Runtime what the ONNX spec (and torch) says.

    Two differences of ONNX Runtime's CPU ``Attention`` kernel (1.31) from the spec, both fixed here
    with a few cheap ops on the mask (shared masks are fixed once):

    - it treats the float value ``lowest`` (``finfo(float32).min``) as "masked out" and returns 0
      for a row whose every key carries it, where the spec (add the mask, then softmax) and torch
      give the uniform average Hugging Face's finfo.min masks rely on (left-padded query rows).
      ``lowest`` is replaced by the next float towards zero, which is equally absorbing
      (``s + v == v`` for any realistic score ``s``), so every row gets the spec's result;
      ``-inf`` stays ``-inf``;
    - it requires ``attn_mask.shape[-2] == q_seq`` ("inconsistent q_sequence_length (between
      attn_mask and Q)"), though the spec lets the mask broadcast: a BERT-style ``[B, 1, 1, S]``
      padding mask is expanded to ``[B, 1, q_seq, S]``, unless the shapes already show equal
      lengths (Hugging Face's ``[B, 1, T, T]`` masks). The query's dim -2 is its sequence for both
      the 4-D ``[B, H, S, D]`` and 3-D ``[B, S, H*D]`` layouts.

    Returns the number of Attention nodes whose mask was changed."""
    import numpy as np
    import onnx_graphsurgeon as gs

    fixed, unsentinelled = 0, {}
    for node in list(graph.nodes):
        if node.op != "Attention" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 4:
            continue
        q, mask = node.inputs[0], node.inputs[3]
        if not isinstance(mask, gs.Tensor) or not mask.name:
            continue  # no mask (an empty optional input)
        tag = f"{node.name or 'attention'}_{fixed}"
        new = mask
        np_dtype = _np_dtype(mask.dtype)
        if np_dtype in (np.float16, np.float32, np.float64):
            if mask.name not in unsentinelled:
                lowest = np.array(np.finfo(np_dtype).min, dtype=np_dtype)
                above = np.array(np.nextafter(lowest, np.array(0, np_dtype)), dtype=np_dtype)
                lowest_c = gs.Constant(f"{mask.name}__lowest", lowest)
                above_c = gs.Constant(f"{mask.name}__above_lowest", above)
                is_lowest = gs.Variable(f"{mask.name}__is_lowest", dtype=np.bool_, shape=mask.shape)
                out = gs.Variable(f"{mask.name}__spec", dtype=mask.dtype, shape=mask.shape)
                graph.nodes.append(gs.Node("Equal", inputs=[mask, lowest_c], outputs=[is_lowest]))
                graph.nodes.append(gs.Node("Where", inputs=[is_lowest, above_c, mask], outputs=[out]))
                unsentinelled[mask.name] = out
            new = unsentinelled[mask.name]
        q_shape, m_shape = getattr(q, "shape", None), getattr(mask, "shape", None)
        same_len = bool(q_shape and m_shape and len(q_shape) >= 2 and len(m_shape) >= 2
                        and q_shape[-2] == m_shape[-2] and q_shape[-2] not in (None, ""))
        if not same_len:
            q_len = gs.Variable(f"{tag}__q_len", dtype=np.int64, shape=[1])
            lead = gs.Variable(f"{tag}__mask_lead", dtype=np.int64)
            last = gs.Variable(f"{tag}__mask_last", dtype=np.int64, shape=[1])
            target = gs.Variable(f"{tag}__mask_shape", dtype=np.int64)
            expanded = gs.Variable(f"{mask.name}__expanded_{tag}", dtype=mask.dtype)
            graph.nodes.append(gs.Node("Shape", inputs=[q], outputs=[q_len], attrs={"start": -2, "end": -1}))
            graph.nodes.append(gs.Node("Shape", inputs=[new], outputs=[lead], attrs={"start": 0, "end": -2}))
            graph.nodes.append(gs.Node("Shape", inputs=[new], outputs=[last], attrs={"start": -1}))
            graph.nodes.append(gs.Node("Concat", inputs=[lead, q_len, last], outputs=[target], attrs={"axis": 0}))
            graph.nodes.append(gs.Node("Expand", inputs=[new, target], outputs=[expanded]))
            new = expanded
        if new is not mask:
            node.inputs[3] = new
            fixed += 1
    if fixed:
        log.debug("onnx lowering: prepared the masks of %d Attention node(s) for ONNX Runtime", fixed)
    return fixed


def _np_dtype(dtype: Any) -> Any:
    """A graphsurgeon tensor dtype (numpy dtype or ONNX enum) as a numpy dtype, ``None`` if unknown."""
    import numpy as np
    import onnx

    if dtype is None:
        return None
    if isinstance(dtype, int):
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except (KeyError, TypeError, ValueError):
            return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def name_io(graph: Any, input_names: list[str], output_names: list[str]) -> None:
    """Give graph inputs and outputs the IR's names without clashing with inner value names.

    An output that is also an input, a constant, or another output gets its own value through an
    Identity node, since one value cannot carry two names."""
    import onnx_graphsurgeon as gs

    if len(graph.outputs) != len(output_names):
        raise BackendError(f"the ONNX graph has {len(graph.outputs)} outputs but the IR has "
                           f"{len(output_names)} ({', '.join(output_names)})")
    seen: set[int] = {id(t) for t in graph.inputs}
    for i, var in enumerate(list(graph.outputs)):
        if id(var) in seen or isinstance(var, gs.Constant):
            copy = gs.Variable(f"{output_names[i]}__graphopt_identity", dtype=var.dtype, shape=var.shape)
            graph.nodes.append(gs.Node("Identity", inputs=[var], outputs=[copy]))
            graph.outputs[i] = copy
            var = copy
        seen.add(id(var))
    wanted = {id(t): n for t, n in zip(list(graph.inputs) + list(graph.outputs), input_names + output_names)}
    taken = set(wanted.values())
    if len(taken) != len(wanted):
        raise BackendError(f"graph input/output names are not unique: {input_names + output_names}")
    tensors = graph.tensors(check_duplicates=False).values()
    used = {t.name for t in tensors} | taken
    for t in tensors:
        if id(t) not in wanted and t.name in taken:
            k = 1
            while f"{t.name}_{k}" in used:
                k += 1
            t.name = f"{t.name}_{k}"
            used.add(t.name)
    for t in list(graph.inputs) + list(graph.outputs):
        t.name = wanted[id(t)]


#: graphsurgeon fix-ups, in order: (what, function(graph) -> count, the lowering option that turns it
#: on or ``None`` for always). The rotary rewrites come first: the attention fold reads their output.
GRAPH_FIXUPS = [
    ("RotaryEmbedding caches broadcast to the batch", broadcast_rotary_caches, None),
    ("one RotaryEmbedding cos/sin pair per graph", share_rotary_caches, None),
    ("Attention on 3-D Q/K/V with the KV cache", fold_attention_layout, "fold_attention"),
    ("attention masks prepared once", prepare_attention_masks, None),
]
#: fix-ups of the exported ModelProto, in order: (what, function(model, base_dir) -> count)
MODEL_FIXUPS = [
    ("block-quantized int8 weights stored as INT4", pack_int4_block_weights),
]
