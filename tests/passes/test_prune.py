"""prune: structured heads / channels with dependency fixing (HF Llama with GQA, fused or not, GPT-2's
Conv1D + merged QKV, MiniLM), the shrunk-equals-masked invariant on fresh inputs, blocked groups,
unstructured magnitude / Wanda and 2:4 masks, lowering to onnx and torch, option errors, and Wanda
beating magnitude on the trained Shakespeare decoder."""

from __future__ import annotations

import json

import pytest
import torch
from graphopt_prune import dependency, rewrite
from graphopt_prune.sites import get_constant
from torch import nn

import graphopt
from graphopt.errors import PassError, PassOptionError
from graphopt.model_loader import load_factory
from graphopt.verify.verifier import make_verification_inputs

torch.set_num_threads(2)
aten = torch.ops.aten


_BASES: dict = {}


def _base(spec: str, pipeline: str = "cleanup"):
    """(module, a copy of the captured graph after ``pipeline``): captured once per module."""
    if (spec, pipeline) not in _BASES:
        model, inputs, dynamic = load_factory(spec)
        _, ir, report, _ = graphopt.optimize(model, inputs, pipeline, dynamic=dynamic)
        _BASES[spec, pipeline] = (model, ir)
    model, ir = _BASES[spec, pipeline]
    return model, ir.copy()


def _prune(ir, pipeline: str):
    """Run ``pipeline`` on ``ir`` with full per-pass verification; every pass must pass."""
    _, out, report, _ = graphopt.optimize(ir, pipeline=pipeline)
    for p in report.passes:
        assert p["verify"]["passed"], (p["name"], p["verify"]["message"])
    return out, report


def _w(ir, name):
    return tuple(
        get_constant(
            ir.graph_module, next(n for n in ir.graph.nodes if n.op == "get_attr" and n.target == name)
        ).shape
    )


def _fresh(ir, seed):
    return make_verification_inputs(ir, n_random=1, seed=seed)[1]


LLAMA, GPT2, MINILM = (
    "samples/models/hf_llama.py:build",
    "samples/models/hf_gpt2.py:build",
    "samples/models/minilm.py:build",
)


# -- structured: what the graph looks like after --------------------------------------------------
@pytest.fixture(scope="module")
def llama_heads():
    return _prune(_base(LLAMA)[1], "prune(structure=heads,amount=0.5)")


def test_gqa_heads_shrink_with_their_kv_group(llama_heads):
    ir, report = llama_heads
    stats = report.passes[-1]["stats"]
    # tiny Llama: 4 query heads over 2 KV heads of 16 dims per layer → 2 units; one goes per layer
    assert stats["units_total"] == 4 and stats["units_removed"] == 2 and stats["shrink_vs_mask_err"] < 1e-5
    assert _w(ir, "model.layers.0.self_attn.q_proj.weight") == (32, 64)  # 2 of 4 query heads
    assert _w(ir, "model.layers.0.self_attn.k_proj.weight") == (16, 64)  # 1 of 2 KV heads
    assert _w(ir, "model.layers.0.self_attn.v_proj.weight") == (16, 64)
    assert _w(ir, "model.layers.0.self_attn.o_proj.weight") == (64, 32)
    assert _w(ir, "model.layers.0.mlp.up_proj.weight") == (128, 64)  # FFN untouched
    # repeat_kv's expand/reshape now carry 1 KV head x 2 = 2 query heads
    expands = [n for n in ir.graph.nodes if n.target is aten.expand.default]
    assert expands and all(list(n.args[1])[1:3] == [1, 2] for n in expands)
    assert stats["params_after"] == stats["params_before"] - 2 * 6144 == ir.param_count()
    assert "model.layers.1.self_attn" in stats["layers"]
    assert report.passes[-1]["verify"]["policy"].startswith("metric")
    assert "ppl_ratio" in report.passes[-1]["verify"]["figures"]


