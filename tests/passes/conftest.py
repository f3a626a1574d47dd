"""Fixtures shared by the pass tests: a tiny Hugging Face Llama captured once per session, and
fresh random inputs for it. graphopt and its built-in plugins come from the editable install
(``make setup``), through their entry points."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

VOCAB, BATCH, SEQ = 256, 2, 8


def llama_inputs(seed: int) -> list[torch.Tensor]:
    """Fresh ``[input_ids, attention_mask]`` in placeholder order: random ids, and a mask with left
    padding on the first row so the mask arithmetic sees zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, : int(torch.randint(1, SEQ // 2, (1,), generator=g))] = 0
    return [ids, mask]


@pytest.fixture(scope="session")
def tiny_llama():
    """``.ir``: a captured 2-layer Llama (static shapes; copy it before running a pass on it),
    ``.inputs(seed)``: fresh inputs for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from graphopt.capture import capture

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    ids, mask = llama_inputs(0)
    ir = capture(model, {"input_ids": ids, "attention_mask": mask})
    return SimpleNamespace(model=model, ir=ir, inputs=llama_inputs)


def assert_same_outputs(before, after, inputs) -> None:
    """Bit-identical outputs of two GraphIRs on the same flat inputs (dtype and shape included)."""
    expected, got = before.run(list(inputs)), after.run(list(inputs))
    assert len(expected) == len(got)
    for i, (x, y) in enumerate(zip(expected, got)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"output {i}: {x.dtype}{tuple(x.shape)} -> {y.dtype}{tuple(y.shape)}"
        assert torch.equal(x, y), f"output {i} differs (max abs error {(x.double() - y.double()).abs().max():.3g})"


@pytest.fixture(scope="session")
def same_outputs():
    """``same_outputs(before_ir, after_ir, flat_inputs)`` asserts bit-identical outputs."""
    return assert_same_outputs
