"""The running batch's KV cache as slot buffers written in place (ONNX Runtime, dynamic-cache
artifacts).

A kv-cache artifact's graph takes the past (``past_key_i`` ``[B, H, P, D]``) and returns the
present, the past with the new tokens appended: every decode step copies the whole cache of every
layer, and rows joining or leaving the batch copy it again (:class:`~graphopt.serving.batch.CacheBatch`).
Here the server instead runs a *slot graph* derived from the artifact's own ``model.onnx`` when it
starts (:func:`slot_model`): each ``Attention`` that appended to a past now writes its new keys and
values with ``TensorScatter`` into a buffer ``[rows, H, N, D]`` at each row's own position
(``write_index``), and attends over that buffer. The buffer is bound as both the past input and the
present output (``IOBinding``), so ONNX Runtime writes the new tokens in place: a step touches the
new column only. That is how vLLM and TensorRT-LLM keep their caches (paged or per-slot buffers
that kernels write into), with ONNX's own in-place KV-cache operator.

Rows sit right-aligned at slot 0, each at its own length, so nothing is shifted when rows join or
leave: a prompt is prefilled straight into a free row, a finished row's place is taken by the last
row (one row copied), and a chunked prompt continues at its own length. The buffers' length ``N``
follows the longest row (in steps of :data:`GRAIN` slots; attention reads all ``N``), and they are
released when the batch empties.

Exactness: the graph's own attention mask and positions are kept. It is fed a past mask of ones
for a row's ``length`` slots and zeros after, so the positions it computes (cumulative sum of the
mask) are the row's own, and the mask it builds over (past slots, new tokens) is gathered into the
slot layout (``GatherElements``): whatever that mask encodes (padding, causality, a sliding window)
is what the slot graph applies. The server checks the slot graph against the artifact's graph on a
probe before it uses it (:meth:`SlotBatch.check`); an artifact the rewrite does not recognise, or
that fails the probe, is served with :class:`~graphopt.serving.batch.CacheBatch`, and the server
says so in its log and in ``/health`` (``"cache"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graphopt.errors import GraphoptError
from graphopt.serving.batch import check_servable

if TYPE_CHECKING:
    from graphopt.runtime.engine import Engine

log = logging.getLogger(__name__)

#: The buffers' length grows and shrinks in steps of this many slots (one growth copies the cache
#: once; between growths every step writes one column in place).
GRAIN = 32

WRITE_INDEX = "write_index"
LOGITS_INDEX = "logits_index"

#: Ops between the lm_head's MatMul and the logits output that act per position (a final softcap,
#: a cast): picking one position before them is picking it after.
_PER_POSITION = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Identity"}


class SlotsUnavailable(GraphoptError):
    """The artifact cannot be served from in-place slot buffers (the reason says why)."""


def slot_model(model: Any, gen: dict[str, Any]) -> Any:
    """The slot graph of a dynamic kv-cache ONNX model (an ``onnx.ModelProto``, rewritten in place
    and returned), or :class:`SlotsUnavailable` naming what does not match.

    Matched: per layer, an ``Attention`` (opset 23) whose ``past_key``/``past_value`` inputs are
    graph inputs the manifest lists as cache inputs and whose ``present_key``/``present_value``
    outputs are the matching graph outputs; the pasts are read by nothing else than ``Shape``."""
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    g = model.graph
    inputs = {i.name: i for i in g.input}
    outputs = {o.name for o in g.output}
    cache_in = list(gen["cache_inputs"])
    pasts = {n for n in cache_in if n in inputs and len(inputs[n].type.tensor_type.shape.dim) == 4}
    present_of = dict(zip(gen["cache_inputs"], gen["cache_outputs"]))
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for name in pasts:
        others = [n.op_type for n in consumers.get(name, []) if n.op_type not in ("Attention", "Shape")]
        if others:
            raise SlotsUnavailable(f"cache input {name} is read by {others[0]}, not only by Attention")
    attn = [n for n in g.node if n.op_type == "Attention" and len(n.input) >= 6 and n.input[4] in pasts]
    if not attn or {n.input[4] for n in attn} | {n.input[5] for n in attn} != pasts:
        raise SlotsUnavailable("not every cache input feeds an Attention node as its past")
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opset.get("ai.onnx", 0) < 23:
        raise SlotsUnavailable(f"the graph's opset is {opset.get('ai.onnx')}; the slot graph needs 23")

    consts: list[Any] = []

    def const(name: str, value: Any) -> str:
        consts.append(nh.from_array(np.asarray(value), name))
        return name

    first = sorted(pasts)[0]
    n_ = [  # N (slots), S (new tokens), j = 0..N-1, the write index as [B, 1, 1, 1]
        h.make_node("Shape", [first], ["slot_N1"], start=2, end=3),
        h.make_node("Shape", [gen["ids"]], ["slot_S1"], start=1, end=2),
        h.make_node("Squeeze", ["slot_N1"], ["slot_N"]),
        h.make_node("Range", [const("slot_zero", np.array(0, np.int64)), "slot_N",
                              const("slot_one", np.array(1, np.int64))], ["slot_j"]),
        h.make_node("Reshape", [WRITE_INDEX, const("slot_b1", np.array([-1, 1, 1, 1], np.int64))], ["slot_at"]),
        # slot j of a row holds its past when j < at, its new token j - at when at <= j < at + S;
        # in the graph's mask over (past slots, new tokens) that is column j, or N + j - at
        h.make_node("Sub", ["slot_j", "slot_at"], ["slot_rel"]),
        h.make_node("GreaterOrEqual", ["slot_rel", "slot_zero"], ["slot_ge"]),
        h.make_node("Less", ["slot_rel", "slot_S1"], ["slot_lt"]),
        h.make_node("And", ["slot_ge", "slot_lt"], ["slot_new"]),
        h.make_node("Add", ["slot_rel", "slot_N"], ["slot_newcol"]),
        h.make_node("Where", ["slot_new", "slot_newcol", "slot_j"], ["slot_col"]),  # [B, 1, 1, N]
    ]
    masks: dict[str, str] = {}  # the graph's mask -> the same mask in the slot layout
    body: list[Any] = []
    head, pick = _last_position_logits(g, gen["logits"], h, const)
    rewritten = {id(n) for n in attn}
    for node in g.node:
        if node is head:
            body += pick
        if id(node) not in rewritten:
            body.append(node)
            continue
        a = {x.name: h.get_attribute_value(x) for x in node.attribute}
        q, k, v, mask, pk, pv = node.input[:6]
        y, pres_k, pres_v = (list(node.output) + ["", "", ""])[:3]
        if not mask:
            raise SlotsUnavailable(f"Attention {node.name} takes no mask")
        if a.get("is_causal", 0) or a.get("qk_matmul_output_mode", 0):
            raise SlotsUnavailable(f"Attention {node.name} is causal by attribute or returns its scores")
        if present_of.get(pk) != pres_k or present_of.get(pv) != pres_v or pres_k not in outputs:
            raise SlotsUnavailable(f"Attention {node.name}'s present outputs are not the cache outputs")
        dims = inputs[pk].type.tensor_type.shape.dim
        hk, d = dims[1].dim_value, dims[3].dim_value
        hq = a.get("q_num_heads")
        if not (hk and d and hq) or a.get("kv_num_heads", hk) != hk:
            raise SlotsUnavailable(f"Attention {node.name} has no static head counts")
        if mask not in masks:
            m = f"slot_mask{len(masks)}"
            body += [
                h.make_node("Shape", [mask], [f"{m}_bhs"], start=0, end=3),
                h.make_node("Concat", [f"{m}_bhs", "slot_N1"], [f"{m}_shape"], axis=0),
                h.make_node("Expand", ["slot_col", f"{m}_shape"], [f"{m}_col"]),
                h.make_node("GatherElements", [mask, f"{m}_col"], [m], axis=3),
            ]
            masks[mask] = m
        p = f"slot_{pk}"
        body += [
            h.make_node("Reshape", [q, const(f"{p}_qs", np.array([0, 0, hq, d], np.int64))], [f"{p}_q3"]),
            h.make_node("Transpose", [f"{p}_q3"], [f"{p}_q"], perm=[0, 2, 1, 3]),
            h.make_node("Reshape", [k, const(f"{p}_ks", np.array([0, 0, hk, d], np.int64))], [f"{p}_k3"]),
            h.make_node("Transpose", [f"{p}_k3"], [f"{p}_k"], perm=[0, 2, 1, 3]),
            h.make_node("Reshape", [v, f"{p}_ks"], [f"{p}_v3"]),
            h.make_node("Transpose", [f"{p}_v3"], [f"{p}_v"], perm=[0, 2, 1, 3]),
            h.make_node("TensorScatter", [pk, f"{p}_k", WRITE_INDEX], [pres_k], axis=2),
            h.make_node("TensorScatter", [pv, f"{p}_v", WRITE_INDEX], [pres_v], axis=2),
            h.make_node("Attention", [f"{p}_q", pres_k, pres_v, masks[mask]], [f"{p}_y"], scale=a["scale"],
                        **({"softcap": a["softcap"]} if a.get("softcap") else {})),
            h.make_node("Transpose", [f"{p}_y"], [f"{p}_yt"], perm=[0, 2, 1, 3]),
            h.make_node("Reshape", [f"{p}_yt", const(f"{p}_ys", np.array([0, 0, hq * d], np.int64))], [y]),
        ]
    g.input.append(h.make_tensor_value_info(WRITE_INDEX, TensorProto.INT64, ["batch"]))
    cache_mask = cache_in[0] if cache_in and cache_in[0] not in pasts else None
    kept = [o for o in g.output if o.name != present_of.get(cache_mask)]
    del g.output[:]
    g.output.extend(kept)
    # what the outputs no longer need (the appended mask, the graph's concatenation) goes
    need = {o.name for o in g.output}
    live: list[Any] = []
    for node in reversed(n_ + body):
        if any(o in need for o in node.output):
            live.append(node)
            need.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(_topological(list(reversed(live)), {i.name for i in g.input} | {i.name for i in g.initializer}
                               | {c.name for c in consts}))
    g.initializer.extend(consts)
    for o in model.opset_import:
        if (o.domain or "ai.onnx") == "ai.onnx":
            o.version = max(o.version, 24)  # TensorScatter
    model.ir_version = max(model.ir_version, 11)
    return model


def _topological(nodes: list[Any], given: set[str]) -> list[Any]:
    """``nodes`` in an order where every input is made before it is read (stable: the given order
    where it already is)."""
    ready, out, waiting = set(given) | {""}, [], list(nodes)
    while waiting:
        rest = []
        for node in waiting:
            if all(i in ready for i in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(waiting):
            raise SlotsUnavailable(f"the rewritten graph has a cycle or an unmade input at {rest[0].op_type}")
        waiting = rest
    return out


def _last_position_logits(g: Any, logits: str, h: Any, const: Any) -> tuple[Any, list[Any]]:
    """Logits of one position per row (input ``logits_index``, ``[B]``): the lm_head's input
    ``[B, S, H]`` is gathered at that position before its MatMul, so a prompt's prefill computes
    the vocabulary projection once, not once per token. Returns (the lm_head's MatMul, the nodes
    to put before it), or (None, []) where the logits do not come from a MatMul by a constant
    weight through per-position ops only."""
    from onnx import TensorProto

    made = {o: n for n in g.node for o in n.output}
    fixed = {i.name for i in g.initializer}
    for n in g.node:  # what is computed from weights alone (a tied lm_head: the embedding transposed)
        if all(i in fixed or not i for i in n.input):
            fixed.update(n.output)
    node = made.get(logits)
    while node is not None and node.op_type in _PER_POSITION:
        dynamic = [i for i in node.input if i and i not in fixed]
        if len(dynamic) != 1:
            return None, []
        node = made.get(dynamic[0])
    if node is None or node.op_type != "MatMul" or node.input[1] not in fixed or node.input[0] in fixed:
        return None, []
    hidden = node.input[0]
    g.input.append(h.make_tensor_value_info(LOGITS_INDEX, TensorProto.INT64, ["batch"]))
    node.input[0] = "slot_last_hidden"
    return node, [
        h.make_node("Shape", [hidden], ["slot_hb"], start=0, end=1),
        h.make_node("Shape", [hidden], ["slot_hh"], start=2, end=3),
        h.make_node("Concat", ["slot_hb", const("slot_one1", np.array([1], np.int64)), "slot_hh"], ["slot_hshape"],
                    axis=0),
        h.make_node("Reshape", [LOGITS_INDEX, const("slot_b11", np.array([-1, 1, 1], np.int64))], ["slot_li"]),
        h.make_node("Expand", ["slot_li", "slot_hshape"], ["slot_lie"]),
        h.make_node("GatherElements", [hidden, "slot_lie"], ["slot_last_hidden"], axis=1),
    ]


@dataclass
class Staged:
    """A prefill's rows, written after the running rows and not yet part of the batch."""

    rows: int


