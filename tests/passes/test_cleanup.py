"""The graphopt-cleanup plugin: what it registers, and its ``cleanup`` pipeline run through the
pass manager with per-pass verification on real model families (HF Llama, GPT-2)."""

from __future__ import annotations

import graphopt_cleanup
import pytest
import torch

import graphopt
from graphopt.passes.registry import PassRegistry


class _Recorder:
    """Stands in for the ``register`` callback graphopt hands to plugins."""

    def __init__(self):
        self.registry = PassRegistry()

    def __call__(self, cls):
        self.registry.add(cls, "graphopt-cleanup")
        return cls

    def alias(self, name, pipeline):
        self.registry.add_alias(name, pipeline, "graphopt-cleanup")


def test_registers_passes_and_aliases():
    register = _Recorder()
    graphopt_cleanup.graphopt_register_passes(register)
    assert sorted(register.registry.passes) == ["eliminate-common-subexpressions", "eliminate-dead-code",
                                                "fold-constants", "remove-noops"]
    aliases = {k: v for k, (v, _) in register.registry.aliases.items()}
    assert aliases == {
        "cleanup": "remove-noops,fold-constants,eliminate-common-subexpressions,eliminate-dead-code",
        "dce": "eliminate-dead-code", "cse": "eliminate-common-subexpressions"}
    # dead-code elimination is bit-exact by construction; the others are checked with the fp64 rule,
    # which passes bit-identical results as such (README "Verification")
    policies = {name: info.cls.verification.name for name, info in register.registry.passes.items()}
    assert all(info.cls.summary() for info in register.registry.passes.values())
    assert policies == {"eliminate-dead-code": "exact", "remove-noops": "reference", "fold-constants": "reference",
                        "eliminate-common-subexpressions": "reference"}


def test_loaded_like_any_plugin():
    pm = graphopt.get_plugin_manager()
    info = pm.plugins["graphopt-cleanup"]
    assert info.status == "ok", info.error
    assert info.version == graphopt_cleanup.__version__
    assert {"cleanup", "dce", "cse"} <= set(info.aliases)


def _check_cleanup(ir, expect_gone):
    original, optimized, report, _ = graphopt.optimize(ir, pipeline="cleanup")
    passes = report.data["passes"]
    assert [p["name"] for p in passes] == graphopt_cleanup.CLEANUP.split(",")
    for p in passes:
        assert p["verify"]["passed"], (p["name"], p["verify"]["message"])
    after = optimized.op_counts()
    for op in expect_gone:
        assert op not in after, op
    assert optimized.node_count() < original.node_count()
    return original, optimized


def test_cleanup_pipeline_on_tiny_llama(tiny_llama, same_outputs):
    original, optimized = _check_cleanup(
        tiny_llama.ir.copy(),
        ["aten._assert_tensor_metadata", "aten.dropout", "aten.alias", "aten.cos", "aten.sin"])
    assert optimized.node_count() <= original.node_count() * 2 // 3
    for seed in (1, 2):
        same_outputs(original, optimized, tiny_llama.inputs(seed))


@pytest.mark.filterwarnings("ignore")
def test_cleanup_pipeline_on_tiny_gpt2_with_dynamic_seq(same_outputs):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 8), generator=g)
    ir = graphopt.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          dynamic={"input_ids": {1: (2, 32)}, "attention_mask": {1: (2, 32)}})
    original, optimized = _check_cleanup(ir, ["aten._assert_tensor_metadata", "aten.dropout", "aten.alias"])
    ids = torch.randint(0, 256, (2, 13), generator=g)  # another sequence length
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    same_outputs(original, optimized, [ids, mask])
