"""The ONNX lowering gives ``Attention`` the 3-D ``[batch, seq, heads * head_dim]`` layout and
the KV cache (graphopt.backends.onnx_fixups ``fold_attention_layout``): the exporter's per-layer
Reshape/Transpose of Q/K/V, the cache ``Concat`` and the Transpose/Reshape after attention go, and
the artifact computes what the model does (HF families, left-padded prompts of mixed lengths,
no-cache encoders). ``fold_attention=False`` keeps the exporter's form (the TensorRT lowering's)."""

from __future__ import annotations

import onnx
import pytest
import torch

import graphopt
from graphopt.errors import GraphoptError

VOCAB = 128
DYNAMIC = {n: {0: (1, 4), 1: (1, 64)} for n in ("input_ids", "attention_mask")}


def _decoder(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                             attn_implementation="sdpa")
        return tf.LlamaForCausalLM(cfg).eval()
    cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, bos_token_id=0,
                        eos_token_id=0, attn_implementation="sdpa")
    return tf.GPT2LMHeadModel(cfg).eval()


def _left_padded(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 9, 5 and 2, left-padded to 9 (real token ids in the padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids, mask


def _reference(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding of each prompt alone (its real tokens only), the full prefix every step."""
    rows = []
    with torch.no_grad():
        for row, keep in zip(ids, mask.bool()):
            seq = row[keep][None]
            for _ in range(n):
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
            rows.append(seq[0, -n:])
    return torch.stack(rows)


def _compile(model, out, **target_options):
    ids, mask = _left_padded(0)
    return graphopt.compile(model, {"input_ids": ids[:2], "attention_mask": mask[:2]},
                            pipeline="cleanup,fuse,kv-cache", target="onnx", out=out, report=None,
                            dynamic=DYNAMIC, target_options=target_options or None)


def _graph(art) -> onnx.GraphProto:
    return onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_attention_takes_3d_qkv_and_the_cache(tmp_path, family):
    model = _decoder(family)
    art = _compile(model, tmp_path / "a")
    graph = _graph(art)
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attention) == 2
    for n in attention:
        attrs = {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT}
        assert attrs["q_num_heads"] == 4 and attrs["kv_num_heads"] == (2 if family == "llama" else 4)
        assert n.input[4] in inputs and n.input[5] in inputs  # past_key, past_value
        assert n.output[1] in outputs and n.output[2] in outputs  # present_key, present_value
    ops = [n.op_type for n in graph.node]
    assert "Transpose" not in ops
    assert not any(n.op_type == "Concat" and n.input[0].startswith("past_key") for n in graph.node)
    ids, mask = _left_padded(3)
    if family == "gpt2":
        # learned absolute positions: the artifact numbers a row's tokens from the first column,
        # as the model's own forward does, so left-padded rows are not each prompt alone
        mask = torch.ones_like(mask)
    got = graphopt.load(art.path).generate(ids, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(got[:, ids.shape[1]:], _reference(model, ids, mask, 8))


def test_fold_attention_false_keeps_the_exporters_layout(tmp_path):
    model = _decoder("llama")
    art = _compile(model, tmp_path / "a", fold_attention=False)
    graph = _graph(art)
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert attention and all(len(n.input) == 4 for n in attention)
    assert sum(n.op_type == "Transpose" for n in graph.node) >= 4 * len(attention)
    ids, mask = _left_padded(4)
    got = graphopt.load(art.path).generate(ids, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(got[:, ids.shape[1]:], _reference(model, ids, mask, 6))


def test_an_encoders_attention_without_a_cache(tmp_path):
    """BERT: no cache; 3-D Attention with its [B, 1, 1, S] padding mask, on a fresh padded batch."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=VOCAB, attn_implementation="sdpa")).eval()
    ids, mask = _left_padded(1)
    art = graphopt.compile(model, {"input_ids": ids, "attention_mask": mask}, pipeline="cleanup,fuse",
                           target="onnx", out=tmp_path / "a", report=None, dynamic=DYNAMIC)
    attention = [n for n in _graph(art).node if n.op_type == "Attention"]
    assert len(attention) == 2 and all(len(n.input) == 4 and n.input[3] for n in attention)
    assert all(any(a.name == "q_num_heads" for a in n.attribute) for n in attention)
    ids, mask = _left_padded(2)
    ids, mask = ids.flip(1)[:, :7], mask.flip(1)[:, :7]  # right-padded, another length
    out = graphopt.load(art.path)(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(out["last_hidden_state"][keep], ref[keep], atol=1e-4, rtol=1e-4)


def test_a_bad_fold_attention_value_is_refused(tmp_path):
    with pytest.raises(GraphoptError, match="fold_attention='yes' is not valid"):
        _compile(_decoder("llama"), tmp_path / "a", fold_attention="yes")
