"""kv-cache: the rewritten graph's interface and ops, decoding equivalence (dynamic and static,
GQA, left padding) on real model families, generation through the onnx and torch targets, and
the refusals that keep it from producing a silently wrong graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.model_loader import load_factory

MODELS = Path(__file__).resolve().parents[2] / "samples" / "models"
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _factory(name: str, **kw):
    return load_factory(f"{MODELS}/{name}.py:build", **kw)


def _eager_greedy(model, ids, mask, n, keyword=True):
    """Greedy decoding of each prompt alone (its real tokens only) by the eager model, the whole
    prefix every step: what Hugging Face's generate gives a left-padded batch."""
    rows = []
    with torch.no_grad():
        for row, keep in zip(ids, mask.bool()):
            seq = row[keep][None]
            for _ in range(n):
                out = model(input_ids=seq) if keyword else model(seq)
                logits = out.logits if hasattr(out, "logits") else out
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            rows.append(seq[0, -n:])
    return torch.cat([ids, torch.stack(rows)], 1)


@pytest.fixture(scope="module")
def llama():
    return _factory("hf_llama", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def llama_cached(llama):
    model, ex, dyn = llama
    return graphopt.optimize(model, ex, "cleanup,kv-cache", dynamic=dyn)


def test_interface_and_ops(llama_cached):
    original, ir, report, _ = llama_cached
    layers = 2
    assert ir.input_names == ["input_ids", "attention_mask", "past_attention_mask"] + [
        f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    assert ir.output_names[:2] == ["logits", "present_attention_mask"]
    spec = {s.name: s for s in ir.inputs}
    assert spec["past_key_0"].shape == ["batch", 2, "past", 16]  # GQA: cached at the 2 KV heads, not 4
    gen = ir.meta["generation"]
    assert gen["layers"] == layers and gen["static"] is False
    ops = ir.op_counts()
    assert ops["aten.scaled_dot_product_attention"] == layers
    assert ops["aten.cat"] >= 2 * layers + 1  # K and V per layer, plus the padding mask
    rec = report.passes[-1]
    assert rec["stats"]["gqa"] == layers and rec["verify"]["passed"]
    assert "next-token predictions checked over 1 prompt batch (32 decoding steps each" in rec["verify"]["message"]


@pytest.mark.parametrize("name, attn, pipeline", [
    ("hf_gpt2", "sdpa", "cleanup,kv-cache"),
    ("hf_gpt2", "sdpa", "cleanup,kv-cache(static=true,max_len=48)"),
    ("hf_llama", "sdpa", "cleanup,kv-cache(static=true,max_len=64)"),
    ("hf_llama", "eager", "cleanup,fuse,kv-cache"),          # GQA through fuse-attention, fused RoPE
    ("nanogpt", None, "cleanup,fuse-attention,kv-cache"),    # learned positions, tril-buffer mask
    ("shakespeare", "eager", "cleanup,fuse,kv-cache"),        # the trained model
])
def test_decoding_equivalence_on_real_models(name, attn, pipeline):
    if name == "shakespeare" and not (MODELS.parents[1].parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent (the Shakespeare factory reads its held-out text)")
    model, ex, dyn = _factory(name, **({"attn_implementation": attn} if attn else {}))
    _, ir, report, _ = graphopt.optimize(model, ex, pipeline, dynamic=dyn)
    v = report.passes[-1]["verify"]
    assert v["passed"], v["message"]
    assert v["figures"]["tokens_compared"] >= 64


def test_verification_catches_a_wrong_cache(llama):
    """The equivalence check can fail: feed the cache back shifted by one position."""
    from graphopt_kvcache.decoding import decoding_equivalence

    model, ex, dyn = llama
    original = graphopt.capture(model, ex, dyn)
    _, ir, _, _ = graphopt.optimize(model, ex, "kv-cache", dynamic=dyn, verify=False)
    gen = ir.meta["generation"]
    broken = ir.copy()
    gm = broken.graph_module
    for n in gm.graph.nodes:  # drop the newest key of layer 0 from what the next step sees
        if n.op == "output":
            leaves = list(n.args[0])
            k = broken.output_names.index("present_key_0")
            with gm.graph.inserting_before(n):
                leaves[k] = gm.graph.call_function(torch.ops.aten.roll.default, (leaves[k], [1], [2]))
            n.args = (tuple(leaves),)
    broken.recompile()
    assert broken.meta["generation"] == gen
    res = decoding_equivalence(original, broken, [])
    assert not res["passed"] and "diverges" in res["message"] or "exceeds" in res["message"]


@pytest.mark.slow
@pytest.mark.parametrize("target, options", [("onnx", ""), ("onnx", "(static=true,max_len=64)"), ("torch", "")])
def test_generate_matches_eager_greedy(tmp_path, llama, target, options):
    model, ex, dyn = llama
    art = graphopt.compile(model, ex, f"cleanup,kv-cache{options}", target=target, out=tmp_path / "a", dynamic=dyn)
    assert art.manifest["generation"]["kind"] == "kv-cache"
    eng = graphopt.load(art.path)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    got = eng.generate(ids, 24, attention_mask=mask)
    assert torch.equal(got, _eager_greedy(model, ids, mask, 24))
    steps = list(eng.stream(ids, 3, attention_mask=mask))
    assert [s.shape[1] for s in steps] == [12, 13, 14]


@pytest.mark.parametrize("name, attn, cache", [
    ("hf_gpt2", "sdpa", "kv-cache"),                                 # learned absolute positions
    ("hf_gpt2", "sdpa", "kv-cache(static=true,max_len=48)"),
    ("nanogpt", None, "kv-cache"),                                   # wpe(arange(T)), no mask input
    ("hf_llama", "sdpa", "kv-cache"),                                # RoPE
])
def test_left_padded_rows_decode_as_each_prompt_alone(tmp_path, name, attn, cache):
    """Positions count each row's real tokens (cumsum of the padding mask, as HF generate does),
    so a left-padded batch of mixed lengths decodes every prompt as it decodes alone, for
    absolute position embeddings too (numbering from the first column would shift them)."""
    model, ex, dyn = _factory(name, **({"attn_implementation": attn} if attn else {}))
    art = graphopt.compile(model, ex, f"cleanup,fuse-attention,{cache}", target="onnx", out=tmp_path / "a",
                           dynamic=dyn, report=None)
    assert art.report["passes"][-1]["stats"]["row_positions"] >= 1
    eng = graphopt.load(art.path)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 60, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :8] = 0  # lengths 10, 7 and 2
    got = eng.generate(ids, 12, attention_mask=mask)
    assert torch.equal(got, _eager_greedy(model, ids, mask, 12, keyword=isinstance(ex, dict)))


def test_refuses_graphs_without_canonical_attention():
    from graphopt_kvcache.kv_cache import KVCache

    model, ex, dyn = _factory("hf_llama", attn_implementation="eager")
    ir = graphopt.capture(model, ex, dyn)
    with pytest.raises(graphopt.PassError, match="needs canonical attention.*fuse-attention"):
        KVCache().requires(ir)


def test_inserts_fuse_attention_when_the_pipeline_lacks_it():
    model, ex, dyn = _factory("hf_llama", attn_implementation="eager")
    _, ir, report, _ = graphopt.optimize(model, ex, "kv-cache", dynamic=dyn)
    assert [r["name"] for r in report.passes] == ["fuse-attention", "kv-cache"]
    assert "fuse-attention inserted before kv-cache (it needs it)" in report.data["notes"]
    assert ir.meta["generation"]["kind"] == "kv-cache"


def test_refuses_static_without_max_len():
    with pytest.raises(graphopt.PassOptionError, match="max_len"):
        graphopt.passes.resolve("kv-cache(static=true)", graphopt.get_plugin_manager().passes)


def test_refuses_a_static_sequence_dim(llama):
    """compile/optimize add the dims kv-cache needs before capture; a graph captured without them
    (a GraphIR given as it is) is refused."""
    model, ex, _ = llama
    ir = graphopt.capture(model, ex)
    with pytest.raises(graphopt.PassError, match="dynamic sequence dim"):
        graphopt.optimize(ir, None, "kv-cache")


class _BiasedDecoder(torch.nn.Module):
    """A decoder whose mask carries position biases (ALiBi-like): not causal+padding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 32)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 1, 16).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t)
        bias = -(pos[None, :] - pos[:, None]).abs().float() * 0.5
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(y.transpose(1, 2).reshape(b, t, 16))


def test_refuses_masks_with_position_biases():
    ids = torch.randint(0, 32, (2, 8))
    with pytest.raises(graphopt.PassError, match="other than 0 and -inf"):
        graphopt.optimize(_BiasedDecoder().eval(), (ids,), "kv-cache", dynamic={"input_ids": {1: (2, 32)}})


def test_refuses_bidirectional_attention():
    model, ex, dyn = _factory("minilm", attn_implementation="sdpa")
    with pytest.raises(graphopt.PassError):
        graphopt.optimize(model, {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]},
                          "kv-cache", dynamic={k: v for k, v in dyn.items() if k != "token_type_ids"})


MATRIX = [(m, attn, cache, target)
          for m, attn in (("nanogpt", None), ("hf_gpt2", "eager"), ("hf_llama", "eager"), ("shakespeare", "eager"))
          for cache in ("kv-cache", "kv-cache(static=true,max_len=64)")
          for target in ("onnx", "torch")]


@pytest.mark.matrix
@pytest.mark.parametrize("name, attn, cache, target", MATRIX, ids=[f"{m}-{c.split('(')[0]}{'-static' if '(' in c else ''}-{t}"
                                                                   for m, _, c, t in MATRIX])
def test_generation_matrix(tmp_path, name, attn, cache, target):
    """Every sample decoder x dynamic/static cache x onnx/torch: compile (the equivalence policy
    verifies the cache), then Engine.generate must give the eager model's greedy tokens.
    Slow (16 compiles): run with `pytest -m matrix`."""
    if name == "shakespeare" and not (MODELS.parents[1].parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent (the Shakespeare factory reads its held-out text)")
    model, ex, dyn = _factory(name, **({"attn_implementation": attn} if attn else {}))
    art = graphopt.compile(model, ex, f"cleanup,fuse,{cache}", target=target, out=tmp_path / "a", dynamic=dyn)
    if name == "hf_gpt2" and target == "torch":
        # GPT-2's Conv1D (view(-1, H) -> addmm -> view) makes torch.export guard seq != 1: the compile
        # narrows the range and decoding refuses clearly. Known limitation, see the issue notes.
        assert any("seq >= 2" in n for n in art.report["lowering"]["notes"])
        with pytest.raises(graphopt.InputError, match="rejects single-token steps"):
            graphopt.load(art.path).generate((ex["input_ids"])[:2, :8], 4)
        return
    assert art.report["passes"][-1]["verify"]["passed"]
    eng = graphopt.load(art.path)
    ids = (ex["input_ids"] if isinstance(ex, dict) else ex[0])[:2, :8]
    got = eng.generate(ids, 16)
    seq = ids
    with torch.no_grad():
        for _ in range(16):
            out = model(input_ids=seq).logits if isinstance(ex, dict) else model(seq)
            seq = torch.cat([seq, out[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
