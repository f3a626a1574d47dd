"""Helpers shared by the fusion pass tests: fresh token inputs, and lowering an optimized graph to
the onnx and torch targets with each engine checked against the original module."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

import graphopt


def token_inputs(seed: int, batch: int, seq: int, vocab: int = 256) -> dict[str, torch.Tensor]:
    """Random token ids (seeded, never zeros) and an all-ones attention mask."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def lower_and_compare(optimized: graphopt.GraphIR, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                      out_dir: Path, *, opset: int | None = 23) -> list[onnx.NodeProto]:
    """Compile ``optimized`` (already verified by its pipeline) to onnx and torch, load each, and
    require the module's logits within 1e-4. Returns the ONNX graph's nodes for op checks."""
    with torch.no_grad():
        want = model(**inputs).logits
    nodes: list[onnx.NodeProto] = []
    for target, options in (("onnx", {"opset": opset} if opset else None), ("torch", None)):
        out = out_dir / target
        graphopt.compile(optimized, pipeline="", target=target, out=out, report=None, verify=False,
                         target_options=options)
        if target == "onnx":
            nodes = list(onnx.load(str(out / "model.onnx")).graph.node)
        got = graphopt.load(out)(**inputs)["logits"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return nodes