def test_channels_shrink_gate_up_down_together():
    ir, report = _prune(_base(LLAMA)[1], "prune(structure=channels,amount=0.25,scope=layer)")
    stats = report.passes[-1]["stats"]
    assert stats["units_removed"] == 2 * 32 and stats["groups"] == 2
    for layer in (0, 1):
        assert _w(ir, f"model.layers.{layer}.mlp.gate_proj.weight") == (96, 64)
        assert _w(ir, f"model.layers.{layer}.mlp.up_proj.weight") == (96, 64)
        assert _w(ir, f"model.layers.{layer}.mlp.down_proj.weight") == (64, 96)
        assert _w(ir, f"model.layers.{layer}.self_attn.q_proj.weight") == (64, 64)


def test_after_fuse_merged_qkv_split_and_gqa_sdpa():
    ir, report = _prune(_base(LLAMA, "cleanup,fuse")[1], "prune(structure=heads,amount=0.5)")
    assert report.passes[-1]["stats"]["units_removed"] == 2
    splits = [list(n.args[1]) for n in ir.graph.nodes if n.target is aten.split_with_sizes.default]
    assert [32, 16, 16] in splits and [128, 128] in splits  # QKV shrunk, gate/up untouched
    sdpa = [n for n in ir.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2 and all(n.kwargs.get("enable_gqa") for n in sdpa)
    assert [tuple(n.meta["val"].shape[1:2]) for n in sdpa] == [(2,), (2,)]


@pytest.mark.parametrize("structure", ["heads", "channels"])
def test_phi3_sliced_qkv_and_chunked_gate_up(structure):
    """Phi-3's one qkv_proj is cut by constant slices that tile its output, its gate_up_proj by chunk:
    both are splits to the tracer, so heads and channels prune (the shrunk graph equals the masked one)."""
    import transformers as tf

    cfg = tf.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
                        attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    model = tf.Phi3ForCausalLM(cfg).eval()
    _, ir, report, _ = graphopt.optimize(model, {"input_ids": torch.randint(0, 128, (2, 8))},
                                         pipeline=f"cleanup,fuse,prune(structure={structure},amount=0.5)")
    stats = report.passes[-1]["stats"]
    assert report.passes[-1]["verify"]["passed"] and stats["groups"] == 2 and not stats["blocked"]
    assert stats["shrink_vs_mask_err"] < 1e-5 and stats["units_removed"] == (2 if structure == "heads" else 128)
    if structure == "heads":
        bounds = [tuple(n.args[2:4]) for n in ir.graph.nodes if n.target is aten.slice.Tensor and n.args[1] == 2]
        assert bounds[:3] == [(0, 32), (32, 48), (48, 64)]  # q, k, v of the one KV head left per layer


def test_before_fuse_the_fusions_still_apply():
    """prune first, then fuse: later passes are held to the pruned graph (the verifier's baseline
    moves after a lossy pass), and attention still fuses with GQA."""
    _, report = _prune(_base(LLAMA)[1], "prune(structure=heads,amount=0.5),fuse")
    stats = {p["name"]: p["stats"] for p in report.passes}
    assert stats["prune"]["units_removed"] == 2
    assert stats["fuse-attention"]["attention_fused"] == 2 and stats["fuse-attention"]["gqa"] == 2
    assert report.passes[-1]["verify"]["checked_against"] == "the graph after the last lossy pass"


# -- the invariant: shrunk graph == original with the removed units' consumer columns zeroed -----
CASES = {
    "llama": (LLAMA, "cleanup"),
    "llama-fused": (LLAMA, "cleanup,fuse"),
    "gpt2": (GPT2, "cleanup"),
    "gpt2-fused": (GPT2, "cleanup,fuse"),
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.matrix) if c == "gpt2-fused" else c for c in CASES]
)
def test_shrunk_equals_masked_on_fresh_inputs(case):
    _, ir = _base(*CASES[case])
    groups = [g for g in dependency.trace(ir.graph_module) if not g.blocked]
    kinds = sorted(g.kind for g in groups)
    assert kinds == ["channels", "channels", "heads", "heads"], [(g.label, g.kind, g.blocked) for g in groups]
    plan = [(g, list(range(1, g.units))) for g in groups]  # drop unit 0 everywhere
    masked = rewrite.masked_copy(ir.graph_module, plan)
    inputs = _fresh(ir, seed=11)
    with torch.no_grad():
        dense = ir.graph_module(*inputs)[0]
        want = masked(*inputs)[0]
        for g, keep in plan:
            rewrite.apply(ir.graph_module, g, keep)
        ir.recompile()
        got = ir.graph_module(*inputs)[0]
    assert (want - dense).abs().max() > 1e-2  # masking did change the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_blocked_group_is_left_alone_with_its_reason():
    class Leaky(nn.Module):  # the FFN's hidden activations also feed the output: channels cannot go
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.down(h), h.mean(-1)

    torch.manual_seed(0)
    model = Leaky().eval()
    _, ir, report, _ = graphopt.optimize(model, (torch.randn(2, 5, 16),), "prune(structure=channels)")
    stats = report.passes[-1]["stats"]
    assert stats["units_removed"] == 0 and report.passes[-1]["changed"] is False
    assert any("reduces over the pruned dim" in r for r in stats["blocked"].values()), stats
    assert _w(ir, "up.weight") == (32, 16)


