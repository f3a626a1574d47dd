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
import torch.nn.functional as F

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
    return gen


class CacheBatch:
    """The cache tensors of the running rows (torch, on the CPU) and the forward that uses them."""

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

    def empty(self, batch: int) -> dict[str, torch.Tensor]:
        """The cache inputs of a prefill of ``batch`` rows (zero-length, or the shortest the
        artifact takes: padding)."""
        return {name: empty_cache_input(self.specs[name], batch) for name in self.names}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One call of the graph: last-position logits ``[B, V]`` and the present cache (as past_*)."""
        feed = {self.gen["ids"]: ids, self.gen["attention_mask"]: mask, **cache}
        if self.static:
            feed[self.gen["cache_position"]] = torch.tensor([self.pos if cache is self.cache else 0])
        outs = dict(zip(self.engine.output_names, self.engine.runner.run([feed[n] for n in self.engine.input_names])))
        logits = torch.as_tensor(outs[self.gen["logits"]])[:, -1, :]
        return logits, {past: torch.as_tensor(outs[present]) for present, past in self.outputs.items()}

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Prompts left-padded into one batch and run with an empty cache: next-token logits per
        prompt, their cache (left-padded to the longest prompt) and its length."""
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.int64)
        mask = torch.zeros(len(prompts), longest, dtype=torch.int64)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = torch.tensor(p, dtype=torch.int64)
            mask[r, longest - len(p):] = 1
        return (*self.forward(ids, mask, self.empty(len(prompts))), longest + self.min_past)

    def join(self, cache: dict[str, torch.Tensor], length: int) -> None:
        """Append rows (a prefill's cache of ``length``) to the running batch, right-aligned: the
        shorter side gets padding on the left."""
        if not self.rows:
            self.cache, self.rows, self.pos = dict(cache), int(cache[self.names[0]].shape[0]), length
            return
        target = max(self.pos, length)
        if self.static:
            old = {n: _shift(t, target - self.pos) for n, t in self.cache.items()}
            new = {n: _shift(t, target - length) for n, t in cache.items()}
        else:
            old = {n: _left_pad(t, target) for n, t in self.cache.items()}
            new = {n: _left_pad(t, target) for n, t in cache.items()}
        self.cache = {name: torch.cat([old[name], new[name]]) for name in self.names}
        self.rows += int(cache[self.names[0]].shape[0])
        self.pos = target

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop the columns that are padding in every row left."""
        if not rows:
            self.cache, self.rows, self.pos = {}, 0, 0
            return
        index = torch.tensor(rows, dtype=torch.int64)
        cache = {name: t.index_select(0, index) for name, t in self.cache.items()}
        real = cache[self.names[0]][:, : self.pos].ne(0).any(0).nonzero()
        start = min(int(real[0]) if len(real) else 0, self.pos - self.min_past)
        if start and self.static:
            cache = {name: _shift(t, -start) for name, t in cache.items()}
        elif start:
            cache = {name: t[:, start:] if t.dim() == 2 else t[:, :, start:] for name, t in cache.items()}
        self.cache, self.rows, self.pos = cache, len(rows), self.pos - start

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per running row; the cache grows by one column. Returns logits ``[B, V]``."""
        ids = torch.tensor(tokens, dtype=torch.int64)[:, None]
        logits, self.cache = self.forward(ids, torch.ones_like(ids), self.cache)
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


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (1 for the mask ``[B, P]``, 2 for ``[B, H, P, D]``)."""
    missing = length - (t.shape[1] if t.dim() == 2 else t.shape[2])
    if missing <= 0:
        return t
    pad: Any = (missing, 0) if t.dim() == 2 else (0, 0, missing, 0)
    return F.pad(t, pad)


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
