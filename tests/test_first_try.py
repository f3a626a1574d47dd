"""graphopt called the way a new user calls it: no factory-declared dynamic dims, a single prompt as
the example, default pipelines, models that are not the samples. Each test is one of the failures
users reported (issue "First try works"); they now work, or fail with a typed error naming the fix.

Length limits of generate, half-precision weights and verification tolerances on real text have
their own modules (test_engine_api.py, test_half_precision.py, test_verification_tolerance.py).
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import InputError, PipelineError

VOCAB = 128


def _config(family: str, **kw):
    import transformers as tf

    common = dict(vocab_size=VOCAB, use_cache=kw.pop("use_cache", False), attn_implementation=kw.pop("attn", "sdpa"))
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=128, **common, **kw)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=128, **common, **kw)
    if family == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common, **kw)
    raise ValueError(family)


def _model(family: str, seed: int = 0, **kw):
    cls, cfg = _config(family, **kw)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def _prompt(batch: int = 1, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy_reference(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by the eager module, recomputing the whole prefix each step."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=seq).logits[:, -1, :]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


# -- 1. kv-cache with one prompt as the example ----------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_single_prompt_kv_cache_with_nothing_declared(tmp_path, family):
    """`compile(model, (ids[1, 8],), pipeline="kv-cache")`: no dynamic dims, no fuse, batch 1."""
    model = _model(family)
    ids = _prompt()
    art = graphopt.compile(model, (ids,), pipeline="kv-cache", target="onnx", out=tmp_path / "a", report=None)
    notes = " | ".join(art.report["notes"])
    assert "fuse-attention inserted before kv-cache" in notes
    assert "dynamic dims added for kv-cache" in notes and "capture widened the example" in notes
    eng = graphopt.load(art.path)
    spec = {s.name: s for s in eng.inputs}
    assert spec["input_ids"].dynamic[0][0] == 1 and spec["input_ids"].dynamic[1] == (1, 128)
    prompt = _prompt(seed=7, length=5)  # a fresh prompt of another length
    got = eng.generate(prompt, max_new_tokens=12)
    assert torch.equal(got, _greedy_reference(model, prompt, 12))
    two = torch.cat([prompt, _prompt(seed=8, length=5)])  # batch 2 from a batch-1 example
    assert torch.equal(eng.generate(two, max_new_tokens=6), _greedy_reference(model, two, 6))
    # 2. generation past the compiled length is an error up front, never a silently shorter result
    with pytest.raises(InputError, match="exceeds the 128 tokens"):
        eng.generate(prompt, max_new_tokens=200)
    cut = eng.generate(prompt, max_new_tokens=200, truncate=True)
    assert cut.shape[1] == 128 and cut.stop_reason == "length"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_model_with_its_configs_default_use_cache(tmp_path, family):
    """Hugging Face configs default to ``use_cache=True``, and the model then returns its own
    DynamicCache, which torch.export cannot capture: graphopt captures with ``use_cache=False``
    (restored afterwards), says so in the notes, and the kv-cache artifact decodes as the model."""
    model = _model(family, use_cache=True)
    ids = _prompt(batch=2, length=8)
    art = graphopt.compile(model, {"input_ids": ids}, pipeline="cleanup,fuse,kv-cache", target="onnx",
                           out=tmp_path / "a", report=None)
    assert model.config.use_cache is True  # the caller's model is left as it was
    assert any("use_cache=False" in n for n in art.report["notes"])
    prompt = _prompt(seed=5, length=6)
    assert torch.equal(graphopt.load(art.path).generate(prompt, max_new_tokens=8),
                       _greedy_reference(model, prompt, 8))


def test_batch_two_example_with_only_the_sequence_declared(tmp_path):
    """Was: `AssertionError: Cannot create Dim with inconsistent min=2, max=2`."""
    model = _model("llama")
    ids = _prompt(batch=2)
    art = graphopt.compile(model, {"input_ids": ids}, pipeline="cleanup,fuse,kv-cache", target="onnx",
                           out=tmp_path / "a", dynamic={"input_ids": {1: (1, 64)}}, report=None)
    eng = graphopt.load(art.path)
    assert eng.inputs[0].dynamic[1] == (1, 64)  # the declared range wins
    prompt = _prompt(seed=3)
    assert torch.equal(eng.generate(prompt, max_new_tokens=8), _greedy_reference(model, prompt, 8))


def test_batch_declared_dynamic_with_a_batch_one_example(tmp_path):
    """Was: torch.export's `Constraints violated (batch)`."""
    model = _model("qwen2")
    ids = _prompt()
    dyn = {"input_ids": {0: (1, 8), 1: (1, 64)}, "attention_mask": {0: (1, 8), 1: (1, 64)}}
    art = graphopt.compile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           pipeline="cleanup,fuse,kv-cache", target="onnx", out=tmp_path / "a", dynamic=dyn, report=None)
    assert art.manifest["inputs"][0]["dynamic"] == {"0": [1, 8], "1": [1, 64]}
    rec = art.report["passes"][-1]["verify"]
    assert rec["passed"] and rec["figures"]["tokens_compared"] > 0


