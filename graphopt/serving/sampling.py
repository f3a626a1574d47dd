"""Per-request sampling: greedy at temperature 0, else temperature / top-k / top-p from the
request's own seeded generator, so a seeded request draws the same tokens whatever runs beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.temperature > 0:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(int(self.seed))
            else:
                self.generator.seed()

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row's last-position logits ``[V]``."""
        if self.temperature <= 0:
            return int(logits.argmax())
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each one
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))
