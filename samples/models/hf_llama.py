"""A tiny randomly-initialized ``transformers.LlamaForCausalLM`` (GQA).

``build()`` returns ``(module, {"input_ids", "attention_mask"}, dynamic)``.
The module returns a ``CausalLMOutputWithPast`` whose only populated field is
``logits`` ``[B, T, vocab]`` (``use_cache=False`` so no ``past_key_values``).
Never touches the network: the model is built from a config.
"""

from __future__ import annotations

import torch


def build(
    attn_implementation: str = "eager",
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
):
    """Return ``(LlamaForCausalLM in eval mode, inputs dict, dynamic)``.

    Dynamic dims: batch in [1, 16], sequence in [2, max_position_embeddings].
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()

    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.int64)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    dim_spec = {0: (1, 16), 1: (2, max_position_embeddings)}
    dynamic = {"input_ids": dict(dim_spec), "attention_mask": dict(dim_spec)}
    return model, inputs, dynamic