def test_a_declared_range_the_pass_cannot_use_is_a_typed_error():
    model = _model("llama")
    with pytest.raises(InputError, match=r"kv-cache needs dim 1 of 'input_ids' dynamic"):
        graphopt.optimize(model, {"input_ids": _prompt()}, "kv-cache", dynamic={"input_ids": {1: (8, 8)}}, verify=False)


def test_kv_cache_needs_a_registered_fuse_attention(monkeypatch):
    """The prerequisite is inserted from the registry; without the plugin that provides it, a
    PipelineError names what is missing."""
    from graphopt.passes.pipeline import resolve
    from graphopt.plugins import get_plugin_manager

    registry = get_plugin_manager().passes
    names = [p.name for p in resolve("cleanup,kv-cache", registry)]
    assert names.index("fuse-attention") == names.index("kv-cache") - 1
    monkeypatch.delitem(registry.passes, "fuse-attention")
    with pytest.raises(PipelineError, match="fuse-attention"):
        resolve("kv-cache", registry)


# -- 4. API input errors are typed -----------------------------------------------------------
def test_dynamic_in_torch_exports_positional_list_form():
    """Was: `TypeError: unhashable type: 'dict'`."""
    model = _model("llama")
    ir = graphopt.capture(model, (_prompt(batch=2),), dynamic=[{1: (1, 64)}])
    assert ir.inputs[0].dynamic == {1: (1, 64)}


@pytest.mark.parametrize("dynamic, match", [
    ([{1: (1, 64)}, {1: (1, 64)}], "2 entries but there are 1 positional"),
    ({"input_ids": {1: (64, 1)}}, "min 64 > max 1"),
    ({"input_ids": {1: 64}}, r"must be \(min, max\)"),
    ({"input_ids": {"seq": (1, 64)}}, "dims are ints"),
    ({"ids": {1: (1, 64)}}, "unknown input 'ids'"),
    ({"input_ids": {1: (1.5, 64)}}, "non-negative ints"),
    ("input_ids:1=1..64", "must be a dict"),
    ({"input_ids": {1: (9, 64)}}, "outside its dynamic range"),
])
def test_bad_dynamic_specs_are_input_errors(dynamic, match):
    model = _model("llama")
    with pytest.raises(InputError, match=match):
        graphopt.capture(model, (_prompt(),), dynamic=dynamic)


def test_dynamic_list_form_with_keyword_examples_is_an_input_error():
    with pytest.raises(InputError, match="give a dict"):
        graphopt.capture(_model("llama"), {"input_ids": _prompt()}, dynamic=[{1: (1, 64)}])


# -- 5. a lossy pass before kv-cache ---------------------------------------------------------
LOSSY = ["quantize(scheme=int8-weight)", "quantize(scheme=int4-weight)", "w8a8",
         "prune(structure=channels,amount=0.25)", "precision(dtype=bf16)"]
