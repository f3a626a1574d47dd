"""A small LLaMA-style decoder TRAINED on tinyshakespeare (real weights, committed).

The checkpoint lives in ``samples/shakespeare/checkpoint/`` (``model.safetensors``,
``config.json``, ``tokenizer.json``, ``training.json``) and was produced by
``samples/shakespeare/train.py``; nothing is ever fetched from the network.
Use it wherever a pass must be judged on quality (held-out perplexity, top-1
agreement) rather than only on numeric closeness to random weights.

``build()`` returns ``(module, {"input_ids", "attention_mask"}, dynamic)``. The
module is a ``transformers.LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, grouped-query
attention, tied embeddings) returning a ``CausalLMOutputWithPast`` whose only
populated field is ``logits`` ``[B, T, vocab]`` (``use_cache=False``).

Data split (shared with ``train.py``, by CHARACTERS of the UTF-8 decoded text):
``n_train = int(0.9 * len(text))``; the training split is ``text[:n_train]`` and the
held-out split is the LAST 10 %, ``text[n_train:]``. The tokenizer was trained on the
training split only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
#: ``../shared/data/tinyshakespeare.txt`` relative to the repo root (see ``shared/data/README.md``).
DATA_PATH = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
#: The committed checkpoint written by ``samples/shakespeare/train.py``.
CHECKPOINT_DIR = REPO_ROOT / "samples" / "shakespeare" / "checkpoint"
#: Shipped in artifacts compiled from this factory (``graphopt generate --prompt`` uses it).
TOKENIZER = CHECKPOINT_DIR / "tokenizer.json"
#: Fraction of the characters used for training; the rest (the end of the file) is held out.
TRAIN_FRACTION = 0.9

#: A prompt for generation demos and tests (the opening of the training text).
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"


def read_text(path: Path | str | None = None) -> str:
    """The whole tinyshakespeare text (1,115,394 characters).

    Raises ``FileNotFoundError`` naming the expected path when the shared data
    folder is absent.
    """
    path = Path(path) if path is not None else DATA_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"tinyshakespeare data not found at {path} (expected ../shared/data/tinyshakespeare.txt "
            "relative to the repo root; see shared/data/README.md)"
        )
    return path.read_text(encoding="utf-8")


def split_text(text: str) -> tuple[str, str]:
    """``(train, heldout)``: the first ``int(0.9 * len(text))`` characters and the rest."""
    n_train = int(TRAIN_FRACTION * len(text))
    return text[:n_train], text[n_train:]


def _check_checkpoint(checkpoint_dir: Path) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (checkpoint_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shakespeare checkpoint incomplete: {', '.join(missing)} missing under {checkpoint_dir} "
            "(retrain with: python samples/shakespeare/train.py)"
        )
    return checkpoint_dir


def load_tokenizer(checkpoint_dir: Path | str = CHECKPOINT_DIR):
    """The byte-level BPE ``tokenizers.Tokenizer`` saved with the checkpoint (no special
    tokens are added on encode; ``decode`` gives back the exact text)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_check_checkpoint(Path(checkpoint_dir)) / "tokenizer.json"))


@functools.lru_cache(maxsize=4)
def _heldout_ids_cached(checkpoint_dir: str, data_path: str) -> torch.Tensor:
    _, heldout = split_text(read_text(data_path))
    ids = load_tokenizer(checkpoint_dir).encode(heldout).ids
    return torch.tensor(ids, dtype=torch.int64)


def heldout_ids(checkpoint_dir: Path | str = CHECKPOINT_DIR, data_path: Path | str | None = None) -> torch.Tensor:
    """Token ids (1-D int64) of the held-out split: the last 10 % of the characters,
    encoded as ONE string with the checkpoint's tokenizer. Cached per process; a
    clone is returned so callers may modify it."""
    data_path = Path(data_path) if data_path is not None else DATA_PATH
    return _heldout_ids_cached(str(Path(checkpoint_dir).resolve()), str(data_path)).clone()


def build(
    attn_implementation: str = "eager",
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    checkpoint_dir: Path | str = CHECKPOINT_DIR,
):
    """Return ``(LlamaForCausalLM in eval mode, inputs dict, dynamic)``.

    Weights come from the committed checkpoint (``from_pretrained`` on a local
    directory, ``local_files_only=True``). Example inputs are ``batch`` windows of
    ``seq_len`` real held-out tokens starting at offsets drawn from a
    ``torch.Generator`` seeded with ``seed`` (so needs ``../shared/data``);
    the attention mask is all ones.

    Dynamic dims: batch in [1, 16], sequence in [2, max_position_embeddings=256].
    """
    from transformers import LlamaForCausalLM

    checkpoint_dir = _check_checkpoint(Path(checkpoint_dir))
    model = LlamaForCausalLM.from_pretrained(
        str(checkpoint_dir),
        local_files_only=True,
        attn_implementation=attn_implementation,
        dtype=torch.float32,
        use_cache=False,
    ).eval()

    ids = heldout_ids(checkpoint_dir)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=g)
    input_ids = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    attention_mask = torch.ones(batch, seq_len, dtype=torch.int64)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    dim_spec = {0: (1, 16), 1: (2, model.config.max_position_embeddings)}
    dynamic = {"input_ids": dict(dim_spec), "attention_mask": dict(dim_spec)}
    return model, inputs, dynamic
