"""Artifacts for the serving tests (compiled once per session) and a real server in a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.serving.process import Server

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "samples" / "shakespeare" / "checkpoint"
VOCAB = 96


@pytest.fixture(scope="session")
def shakespeare_artifact(tmp_path_factory) -> Path:
    """The trained decoder, compiled from its checkpoint directory (tokenizer shipped) with the
    default pipeline the README shows for serving."""
    out = tmp_path_factory.mktemp("serve") / "shakespeare"
    graphopt.compile(str(SHAKESPEARE), pipeline="cleanup,fuse,kv-cache", target="onnx", out=out, report=None,
                     dynamic={n: {0: (1, 8), 1: (1, 128)} for n in ("input_ids", "attention_mask")})
    return out


def llama_gqa(seed: int = 0):
    """A Hugging Face Llama with grouped-query attention built from a config (random weights; the
    lm_head scaled so that logits are not near-uniform: greedy choices without near ties)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def _llama_artifact(out: Path, cache: str, target: str = "onnx") -> Path:
    """The tiny Llama compiled with ``cache`` (a kv-cache pass) for ``target``."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    graphopt.compile(llama_gqa(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                     pipeline=f"cleanup,fuse,{cache}", target=target, out=out, report=None,
                     dynamic={n: {0: (1, 8), 1: (1, 96)} for n in ("input_ids", "attention_mask")})
    return out


@pytest.fixture(scope="session")
def llama_artifact(tmp_path_factory) -> Path:
    return _llama_artifact(tmp_path_factory.mktemp("serve") / "llama", "kv-cache")


@pytest.fixture(scope="session")
def llama_static_artifact(tmp_path_factory) -> Path:
    """The same model with a static (pre-allocated, slot-indexed) cache of 96 tokens."""
    return _llama_artifact(tmp_path_factory.mktemp("serve") / "llama-static", "kv-cache(static=true,max_len=96)")


@pytest.fixture(scope="session")
def llama_torch_artifact(tmp_path_factory) -> Path:
    """The same model for the torch target (a torch.export program run by PyTorch)."""
    return _llama_artifact(tmp_path_factory.mktemp("serve") / "llama-torch", "kv-cache", target="torch")


@pytest.fixture(scope="module")
def shakespeare_server(shakespeare_artifact):
    server = Server(shakespeare_artifact, "--max-batch", "8", "--max-queue", "128")
    yield server
    server.stop()
