"""Compile a Hugging Face GPT-2 (built from a small config) with the Python API, load the artifact,
run it on a batch size and sequence length it was not captured with, and decode a few tokens.

    python samples/01_compile_and_run/compile_and_run.py --out build/gpt2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import graphopt
from graphopt.model_loader import load_factory

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/gpt2", help="artifact directory")
    ap.add_argument("--target", default="onnx", choices=["onnx", "torch"])
    args = ap.parse_args()

    model, example_inputs, dynamic = load_factory(f"{ROOT}/samples/models/hf_gpt2.py:build")
    art = graphopt.compile(model, example_inputs, pipeline="cleanup", target=args.target, out=args.out,
                           dynamic=dynamic)
    print(f"compiled to {art.path}: verification {'passed' if art.manifest['verification']['passed'] else 'FAILED'}")

    engine = graphopt.load(args.out)
    print(engine)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 24), generator=g)          # not the captured 2 x 16
    mask = torch.ones_like(ids)
    out = engine(input_ids=ids, attention_mask=mask)             # a dict, like the ModelOutput
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    err = (out["logits"] - ref).abs().max().item()
    print(f"logits {tuple(out['logits'].shape)}, max abs error vs PyTorch: {err:.2e}")
    assert err < 1e-4, err

    tokens = engine.generate(ids[:2, :8], max_new_tokens=8)
    print("greedy tokens:", tokens[0].tolist())


if __name__ == "__main__":
    main()