SHAKESPEARE_W8A8 = ("calibrate(calib=../shared/data/tinyshakespeare.txt,text_end=0.9,max_samples=4,"
                    "tokenizer=samples/shakespeare/checkpoint/tokenizer.json),quantize(scheme=w8a8)")


def _shakespeare():
    from graphopt.model_loader import load_factory

    return load_factory("samples/models/shakespeare.py:build", attn_implementation="sdpa")


@pytest.mark.parametrize("lossy", ["quantize(scheme=int4-weight)", "prune(structure=channels,amount=0.25)",
                                   "precision(dtype=bf16)"])
def test_lossy_pass_before_kv_cache_on_the_trained_decoder(lossy):
    """Was: "diverges at new token 3 of row 0 (369 instead of 472)": the check compared with the
    captured graph, not the (lossy) graph kv-cache rewrote."""
    model, ex, dyn = _shakespeare()
    _, ir, report, _ = graphopt.optimize(model, ex, f"cleanup,fuse,{lossy},kv-cache", dynamic=dyn)
    rec = report.passes[-1]["verify"]
    assert rec["passed"], rec["message"]
    assert "vs the graph before kv-cache" in rec["message"]


@pytest.mark.matrix
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("lossy", LOSSY)
@pytest.mark.parametrize("model_name", ["shakespeare", "llama-gqa"])
def test_lossy_passes_compose_with_kv_cache_in_either_order(tmp_path, model_name, lossy, order):
    if model_name == "shakespeare":
        model, ex, dyn = _shakespeare()
        if lossy == "w8a8":
            lossy = SHAKESPEARE_W8A8
    else:
        model, ex, dyn = _model("llama", seed=3), {"input_ids": _prompt(batch=2, length=12)}, None
        if lossy == "w8a8":
            import numpy as np

            np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(0).integers(0, VOCAB, (4, 16)))
            lossy = f"calibrate(calib={tmp_path / 'calib.npz'}),quantize(scheme=w8a8)"
    pipeline = f"cleanup,fuse,{lossy},kv-cache" if order == "before" else f"cleanup,fuse,kv-cache,{lossy}"
    _, ir, report, _ = graphopt.optimize(model, ex, pipeline, dynamic=dyn)
    assert report.data["verification"]["passed"] is not False
    assert all(r["verify"]["passed"] for r in report.passes), [r["verify"]["message"] for r in report.passes]
    assert ir.meta["generation"]["kind"] == "kv-cache"


def test_a_wrong_cache_after_a_lossy_pass_is_still_caught():
    """The relaxed reference (the lossy graph) must not hide a broken cache."""
    from graphopt_kvcache.decoding import decoding_equivalence

    model = _model("llama", seed=5)
    ex = {"input_ids": _prompt(batch=2, length=12)}
    before, lossy, _, _ = graphopt.optimize(model, ex, "cleanup,fuse,quantize(scheme=int8-weight)", verify=False,
                                            dynamic={"input_ids": {0: (1, 8), 1: (1, 64)}})
    _, cached, _, _ = graphopt.optimize(lossy.copy(), None, "kv-cache", verify=False)
    gm = cached.graph_module
    out = cached.output_node()
    leaves = list(out.args[0])
    k = cached.output_names.index("present_key_0")
    with gm.graph.inserting_before(out):
        leaves[k] = gm.graph.call_function(torch.ops.aten.roll.default, (leaves[k], [1], [2]))
    out.args = (tuple(leaves),)
    cached.recompile()
    res = decoding_equivalence(lossy, cached, [])
    assert not res["passed"], res["message"]