def test_a_wrong_dependency_fix_is_caught(monkeypatch):
    """If the rewrite kept other units in the consumer than in the producers, the shrunk-vs-masked
    self-check must refuse the result."""
    real = rewrite.apply

    def wrong(gm, group, keep):
        real(gm, group, keep)
        for _chain, site in group.sinks:  # consumers now read the dropped units' columns
            w = get_constant(gm, site.weight)
            rewrite.replace_constant(gm, site.node, site.weight, w.flip(site.in_dim))

    monkeypatch.setattr(rewrite, "apply", wrong)
    with pytest.raises(PassError, match="differs from the original with the same units masked"):
        graphopt.optimize(_base(LLAMA)[1], pipeline="prune(structure=channels,amount=0.5)")


# -- lowering: onnx and torch run the smaller graphs -----------------------------------------------
@pytest.mark.parametrize(
    "spec,base,pipeline",
    [
        (LLAMA, "cleanup,fuse", "prune(structure=heads,amount=0.5),prune(structure=channels,amount=0.25)"),
        pytest.param(
            GPT2,
            "cleanup",
            "prune(structure=heads,amount=0.5),prune(structure=channels,amount=0.5)",
            marks=pytest.mark.matrix,
        ),
        pytest.param(
            GPT2,
            "cleanup,fuse",
            "prune(structure=heads,amount=0.5),prune(structure=channels,amount=0.5)",
            marks=pytest.mark.matrix,
        ),
    ],
)
@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_structured_artifacts_run(spec, base, pipeline, target, tmp_path):
    model, ir = _base(spec, base)
    art = graphopt.compile(ir, pipeline=pipeline, target=target, out=tmp_path / "a", report=None)
    assert art.manifest["verification"]["passed"] and art.report["lowering"]["verify"]["passed"]
    stats = [p["stats"] for p in art.report["passes"]]
    assert all(s["units_removed"] > 0 for s in stats)
    assert art.report["passes"][-1]["params_after"] < stats[0]["params_before"]
    fresh = dict(zip(ir.input_names, _fresh(ir, seed=5)))
    got = graphopt.load(tmp_path / "a")(**fresh)["logits"]
    with torch.no_grad():
        dense = model(**fresh).logits
    assert got.shape == dense.shape
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), dense.flatten(1)).min()
    assert 0.3 < float(cos) < 0.99999  # pruned: related, not equal


@pytest.mark.matrix
@pytest.mark.parametrize("structure", ["heads", "channels"])
@pytest.mark.parametrize("base", ["cleanup", "cleanup,fuse"])
@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_minilm_structured_matrix(structure, base, target, tmp_path):
    model, ir = _base(MINILM, base)
    art = graphopt.compile(
        ir,
        pipeline=f"prune(structure={structure},amount=0.25)",
        target=target,
        out=tmp_path / "a",
        report=None,
    )
    assert art.manifest["verification"]["passed"] and art.report["lowering"]["verify"]["passed"]
    stats = art.report["passes"][-1]["stats"]
    assert stats["units_removed"] > 0 and stats["shrink_vs_mask_err"] < 1e-4
    inputs = dict(zip(ir.input_names, ir.example_inputs))
    out = graphopt.load(tmp_path / "a")(**inputs)["last_hidden_state"]
    assert out.shape == model(**inputs).last_hidden_state.shape


