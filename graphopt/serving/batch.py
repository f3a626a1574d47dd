"""The running batch's KV cache: one set of ``past_*`` tensors whose rows are the sequences in
flight, left-padded to a common length (the padding masked by ``past_attention_mask``).

The kv-cache graph numbers each row's positions from its own first real token (cumsum of the
padding mask), so a row's cache can be left-padded, joined to other rows filled apart, or have
all-padding columns trimmed, and it still decodes exactly as it does alone. Rows join after their
prefill (:meth:`CacheBatch.join`), leave when they finish (:meth:`CacheBatch.keep`), and every
decode step feeds the whole batch one token per row (:meth:`CacheBatch.step`).

Static-cache artifacts (``kv-cache(static=true,max_len=N)``) keep fixed ``[B, H, N, D]`` slot
buffers written at one ``cache_position`` for the whole batch: rows are kept right-aligned at that
position, a joining row's slots are shifted to it (or the batch's to the row's), and slots that are
padding in every row are shifted out on the left when rows leave.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import InputError
from graphopt.ir.graph_ir import dtype_from_name
from graphopt.runtime.generation import empty_cache_input

if TYPE_CHECKING:
    from graphopt.runtime.engine import Engine


def check_servable(manifest: dict[str, Any], path: Any) -> dict[str, Any]:
    """The artifact's ``generation`` entry when the server can batch it, else an
    :class:`InputError` naming the fix."""
    gen = manifest.get("generation") or {}
    if gen.get("kind") != "kv-cache":
        raise InputError(f"{path} was compiled without the kv-cache pass; graphopt serve batches decoding with "
                         "the cache: compile with --pipeline cleanup,fuse,kv-cache")
    if not gen.get("attention_mask"):
        raise InputError(f"{path} takes no attention_mask, so rows of different lengths cannot share a batch; "
                         "compile the model with its attention_mask input")
    tp = manifest.get("tensor_parallel")
    if tp:  # N ranks must make the same calls in the same order: one server process cannot drive them yet
        raise InputError(f"{path} is tensor-parallel over {tp['world_size']} ranks, and graphopt serve runs one "
                         "process; serve an artifact compiled without tensor-parallel, or drive the ranks yourself "
                         "under torchrun (README: Tensor parallelism)")
    return gen


class CacheBatch:
    """The cache tensors of the running rows (torch, on the CPU) and the forward that uses them."""

    kind = "concat"

    def __init__(self, engine: Engine):
        self.engine = engine
        self.gen = gen = check_servable(engine.manifest, engine.path)
        self.specs = {s.name: s for s in engine.inputs}
        self.names = list(gen["cache_inputs"])  # past_attention_mask, past_key_0, past_value_0, ...
        self.outputs = dict(zip(gen["cache_outputs"], gen["cache_inputs"]))  # present_* -> past_*
        self.static = bool(gen.get("static"))
        # the shortest past the program takes (1 where torch.export refused an empty one)
        self.min_past = 0 if self.static else self.specs[self.names[0]].dynamic.get(1, (0, 0))[0]
        self.cache: dict[str, torch.Tensor] = {}
        self.rows = 0
        self.pos = 0  # the rows' common length: the next token's slot

    @property
    def length(self) -> int:
        """The cache's sequence length in use (real tokens and left padding)."""
        return self.pos if self.rows else 0

    def used_tokens(self) -> int:
        return self.length * self.rows

    def allocated_bytes(self) -> int:
        return self.used_tokens() * self.bytes_per_token()

    def empty(self, batch: int) -> dict[str, torch.Tensor]:
        """The cache inputs of a prefill of ``batch`` rows (zero-length, or the shortest the
        artifact takes: padding)."""
        return {name: empty_cache_input(self.specs[name], batch) for name in self.names}

    @property
    def chunks(self) -> bool:
        """Whether a prompt can be prefilled in chunks: a call of several tokens after a non-empty
        cache. TensorRT engines have one profile for prompts (empty cache) and one for steps (one
        token), so there a prompt is prefilled whole."""
        return self.engine.target != "tensorrt"

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: dict[str, torch.Tensor], position: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One call of the graph after a cache of ``position`` tokens: last-position logits
        ``[B, V]`` and the present cache (as past_*)."""
        feed = {self.gen["ids"]: ids, self.gen["attention_mask"]: mask, **cache}
        if self.static:
            feed[self.gen["cache_position"]] = torch.tensor([position])
        outs = dict(zip(self.engine.output_names, self.engine.runner.run([feed[n] for n in self.engine.input_names])))
        logits = torch.as_tensor(outs[self.gen["logits"]])[:, -1, :]
        return logits, {past: torch.as_tensor(outs[present]) for present, past in self.outputs.items()}

    def prefill(self, prompts: list[list[int]], past: tuple[dict[str, torch.Tensor], int] | None = None
                ) -> tuple[torch.Tensor, tuple[dict[str, torch.Tensor], int]]:
        """Prompts left-padded into one batch and run with an empty cache, or (one row, when
        :attr:`chunks`) the next chunk of a prompt after ``past`` = (the cache its earlier chunks
        left, that cache's length): next-token logits per prompt and (their cache, left-padded to
        the longest prompt, and its length), for :meth:`join` or the next chunk."""
        if past is not None and len(prompts) != 1:
            raise ValueError("a chunk after a cache is prefilled one row at a time")
        cache, start = past if past is not None else (self.empty(len(prompts)), self.min_past)
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.int64)
        mask = torch.zeros(len(prompts), longest, dtype=torch.int64)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = torch.tensor(p, dtype=torch.int64)
            mask[r, longest - len(p):] = 1
        logits, cache = self.forward(ids, mask, cache, start)
        return logits, (cache, start + longest)

    def drop(self, pending: Any) -> None:
        """Forget a prefill that will not join (nothing to free: its cache is its own)."""

    def join(self, pending: tuple[dict[str, torch.Tensor], int], keep: list[int]) -> None:
        """Append the rows ``keep`` of a prefill (its cache of ``length``) to the running batch,
        right-aligned: the shorter side gets padding on the left. One copy of the batch's cache."""
        cache, length = pending
        if not keep:
            return
        if len(keep) < int(cache[self.names[0]].shape[0]):
            index = torch.tensor(keep, dtype=torch.int64)
            cache = {name: t.index_select(0, index) for name, t in cache.items()}
        if not self.rows:
            self.cache, self.rows, self.pos = dict(cache), int(cache[self.names[0]].shape[0]), length
            return
        target = max(self.pos, length)
        n = int(cache[self.names[0]].shape[0])
        if self.static:
            old = {name: _shift(t, target - self.pos) for name, t in self.cache.items()}
            new = {name: _shift(t, target - length) for name, t in cache.items()}
            self.cache = {name: torch.cat([old[name], new[name]]) for name in self.names}
        else:
            self.cache = {name: _stack_right(self.cache[name], cache[name], target) for name in self.names}
        self.rows += n
        self.pos = target

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only these rows (in this order); drop the columns that are padding in every row
        left. One copy of what is kept. Returns the new order (old row indices): ``rows``."""
        if not rows:
            self.cache, self.rows, self.pos = {}, 0, 0
            return []
        index = torch.tensor(rows, dtype=torch.int64)
        mask = self.cache[self.names[0]]
        real = mask.index_select(0, index)[:, : self.pos].ne(0).any(0).nonzero()
        start = min(int(real[0]) if len(real) else 0, self.pos - self.min_past)
        if self.static:
            cache = {name: t.index_select(0, index) for name, t in self.cache.items()}
            if start:
                cache = {name: _shift(t, -start) for name, t in cache.items()}
        else:
            cache = {name: (t[:, start:] if t.dim() == 2 else t[:, :, start:]).index_select(0, index)
                     for name, t in self.cache.items()}
        self.cache, self.rows, self.pos = cache, len(rows), self.pos - start
        return list(rows)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per running row; the cache grows by one column. Returns logits ``[B, V]``."""
        ids = torch.tensor(tokens, dtype=torch.int64)[:, None]
        logits, self.cache = self.forward(ids, torch.ones_like(ids), self.cache, self.pos)
        self.pos += 1
        return logits

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one row holds (keys and values of every layer, and its mask)."""
        total = 0
        for name in self.names:
            spec = self.specs[name]
            per = torch.empty(0, dtype=dtype_from_name(spec.dtype)).element_size()
            for i, s in enumerate(spec.shape):
                if i not in (0, 1 if len(spec.shape) == 2 else 2) and isinstance(s, int):
                    per *= s
            total += per
        return total


def _stack_right(old: torch.Tensor, new: torch.Tensor, length: int) -> torch.Tensor:
    """``old``'s rows then ``new``'s, each right-aligned in ``length`` positions of the sequence axis
    (1 for the mask ``[B, P]``, 2 for ``[B, H, P, D]``) with zeros on the left: written once into
    one new tensor."""
    axis = 1 if old.dim() == 2 else 2
    shape = list(old.shape)
    shape[0], shape[axis] = old.shape[0] + new.shape[0], length
    out = old.new_empty(shape)
    for rows, t in ((out[: old.shape[0]], old), (out[old.shape[0]:], new)):
        pad = length - t.shape[axis]
        rows.narrow(axis, 0, pad).zero_()
        rows.narrow(axis, pad, t.shape[axis]).copy_(t)
    return out


def _shift(t: torch.Tensor, by: int) -> torch.Tensor:
    """Slots moved ``by`` places along the sequence axis of a static cache (right when positive),
    zeros where nothing moved in."""
    if not by:
        return t
    axis = 1 if t.dim() == 2 else 2
    out = torch.roll(t, by, dims=axis)
    n = t.shape[axis]
    out.narrow(axis, 0 if by > 0 else n + by, abs(by)).zero_()
    return out