class SlotBatch:
    """The running rows' cache in slot buffers (numpy, bound in place) and the slot graph's session.

    Rows ``0 .. rows-1`` run; a prefill's rows (:class:`Staged`) follow them until they join."""

    kind = "slots"
    static = False
    chunks = True

    def __init__(self, engine: Engine, max_rows: int):
        import onnx

        self.engine = engine
        self.gen = gen = check_servable(engine.manifest, engine.path)
        runner = engine.runner
        if engine.target != "onnx" or not hasattr(runner, "sibling"):
            raise SlotsUnavailable(f"the {engine.target} target runs its own program")
        if getattr(runner, "device", "cpu") != "cpu":
            raise SlotsUnavailable("the slot buffers live in host memory; this session runs on a GPU")
        if gen.get("static"):
            raise SlotsUnavailable("a static-cache artifact has its own slot buffers")
        model = onnx.load(str(runner.model_path), load_external_data=False)
        try:
            self.runner = runner.sibling(slot_model(model, gen).SerializeToString())  # weights: the artifact's files
        except GraphoptError as e:
            if isinstance(e, SlotsUnavailable):
                raise
            raise SlotsUnavailable(f"ONNX Runtime does not take the slot graph: {e}") from e
        self.session = self.runner.session
        self.last_only = LOGITS_INDEX in self.runner.input_names
        import onnxruntime as ort

        self.ort = ort
        specs = {s.name: s for s in engine.inputs}
        self.mask_name = gen["cache_inputs"][0] if len(specs[gen["cache_inputs"][0]].shape) == 2 else None
        self.names = [n for n in gen["cache_inputs"] if n != self.mask_name]
        self.present = dict(zip(gen["cache_inputs"], gen["cache_outputs"]))
        self.shapes = {n: [int(specs[n].shape[1]), int(specs[n].shape[3])] for n in self.names}
        from graphopt.ir.graph_ir import dtype_from_name

        self.dtypes = {n: torch.empty(0, dtype=dtype_from_name(specs[n].dtype)).numpy().dtype for n in self.names}
        self.max_rows = max_rows
        self.max_len = int(engine.manifest["generation"].get("max_len") or 0) or None
        self.bufs: dict[str, np.ndarray] = {}
        self.slots = 0  # N
        self.cap = 0  # rows the buffers hold
        self.rows = 0
        self.staged = 0
        self.lengths = np.zeros(max(self.max_rows, 2), np.int64)  # the start-up probe runs two rows
        self.logits_name = gen["logits"]

    # -- what the scheduler reads ---------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(self.lengths[: self.rows].max()) if self.rows else 0

    def used_tokens(self) -> int:
        return int(self.lengths[: self.rows + self.staged].sum())

    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self.bufs.values())

    def bytes_per_token(self) -> int:
        return sum(int(np.prod(s)) * self.dtypes[n].itemsize for n, s in self.shapes.items())

    # -- buffers --------------------------------------------------------------------------------
    def _reserve(self, slots: int, rows: int) -> None:
        """Buffers of at least ``slots`` slots (grown in :data:`GRAIN` steps) and ``rows`` rows
        (doubled, up to the batch's); the active rows are copied over."""
        if slots <= self.slots and rows <= self.cap:
            return
        n = max(self.slots, -(-slots // GRAIN) * GRAIN)
        if self.max_len:
            n = max(min(n, self.max_len), slots)
        cap = self.cap
        while cap < rows:
            cap = min(max(2 * cap, 2), self.max_rows)
        self._resize(n, cap)

    def _resize(self, n: int, cap: int) -> None:
        active = min(self.rows + self.staged, self.cap)  # a prefill's rows past the old rows are unwritten
        keep = min(n, self.slots)
        new = {}
        for name, (h, d) in self.shapes.items():
            buf = np.zeros((cap, h, n, d), self.dtypes[name])
            if active and keep:
                buf[:active, :, :keep] = self.bufs[name][:active, :, :keep]
            new[name] = buf
        self.bufs, self.slots, self.cap = new, n, cap

    def _release_if_empty(self) -> None:
        if not self.rows and not self.staged:
            self.bufs, self.slots, self.cap = {}, 0, 0
            self.lengths[:] = 0

    def _move(self, src: int, dst: int, count: int = 1) -> None:
        if src == dst:
            return
        for buf in self.bufs.values():
            buf[dst:dst + count] = buf[src:src + count]
        self.lengths[dst:dst + count] = self.lengths[src:src + count].copy()

    # -- calls ----------------------------------------------------------------------------------
    def _run(self, start: int, ids: np.ndarray, mask: np.ndarray, last: np.ndarray) -> np.ndarray:
        """One call of the slot graph on rows ``start ..`` (``ids``/``mask`` ``[n, S]``, right
        padded) at their lengths: the logits ``[n, V]`` at position ``last`` of each row."""
        n, s = ids.shape
        at = self.lengths[start:start + n].copy()
        self._reserve(int(at.max()) + s, start + n)
        b = self.session.io_binding()
        b.bind_cpu_input(self.gen["ids"], ids)
        b.bind_cpu_input(self.gen["attention_mask"], mask)
        if self.mask_name:
            b.bind_cpu_input(self.mask_name, (np.arange(self.slots)[None, :] < at[:, None]).astype(np.int64))
        b.bind_cpu_input(WRITE_INDEX, at)
        if self.last_only:
            b.bind_cpu_input(LOGITS_INDEX, last)
        for name in self.names:
            ov = self.ort.OrtValue.ortvalue_from_numpy(self.bufs[name][start:start + n])
            b.bind_ortvalue_input(name, ov)
            b.bind_ortvalue_output(self.present[name], ov)
        b.bind_output(self.logits_name, "cpu")
        self.session.run_with_iobinding(b)
        logits = b.get_outputs()[-1].numpy()
        return logits[:, 0] if self.last_only else logits[np.arange(n), last]

    def prefill(self, prompts: list[list[int]], past: Staged | None = None) -> tuple[torch.Tensor, Staged]:
        """Prompts (or, after ``past``, the next chunk of one prompt) written into the rows after
        the running ones: each prompt's next-token logits ``[n, V]`` and the staged rows."""
        if past is None:
            if self.staged:
                raise ValueError("a prefill is already staged; join or drop it first")
            start = self.rows
            self.lengths[start:start + len(prompts)] = 0
        else:
            if len(prompts) != 1 or past.rows != 1:
                raise ValueError("a chunk after a cache is prefilled one row at a time")
            start = self.rows
        if start + len(prompts) > self.max_rows:
            raise ValueError(f"{start + len(prompts)} rows exceed the batch's {self.max_rows}")
        self.staged = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int64)
        longest = int(lens.max())
        ids = np.zeros((len(prompts), longest), np.int64)
        mask = np.zeros((len(prompts), longest), np.int64)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
            mask[r, : len(p)] = 1
        logits = self._run(start, ids, mask, lens - 1)
        self.lengths[start:start + len(prompts)] += lens
        return torch.from_numpy(logits), Staged(len(prompts))

    def join(self, staged: Staged, keep: list[int]) -> None:
        """The staged rows ``keep`` (indices into the prefill's prompts) join the running rows."""
        for i, r in enumerate(keep):
            self._move(self.rows + r, self.rows + i)
        self.rows += len(keep)
        self.staged = 0
        self._release_if_empty()

    def drop(self, staged: Staged | None) -> None:
        """Forget a staged prefill (its request was cancelled or failed)."""
        self.staged = 0
        self._release_if_empty()

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only these running rows: each freed place below the new count is taken by the last
        kept row (one row copied), and a staged prefill moves down behind them. Returns the new
        order (old row indices)."""
        n = len(rows)
        order = list(rows)
        kept = set(rows)
        if n == self.rows:
            return list(range(n))
        # rows at n.. that are kept fill the holes below n
        movers = [r for r in rows if r >= n]
        holes = [i for i in range(n) if i not in kept]
        order = list(range(n))
        for hole, src in zip(holes, movers):
            self._move(src, hole)
            order[hole] = src
        if self.staged:
            self._move(self.rows, n, self.staged)
        self.rows = n
        self._release_if_empty()
        self._shrink()
        return order

    def _shrink(self) -> None:
        """Shorter buffers when the longest row left (attention reads every slot)."""
        active = self.rows + self.staged
        if not active:
            return
        need = -(-(int(self.lengths[:active].max()) + 1) // GRAIN) * GRAIN
        if need <= self.slots * 3 // 4:
            self._resize(need, self.cap)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """One token per running row: logits ``[rows, V]``."""
        ids = np.asarray(tokens, np.int64)[:, None]
        logits = self._run(0, ids, np.ones_like(ids), np.zeros(len(ids), np.int64))
        self.lengths[: self.rows] += 1
        return torch.from_numpy(logits)

    def check(self, seed: int = 0) -> float:
        """The slot graph against the artifact's graph on a probe (two prompts of different lengths,
        prefilled together, then three steps): the largest difference of the logits relative to
        their scale. Leaves the batch empty."""
        from graphopt.serving.batch import CacheBatch

        g = torch.Generator().manual_seed(seed)
        vocab = int(self.engine.outputs[self.engine.output_names.index(self.logits_name)].shape[-1])
        prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 7)]
        ref = CacheBatch(self.engine)
        worst = 0.0
        rows, self.max_rows = self.max_rows, max(self.max_rows, 2)  # the probe's two rows
        try:
            a, pend = self.prefill(prompts)
            self.join(pend, [0, 1])
            b, pend = ref.prefill(prompts)
            ref.join(pend, [0, 1])
            for step in range(4):
                scale = float(b.abs().max()) or 1.0
                worst = max(worst, float((a - b).abs().max()) / scale)
                if step == 3:
                    break
                toks = b.argmax(-1).tolist()
                a, b = self.step(toks), ref.step(toks)
        except Exception as e:  # noqa: BLE001 - any failure of the slot graph means: not these slots
            raise SlotsUnavailable(f"the slot graph failed on a probe: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            self.drop(None)
            self.keep([])
            self.max_rows = rows
        return worst