@pytest.mark.parametrize("kwargs, match", [
    ({"pipeline": ["cleanup", "kv-cache"]}, "is a list of names; give the text 'cleanup,kv-cache'"),
    ({"pipeline": 3}, "pipeline text such as"),
    ({"verify": "no"}, "True or False"),
    ({"n_random": -1}, "non-negative int"),
    ({"target": None}, "a target name"),
    ({"out": 5}, "a path"),
    ({"report": "pdf"}, "'html'"),
    ({"target_options": "opset=23"}, "a dict of backend options"),
    ({"progress": "yes"}, "a callable"),
])
def test_compile_arguments_are_checked(tmp_path, kwargs, match):
    args = {"pipeline": "cleanup", "out": tmp_path / "a", **kwargs}
    with pytest.raises(InputError, match=match):
        graphopt.compile(_model("llama"), (_prompt(),), **args)
    assert not (tmp_path / "a").exists()


def test_a_model_that_is_not_a_module_is_an_input_error():
    with pytest.raises(InputError, match="torch.nn.Module"):
        graphopt.optimize(lambda x: x, (_prompt(),), "cleanup")


# -- 3. verification without false alarms on real text ----------------------------------------
def test_minilm_one_real_sentence_verifies_with_the_default_pipeline(tmp_path):
    """Was: remove-noops (exact) failing on a 4.5e-8 difference with batch 1."""
    from graphopt.model_loader import load_factory

    model, ex, dyn = load_factory("samples/models/minilm.py:build", batch=1,
                                  sentences=["The quick brown fox jumps over the lazy dog near the river bank."])
    art = graphopt.compile(model, ex, "cleanup,fuse", out=tmp_path / "m", report=None)
    assert art.report["verification"]["passed"] and art.report["lowering"]["verify"]["passed"]


# -- 6. half-precision weights -----------------------------------------------------------------
def test_bf16_decoder_with_kv_cache_on_the_default_target(tmp_path):
    """Was: ONNX Runtime "Could not find an implementation for MatMul(13)", and kv-cache failing its
    fp32 logit tolerance although the tokens were identical."""
    model = _model("qwen2", seed=2).to(torch.bfloat16)
    ids = _prompt(length=6)
    art = graphopt.compile(model, (ids,), pipeline="cleanup,fuse,kv-cache", out=tmp_path / "b", report=None)
    kv = art.report["passes"][-1]["verify"]
    assert kv["passed"] and "bfloat16" in kv["message"], kv["message"]
    assert art.manifest["payload"]["compute_dtype"] == "float32"
    out = graphopt.load(art.path).generate(ids, max_new_tokens=8)
    assert out.shape == (1, 14) and out.stop_reason == "max_new_tokens"


def test_an_unverified_torch_decoder_generates(tmp_path):
    """--no-verify skips the probes that find the smallest past a torch.export program takes; the
    compile still tries an empty past, so generate works on the first try, with the verified
    artifact's tokens."""
    model = _model("llama", seed=6)
    ids = _prompt(2, 8)
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fast = graphopt.compile(model, ex, pipeline="cleanup,fuse,kv-cache", target="torch", out=tmp_path / "fast",
                            verify=False, report=None)
    assert any("past >= 1" in n for n in fast.report["lowering"]["notes"]), fast.report["lowering"]["notes"]
    checked = graphopt.compile(model, ex, pipeline="cleanup,fuse,kv-cache", target="torch", out=tmp_path / "checked",
                               report=None)
    prompt = _prompt(1, 5, seed=9)
    assert torch.equal(graphopt.load(fast.path).generate(prompt, 10), graphopt.load(checked.path).generate(prompt, 10))


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_graphopt_run_replays_a_kv_cache_artifacts_examples(tmp_path, target, capsys):
    """The stored examples of a kv-cache artifact are the model's own inputs: run feeds an empty cache
    (a prefill) and compares the logits with the model's."""
    from graphopt.cli import main

    ids = _prompt(2, 8)
    art = graphopt.compile(_model("qwen2"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           pipeline="cleanup,fuse,kv-cache", target=target, out=tmp_path / "a", report=None)
    assert main(["run", str(art.path)]) == 0
    out = capsys.readouterr().out
    assert "a prefill: empty KV cache" in out and "(ok," in out