@pytest.mark.matrix
def test_minilm_heads_and_channels():
    ir, report = _prune(
        _base(MINILM, "cleanup,fuse")[1],
        "prune(structure=heads,amount=0.25),prune(structure=channels,amount=0.25)",
    )
    heads, channels = (p["stats"] for p in report.passes[-2:])
    assert heads["units_total"] == 6 * 12 and heads["units_removed"] == 18
    assert channels["units_total"] == 6 * 1536 and channels["units_removed"] == 2304
    assert heads["shrink_vs_mask_err"] < 1e-4 and channels["shrink_vs_mask_err"] < 1e-4
    assert report.passes[-1]["verify"]["figures"]["mean_cosine"] > 0.5  # token cosine of the hidden states


# -- unstructured and 2:4 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_masks():
    return {s: _prune(_base(LLAMA)[1], f"prune(structure={s})") for s in ("unstructured", "2:4")}


def test_unstructured_magnitude_half_of_every_matrix(llama_masks):
    ir, report = llama_masks["unstructured"]
    stats = report.passes[-1]["stats"]
    assert stats["weights_pruned"] == 14 and stats["sparsity"] == 0.5  # 7 linears x 2 layers
    w = get_constant(
        ir.graph_module, next(n for n in ir.graph.nodes if n.target == "model.layers.0.mlp.up_proj.weight")
    )
    assert int((w == 0).sum()) == w.numel() // 2
    w0 = _base(LLAMA)[1].graph_module.get_parameter("model.layers.0.mlp.up_proj.weight").detach()
    assert float(w0.abs()[w != 0].min()) >= float(w0.abs()[w == 0].max())  # the smallest ones went
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert (
            int(
                (
                    get_constant(ir.graph_module, next(n for n in ir.graph.nodes if n.target == name)) == 0
                ).sum()
            )
            == 0
        )
    assert ir.meta["sparsity"]["pattern"] == "unstructured"


def test_two_four_pattern_recorded(llama_masks, tmp_path):
    ir, report = llama_masks["2:4"]
    assert ir.meta["sparsity"]["pattern"] == "2:4" and len(ir.meta["sparsity"]["weights"]) == 14
    for name in ir.meta["sparsity"]["weights"]:
        w = get_constant(
            ir.graph_module, next(n for n in ir.graph.nodes if n.op == "get_attr" and n.target == name)
        )
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)  # linear: groups of 4 along in-features
        assert bool((zeros >= 2).all()), name
    art = graphopt.compile(ir, pipeline="", target="onnx", out=tmp_path / "a", report=None, verify=False)
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["sparsity"]["pattern"] == "2:4"


def test_gpt2_conv1d_masks_along_in_features():
    ir, report = _prune(_base(GPT2)[1], "prune(structure=2:4)")
    assert report.passes[-1]["stats"]["weights_pruned"] == 8
    w = get_constant(
        ir.graph_module, next(n for n in ir.graph.nodes if n.target == "transformer.h.0.mlp.c_fc.weight")
    )
    assert tuple(w.shape) == (64, 256)  # Conv1D: [in, out]
    assert bool(((w.t().reshape(256, -1, 4) == 0).sum(-1) >= 2).all())


def test_2_4_runs_on_sparse_tensor_cores():
    if not torch.cuda.is_available():
        pytest.skip("to_sparse_semi_structured needs a CUDA GPU with sparse tensor cores (sm80+); none here")
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip(f"to_sparse_semi_structured needs sm80+; this GPU is sm{major}x")
    from torch.sparse import to_sparse_semi_structured

    model, inputs, dynamic = load_factory(LLAMA, hidden_size=128, intermediate_size=256)
    ir, _ = _prune(graphopt.capture(model, inputs, dynamic), "prune(structure=2:4)")
    name = ir.meta["sparsity"]["weights"][0]
    w = get_constant(ir.graph_module, next(n for n in ir.graph.nodes if n.target == name)).half().cuda()
    x = torch.randn(64, w.shape[1], dtype=torch.half, device="cuda")
    sparse = to_sparse_semi_structured(w)
    torch.testing.assert_close(
        torch.nn.functional.linear(x, sparse), torch.nn.functional.linear(x, w), rtol=1e-2, atol=1e-2
    )


