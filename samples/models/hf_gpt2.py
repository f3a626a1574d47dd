"""A tiny randomly-initialized ``transformers.GPT2LMHeadModel``.

``build()`` returns ``(module, {"input_ids", "attention_mask"}, dynamic)``.
The module returns a ``CausalLMOutputWithCrossAttentions`` whose only
populated field is ``logits`` ``[B, T, vocab]`` (``use_cache=False``).
Never touches the network: the model is built from a config.
"""

from __future__ import annotations

import torch


def build(
    attn_implementation: str = "eager",
    vocab_size: int = 256,
    n_positions: int = 128,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
):
    """Return ``(GPT2LMHeadModel in eval mode, inputs dict, dynamic)``.

    Dynamic dims: batch in [1, 16], sequence in [2, n_positions].
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        use_cache=False,
        # GPT2Config defaults these to 50256, outside the tiny vocab
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()

    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.int64)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    dim_spec = {0: (1, 16), 1: (2, n_positions)}
    dynamic = {"input_ids": dict(dim_spec), "attention_mask": dict(dim_spec)}
    return model, inputs, dynamic
