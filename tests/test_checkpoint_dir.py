"""A Hugging Face checkpoint directory is a model: ``graphopt compile DIR`` / ``graphopt.compile("DIR")``.

The checkpoints are real transformers architectures (Qwen2, Llama, BERT) built from configs with
random weights and written with ``save_pretrained``, next to a byte-level BPE tokenizer trained on
tinyshakespeare (tokenizer.json + tokenizer_config.json, as ``save_pretrained`` of a fast tokenizer
writes them). Nothing touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import graphopt
from graphopt.checkpoint import load_checkpoint
from graphopt.cli import main
from graphopt.errors import InputError, ModelLoadError

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
REPO = Path(__file__).resolve().parent.parent
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": 512}
PROMPT = "ROMEO: what light through yonder window"


def corpus_text() -> str:
    if CORPUS.is_file():
        return CORPUS.read_text()[:200_000]
    # a machine without the shared data: any English text trains a usable BPE
    return (REPO / "README.md").read_text() * 4


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    """tokenizer.json + tokenizer_config.json of a 384-token byte-level BPE (within every model's vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()], trainer=trainer, length=1)
    tok.save(str(folder / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def write_checkpoint(folder: Path, tokenizer: Path | None, arch: str = "qwen2", dtype: torch.dtype = torch.float32,
                     **overrides) -> Path:
    from transformers import (
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "bert": (BertConfig, BertModel)}
    config_cls, model_cls = classes[arch]
    fields = {**SMALL, **overrides}
    if arch == "bert":
        fields.pop("num_key_value_heads")
    torch.manual_seed(0)
    model = model_cls(config_cls(**fields)).eval()
    model.to(dtype).save_pretrained(str(folder))
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tokenizer_files) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("qwen"), tokenizer_files, "qwen2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_files) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("llama"), tokenizer_files, "llama")


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- loading --------------------------------------------------------------------------------------

def test_load_gives_module_examples_dynamic_and_tokenizer(qwen_dir):
    ck = load_checkpoint(qwen_dir)
    assert type(ck.module).__name__ == "Qwen2ForCausalLM"
    assert not ck.module.training and not any(p.requires_grad for p in ck.module.parameters())
    assert ck.module.config.use_cache is False  # the kv-cache pass inserts the cache
    assert ck.module.config._attn_implementation == "sdpa"
    ids = ck.example_inputs["input_ids"]
    assert ids.shape == (2, 16) and ids.dtype == torch.int64  # batch and length >= 2: both dims stay dynamic
    assert torch.equal(ck.example_inputs["attention_mask"], torch.ones_like(ids))
    assert not torch.equal(ids[0], ids[1])  # two different texts
    assert ck.dynamic == {"input_ids": {0: (1, 8), 1: (1, 256)}, "attention_mask": {0: (1, 8), 1: (1, 256)}}
    assert ck.tokenizer == qwen_dir / "tokenizer.json"
    # the weights are the checkpoint's, bit for bit
    ref = hf_model(qwen_dir)
    for (n, a), (_, b) in zip(ck.module.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_dynamic_override_sizes_the_examples(qwen_dir):
    ck = load_checkpoint(qwen_dir, dynamic={"input_ids": {1: (1, 8)}, "attention_mask": {1: (1, 8)}})
    assert ck.example_inputs["input_ids"].shape == (2, 8)
    assert ck.dynamic["input_ids"] == {0: (1, 8), 1: (1, 8)}


def test_max_position_caps_the_sequence_range(tmp_path, tokenizer_files):
    ck = load_checkpoint(write_checkpoint(tmp_path, tokenizer_files, "llama", max_position_embeddings=8192))
    assert ck.dynamic["input_ids"][1] == (1, 4096)  # min(max_position_embeddings, 4096)


def test_dtype_from_the_config_and_overridden(tmp_path, tokenizer_files):
    folder = write_checkpoint(tmp_path, tokenizer_files, "qwen2", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_checkpoint(folder).module.model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_checkpoint(folder, dtype="float32").module.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(InputError, match="float32, bfloat16, float16"):
        load_checkpoint(folder, dtype="int3")


def test_an_encoder_loads_with_automodel(tmp_path, tokenizer_files):
    ck = load_checkpoint(write_checkpoint(tmp_path, tokenizer_files, "bert"))
    assert type(ck.module).__name__ == "BertModel"
    out = ck.module(**ck.example_inputs)
    assert out.last_hidden_state.shape == (2, 16, SMALL["hidden_size"])


def test_tokenizer_json_is_made_from_the_slow_tokenizer_files(tmp_path, tokenizer_files):
    """A checkpoint with vocab.json + merges.txt (a GPT-2 style tokenizer) and no tokenizer.json:
    AutoTokenizer builds the fast tokenizer, which is saved as the tokenizer.json to ship."""
    from tokenizers import Tokenizer

    folder = write_checkpoint(tmp_path, None, "qwen2")
    tok = Tokenizer.from_file(str(tokenizer_files / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                               "eos_token": "<|endoftext|>"}))
    ck = load_checkpoint(folder)
    assert ck.tokenizer is not None and ck.tokenizer.is_file() and ck.tokenizer.name == "tokenizer.json"
    assert not (folder / "tokenizer.json").exists()  # the checkpoint itself is left as it was
    shipped = Tokenizer.from_file(str(ck.tokenizer))
    assert shipped.encode(PROMPT).ids == tok.encode(PROMPT).ids
    assert ck.example_inputs["input_ids"][0].tolist() == tok.encode(
        "The quick brown fox jumps over the lazy dog, and the compiler checks every pass").ids[:16]


# -- compiling --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_a_checkpoint_dir_from_python(qwen_dir, tmp_path):
    art = graphopt.compile(str(qwen_dir), pipeline="cleanup,fuse", target="onnx", out=tmp_path / "art", report=None)
    assert art.manifest["verification"]["passed"] is True
    assert art.manifest["tokenizer"] == "tokenizer.json"
    assert (art.path / "tokenizer.json").read_bytes() == (qwen_dir / "tokenizer.json").read_bytes()
    assert art.manifest["model"]["spec"] == str(qwen_dir)
    inputs = {s["name"]: s for s in art.manifest["inputs"]}
    assert inputs["input_ids"]["dynamic"] == {"0": [1, 8], "1": [1, 256]} or \
        inputs["input_ids"]["dynamic"] == {"0": [2, 8], "1": [1, 256]}  # a runtime may narrow batch 1 away
    eng = graphopt.load(art.path)
    ids = torch.randint(0, 384, (3, 11), generator=torch.Generator().manual_seed(1))
    got = eng(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"]
    with torch.no_grad():
        want = hf_model(qwen_dir)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_optimize_takes_a_checkpoint_dir(qwen_dir):
    original, optimized, report, _ = graphopt.optimize(str(qwen_dir), pipeline="cleanup")
    assert original.input_names == ["input_ids", "attention_mask"]
    assert optimized.inputs[0].dynamic == {0: (1, 8), 1: (1, 256)}
    assert report.data["verification"]["enabled"] is True


@pytest.mark.slow
def test_cli_compile_kv_cache_then_generate_from_the_prompt(llama_dir, tmp_path, capsys):
    out = tmp_path / "llama-kv"
    code, stdout, stderr = run_cli(capsys, "compile", llama_dir, "--pipeline", "cleanup,fuse,kv-cache", "--out", out,
                                   "--dynamic", "input_ids:1=1..64", "--dynamic", "attention_mask:1=1..64", "-q")
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == "tokenizer.json" and manifest["generation"]
    code, stdout, stderr = run_cli(capsys, "generate", out, "--prompt", PROMPT, "--max-new-tokens", "8", "-q")
    assert code == 0, stderr
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    ids = torch.tensor([tok.encode(PROMPT).ids])
    model = hf_model(llama_dir)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0)
    assert stdout.rstrip("\n") == tok.decode(want[0].tolist())


@pytest.mark.slow
def test_bf16_from_the_config_on_the_torch_target(tmp_path, tokenizer_files):
    folder = write_checkpoint(tmp_path / "ck", tokenizer_files, "qwen2", dtype=torch.bfloat16)
    art = graphopt.compile(str(folder), pipeline="cleanup,fuse", target="torch", out=tmp_path / "art", report=None)
    assert art.manifest["verification"]["passed"] is True
    eng = graphopt.load(art.path)
    ck = load_checkpoint(folder)
    got = eng(**ck.example_inputs)["logits"]
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        want = ck.module(**ck.example_inputs).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_bf16_from_the_config_on_the_onnx_target(tmp_path, tokenizer_files):
    # ONNX Runtime's CPU provider has no bf16 kernels: the onnx target computes in fp32 and the
    # engine hands back the model's dtype
    folder = write_checkpoint(tmp_path / "ck", tokenizer_files, "qwen2", dtype=torch.bfloat16)
    art = graphopt.compile(str(folder), pipeline="cleanup,fuse", target="onnx", out=tmp_path / "art", report=None)
    assert art.manifest["verification"]["passed"] is True
    eng = graphopt.load(art.path)
    ck = load_checkpoint(folder)
    got = eng(**ck.example_inputs)["logits"]
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        want = ck.module(**ck.example_inputs).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


# -- what a directory can get wrong: ModelLoadError naming the file and the fix, exit 2 --------------

def _break(kind: str, folder: Path, tokenizer_files: Path) -> str:
    """Make ``folder`` a checkpoint broken in one way; return a fragment the message must hold."""
    if kind == "no-config":
        write_checkpoint(folder, tokenizer_files).joinpath("config.json").unlink()
        return "has no config.json"
    if kind == "no-weights":
        write_checkpoint(folder, tokenizer_files).joinpath("model.safetensors").unlink()
        return "has no weights"
    if kind == "pickled-weights":
        write_checkpoint(folder, tokenizer_files).joinpath("model.safetensors").rename(folder / "pytorch_model.bin")
        return "safe_serialization=True"
    if kind == "unknown-architecture":
        write_checkpoint(folder, tokenizer_files)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "graphopt-imaginary"
        (folder / "config.json").write_text(json.dumps(cfg))
        return "model_type 'graphopt-imaginary' is not an architecture transformers"
    if kind == "corrupt-safetensors":
        f = write_checkpoint(folder, tokenizer_files) / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        return "model.safetensors is not a readable safetensors file"
    if kind == "missing-shard":
        write_checkpoint(folder, tokenizer_files)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
        return "model-00002-of-00002.safetensors"
    if kind == "no-tokenizer":
        write_checkpoint(folder, None)
        return "has no tokenizer.json"
    if kind == "wrong-weights":  # weights of another architecture under this config
        write_checkpoint(folder, tokenizer_files)
        other = write_checkpoint(folder.parent / "other", None, "bert")
        shutil.copy(other / "model.safetensors", folder / "model.safetensors")
        return "belong to another model"
    if kind == "tokenizer-of-another-model":
        write_checkpoint(folder, tokenizer_files, vocab_size=100)
        return "beyond the model's vocab_size 100"
    raise AssertionError(kind)


BROKEN = ["no-config", "no-weights", "pickled-weights", "unknown-architecture", "corrupt-safetensors",
          "missing-shard", "no-tokenizer", "wrong-weights", "tokenizer-of-another-model"]


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_checkpoint_is_a_model_load_error(tmp_path, tokenizer_files, kind):
    folder = tmp_path / "ck"
    folder.mkdir()
    fragment = _break(kind, folder, tokenizer_files)
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(folder)
    assert fragment in str(e.value)
    assert str(folder) in str(e.value)  # names the file / folder


@pytest.mark.parametrize("kind", ["no-config", "corrupt-safetensors", "no-tokenizer"])
def test_the_cli_exits_2_on_a_broken_checkpoint(tmp_path, tokenizer_files, capsys, kind):
    folder = tmp_path / "ck"
    folder.mkdir()
    fragment = _break(kind, folder, tokenizer_files)
    code, _, stderr = run_cli(capsys, "compile", folder, "--out", tmp_path / "art")
    assert code == 2, stderr
    assert fragment in stderr and "Traceback" not in stderr
    assert not (tmp_path / "art").exists()


def test_cli_dtype_is_for_checkpoint_dirs(capsys, tmp_path):
    code, _, stderr = run_cli(capsys, "compile", f"{REPO}/samples/models/nanogpt.py:build", "--dtype", "bfloat16",
                              "--out", tmp_path / "art")
    assert code == 2 and "checkpoint directory" in stderr
    with pytest.raises(SystemExit) as e:
        main(["compile", str(tmp_path), "--dtype", "int8"])
    assert e.value.code == 2


def test_a_bad_pipeline_fails_before_the_checkpoint_loads(qwen_dir, capsys, monkeypatch):
    import graphopt.checkpoint as ckmod

    def boom(*a, **k):
        raise AssertionError("loaded the checkpoint before checking the pipeline")

    monkeypatch.setattr(ckmod, "load_checkpoint", boom)
    code, _, stderr = run_cli(capsys, "compile", qwen_dir, "--pipeline", "cleanup,nope")
    assert code == 2 and "unknown pass 'nope'" in stderr


def test_example_inputs_run_through_the_loaded_model(qwen_dir):
    ck = load_checkpoint(qwen_dir)
    with torch.no_grad():
        logits = ck.module(**ck.example_inputs).logits
    assert logits.shape == (2, 16, SMALL["vocab_size"])
    assert np.isfinite(logits.numpy()).all()