# -- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,match",
    [
        ("prune(method=wanda)", "needs calibration data"),
        ("prune(structure=2:4,amount=0.3)", "always removes 2 of every 4"),
        ("prune(amount=1.5)", "must be a fraction"),
        ("prune(structure=rows)", "must be one of"),
    ],
)
def test_option_errors(text, match):
    from graphopt.passes.pipeline import resolve
    from graphopt.plugins import get_plugin_manager

    with pytest.raises(PassOptionError, match=match):
        resolve(text, get_plugin_manager().passes)


def test_cli_bad_calibration_file_exits_2(tmp_path, capsys):
    from graphopt.cli import main

    rc = main(
        [
            "compile",
            "samples/models/hf_llama.py:build",
            "--pipeline",
            f"prune(method=wanda,calib={tmp_path}/missing.txt,tokenizer=x.json)",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "missing.txt" in capsys.readouterr().err


# -- Wanda ----------------------------------------------------------------------------------------
def test_wanda_keeps_small_weights_on_large_activations(tmp_path):
    """Feature 0 carries activations 100x the others and has the smallest weights: magnitude drops
    its weights, Wanda (|W| x ||X||, calibrated on an .npz) keeps them."""
    import numpy as np

    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8, bias=False), nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.head(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = Proj().eval()
    with torch.no_grad():
        model.fc.weight[:, 0] = 0.01 * model.fc.weight[:, 0].sign()
        model.fc.weight[:, 1:] = model.fc.weight[:, 1:].sign() * (0.5 + model.fc.weight[:, 1:].abs())
    scale = torch.ones(8)
    scale[0] = 100.0
    calib = torch.randn(64, 3, 8) * scale
    np.savez(tmp_path / "calib.npz", x=calib.numpy())
    example = (torch.randn(2, 3, 8) * scale,)
    kept = {}
    for method in ("magnitude", "wanda"):
        extra = f",calib={tmp_path}/calib.npz" if method == "wanda" else ""
        _, ir, report, _ = graphopt.optimize(
            model, example, f"prune(method={method},amount=0.25,exclude=head{extra})", verify=False
        )
        w = get_constant(ir.graph_module, next(n for n in ir.graph.nodes if n.target == "fc.weight"))
        kept[method] = int((w[:, 0] != 0).sum())
        assert report.passes[-1]["stats"]["sparsity"] == 0.25
    assert kept == {"magnitude": 0, "wanda": 8}, kept


# -- quality on the trained decoder ---------------------------------------------------------------
@pytest.mark.matrix  # ~70 s here: two perplexity runs of 64 windows through the fx graph
def test_wanda_beats_magnitude_on_the_trained_decoder():
    from tests.conftest import load_sample_model

    sample = load_sample_model("shakespeare")
    try:
        model, inputs, dynamic = sample.build()
        heldout = sample.heldout_ids()
    except FileNotFoundError as e:
        pytest.skip(f"trained Shakespeare checkpoint or data missing: {e}")
    from graphopt.verify.metrics import heldout_perplexity

    base = graphopt.capture(model, inputs, dynamic)
    calib = (
        f"calib={sample.DATA_PATH},calib_fraction=0.9,calib_samples=32,calib_seq=128,"
        f"tokenizer={sample.TOKENIZER}"
    )
    ppl = {}
    for method, extra in (("magnitude", ""), ("wanda", "," + calib)):
        _, ir, report, _ = graphopt.optimize(
            base.copy(), pipeline=f"prune(method={method},amount=0.5{extra})", n_random=0
        )
        assert report.passes[-1]["stats"]["sparsity"] == 0.5
        ppl[method] = heldout_perplexity(
            lambda x, ir=ir: ir.graph_module(x, torch.ones_like(x))[0], heldout, window=128, max_windows=64
        )
    # measured: dense 39.53, magnitude 40.58, Wanda 40.39 on these 64 windows (whole held-out split: 48.91,
    # 49.67, 49.54). A small model gives a small gap; on the first 16 windows alone magnitude is ahead.
    assert ppl["wanda"] < ppl["magnitude"], ppl
