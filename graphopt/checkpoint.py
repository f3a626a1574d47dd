"""A Hugging Face checkpoint directory as a model: ``graphopt compile path/to/checkpoint``.

Users of real LLMs hold a directory written by ``save_pretrained`` (``config.json``, one or more
``*.safetensors`` shards with their ``model.safetensors.index.json``, tokenizer files), not a
factory file. :func:`load_checkpoint` turns such a directory into what ``compile`` needs:

- the module: transformers' Auto classes from local files only (never the network),
  ``AutoModelForCausalLM`` for decoders (tried first), ``AutoModel`` for encoders; the dtype of the
  config (``dtype`` / ``torch_dtype``) unless one is given; ``attn_implementation="sdpa"`` (the
  canonical attention the fusion and KV-cache passes match); ``use_cache=False`` (graphopt's
  ``kv-cache`` pass inserts the cache into the graph); eval mode, no gradients.
- the weights: transformers 5 memory-maps every safetensors shard (``safe_open(backend="mmap")``)
  and materializes each tensor straight into the model built on the meta device, so loading adds
  no second full copy (a dtype conversion, e.g. ``--dtype float32`` on a bf16 checkpoint, is the
  one case that has to write new tensors). Pickled ``*.bin`` weights are refused: loading a model
  must not run code from a file.
- example inputs: a short built-in text tokenized with the directory's tokenizer, batch 2 and
  length >= 2 so that ``torch.export`` keeps both dims dynamic (it specializes dims of size 1);
  ``{"input_ids", "attention_mask"}``.
- dynamic dims: batch 1..8 and sequence 1..min(max_position_embeddings, 4096), overridable.
- the tokenizer: the directory's ``tokenizer.json`` (or one converted from a fast AutoTokenizer),
  which ``compile`` ships in the artifact so ``graphopt generate DIR --prompt`` can tokenize.

Every way a directory can be wrong (no config.json, no weights, an architecture this transformers
does not know, an unreadable shard, no tokenizer) is a :class:`~graphopt.errors.ModelLoadError`
naming the file and the fix.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

#: ``--dtype`` / ``dtype=`` names → torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The text the example inputs are tokenized from (two rows: batch 2).
EXAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog, and the compiler checks every pass against the "
    "original graph before it writes the artifact.",
    "Once upon a time, in a small town by the sea, a programmer measured how many tokens per second "
    "her model could decode on one machine.",
)
EXAMPLE_TOKENS = 16  # tokens per example row (fewer if the dynamic range says so)
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ = 4096

DynamicSpec = dict[str, dict[int, tuple[int, int]]]


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` made of a directory: ``compile`` takes the first four."""

    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic: DynamicSpec
    tokenizer: Path | None  # a tokenizers ``tokenizer.json`` to ship in the artifact
    path: Path
    config: Any = None
    dtype: torch.dtype = torch.float32
    weight_files: list[Path] = field(default_factory=list)


def is_checkpoint_dir(spec: str | Path) -> bool:
    """True when ``spec`` names an existing directory (a model spec that is not ``file.py:factory``)."""
    try:
        return Path(spec).is_dir()
    except (OSError, ValueError):
        return False


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` → ``torch.bfloat16``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return DTYPES[key]


def load_checkpoint(path: str | Path, *, dtype: str | torch.dtype | None = None,
                    dynamic: DynamicSpec | None = None, layers: int | None = None) -> Checkpoint:
    """Load the checkpoint directory ``path`` (config.json + safetensors + tokenizer).

    Args:
        path: the directory ``save_pretrained`` wrote.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` (or a torch dtype); default: the config's.
        dynamic: ``{input: {dim: (min, max)}}`` merged over the defaults (batch 1..8, sequence
            1..min(max_position_embeddings, 4096)); the example inputs are sized to fit it.
        layers: keep only the first N decoder layers (the embeddings, final norm and head stay):
            a draft model for speculative decoding made from the target's own checkpoint.

    Raises:
        ModelLoadError: the directory lacks a file, names an architecture this transformers does
            not know, or holds a file that cannot be read; the message names the file and the fix.
        InputError: an unknown ``dtype``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"checkpoint directory {folder} does not exist")
    want_dtype = resolve_dtype(dtype)
    config = _read_config(folder)
    if layers is not None:
        total = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, bool) or not isinstance(layers, int) or total is None or not 1 <= layers <= total:
            raise InputError(f"layers={layers!r}: {folder} has {total} decoder layers; keep between 1 and {total}"
                             if total is not None else f"layers={layers!r}: {folder}'s config.json has no "
                             "num_hidden_layers, so its layers cannot be cut")
        config.num_hidden_layers = layers
    weights = _weight_files(folder)
    tokenizer, tok_json = _load_tokenizer(folder)
    dyn = default_dynamic(config)
    for name, dims in (dynamic or {}).items():
        dyn.setdefault(name, {}).update({int(d): (int(r[0]), int(r[1])) for d, r in dims.items()})
    example = _example_inputs(tokenizer, config, dyn, folder)
    dyn = {k: v for k, v in dyn.items() if k in example}
    the_dtype = want_dtype or config_dtype(config)
    module = _load_module(folder, config, the_dtype, cut=layers is not None)
    return Checkpoint(module=module, example_inputs=example, dynamic=dyn, tokenizer=tok_json, path=folder,
                      config=config, dtype=the_dtype, weight_files=weights)


def config_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint was saved in (``dtype``, older ``torch_dtype``), float32 if none."""
    raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(raw, torch.dtype):
        return raw
    if isinstance(raw, str) and raw.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[raw.lower().removeprefix("torch.")]
    return torch.float32


def default_dynamic(config: Any) -> DynamicSpec:
    """Batch 1..8 and sequence 1..min(max_position_embeddings, 4096) for both inputs."""
    max_pos = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ
    dims = {0: (1, DEFAULT_MAX_BATCH), 1: (1, min(int(max_pos), DEFAULT_MAX_SEQ))}
    return {"input_ids": dict(dims), "attention_mask": dict(dims)}


# -- the pieces -----------------------------------------------------------------------------------

def _read_config(folder: Path) -> Any:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint directory; save the model with "
            "model.save_pretrained(dir) (config.json + model.safetensors), or give MODEL as path/to/file.py:factory")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_file} is not readable JSON ({e}); rewrite it with config.save_pretrained(dir)") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelLoadError(f"{cfg_file} has no \"model_type\"; it must be a transformers config "
                             "(config.save_pretrained(dir) writes one)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError) as e:
        import transformers

        raise ModelLoadError(
            f"{cfg_file}: model_type {raw['model_type']!r} is not an architecture transformers "
            f"{transformers.__version__} knows ({_first_line(e)}); upgrade transformers, or load the model "
            "yourself in a path/to/file.py:factory") from None
    except Exception as e:
        raise ModelLoadError(f"{cfg_file} could not be read by transformers: {_first_line(e)}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors shards the checkpoint holds, each header checked readable (cheap: the
    header only, the tensors stay on disk)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index (a JSON with \"weight_map\"): {e}; "
                                 "re-save the checkpoint with model.save_pretrained(dir)") from None
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shard(s) {missing} that are not in {folder}; copy the missing "
                                 "shards next to it (or re-save the checkpoint)")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise ModelLoadError(
                f"{folder} holds only pickled weights ({', '.join(pickled)}); graphopt loads safetensors only "
                "(a pickle can run code). Convert once: AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(dir, safe_serialization=True)")
        raise ModelLoadError(f"{folder} has no weights: no model.safetensors (or *.safetensors shards with "
                             "model.safetensors.index.json); save them with model.save_pretrained(dir)")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file ({_first_line(e)}); the file is "
                                 "truncated or corrupt: copy it again or re-save the checkpoint") from None
    return files


def _load_tokenizer(folder: Path) -> tuple[Any, Path]:
    """``(tokenizer, tokenizer.json to ship)``: the directory's ``tokenizer.json`` read with
    ``tokenizers``; without one, a fast AutoTokenizer (from ``vocab.json`` + ``merges.txt``,
    ``tokenizer.model``, ...) saved as a tokenizer.json in a temporary folder removed at exit."""
    tok_file = folder / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tok_file)), tok_file
        except Exception as e:
            raise ModelLoadError(f"{tok_file} is not a readable tokenizers file ({_first_line(e)}); save it again "
                                 "with tokenizer.save_pretrained(dir)") from None
    fix = (f"{folder} has no tokenizer.json, which graphopt needs to make example inputs and to ship with the "
           "artifact (graphopt generate --prompt); save the model's tokenizer next to it with "
           "AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{fix} ({_first_line(e)})") from None
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"{fix} (its {type(auto).__name__} has no fast tokenizers backend to convert)")
    if not backend.encode(EXAMPLE_TEXTS[0]).ids:  # transformers builds an empty tokenizer from no files at all
        raise ModelLoadError(f"{fix} (AutoTokenizer finds no vocabulary there)")
    tmp = Path(tempfile.mkdtemp(prefix="graphopt-tokenizer-"))
    backend.save(str(tmp / "tokenizer.json"))
    atexit.register(shutil.rmtree, tmp, True)  # compile copies it into the artifact before then
    return backend, tmp / "tokenizer.json"


def _example_inputs(tokenizer: Any, config: Any, dynamic: DynamicSpec, folder: Path) -> dict[str, torch.Tensor]:
    """Batch 2 x up to 16 tokens of :data:`EXAMPLE_TEXTS` (sizes clipped to the dynamic ranges;
    at least 2 each where the range allows, so torch.export keeps the dims symbolic)."""
    spec = dynamic.get("input_ids", {})
    b_lo, b_hi = spec.get(0, (2, 2))
    t_lo, t_hi = spec.get(1, (EXAMPLE_TOKENS, EXAMPLE_TOKENS))
    batch = max(b_lo, min(2, b_hi))
    length = max(t_lo, min(EXAMPLE_TOKENS, t_hi))
    rows = []
    for i in range(batch):
        text = EXAMPLE_TEXTS[i % len(EXAMPLE_TEXTS)]
        ids = tokenizer.encode(text).ids
        while ids and len(ids) < length:  # a tokenizer with long tokens: repeat the text
            ids = ids + tokenizer.encode(" " + text).ids
        if len(ids) < length:
            raise ModelLoadError(f"the tokenizer of {folder} encodes the example text into no tokens; check "
                                 "tokenizer.json")
        rows.append(ids[:length])
    input_ids = torch.tensor(rows, dtype=torch.int64)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and int(input_ids.max()) >= int(vocab):
        raise ModelLoadError(f"the tokenizer of {folder} gives token id {int(input_ids.max())}, beyond the model's "
                             f"vocab_size {vocab} (config.json): the tokenizer belongs to another model; save the "
                             "model's own tokenizer into the directory")
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def model_class(config: Any) -> Any:
    """``AutoModelForCausalLM`` for decoders (first), ``AutoModel`` for encoders.

    ``config.architectures`` decides when it is there (``*ForCausalLM`` / ``*LMHeadModel`` →
    decoder); without it, a config in the causal-LM mapping and not in the masked-LM one (BERT is in
    both: an encoder) is a decoder. Encoder-decoder models are refused (no single graph)."""
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
        AutoModel,
        AutoModelForCausalLM,
    )

    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"model_type {config.model_type!r} is an encoder-decoder; graphopt compiles decoder-only and encoder-only "
            "checkpoints directly. Compile the encoder or the decoder from a path/to/file.py:factory")
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:
        causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and type(config) not in MODEL_FOR_MASKED_LM_MAPPING
    return AutoModelForCausalLM if causal else AutoModel


def _load_module(folder: Path, config: Any, dtype: torch.dtype, cut: bool = False) -> torch.nn.Module:
    """``cut``: the config keeps fewer layers than the weights hold, so transformers' report of the
    weights left unused (the other layers') is expected and not shown."""
    if cut:
        from transformers.utils import logging as hf_logging

        before = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return _load_module(folder, config, dtype)
        finally:
            hf_logging.set_verbosity(before)
    cls = model_class(config)
    if hasattr(config, "use_cache"):
        config.use_cache = False  # the kv-cache pass inserts the cache into the graph
    try:
        try:
            model, info = cls.from_pretrained(str(folder), config=config, dtype=dtype, attn_implementation="sdpa",
                                              local_files_only=True, output_loading_info=True)
        except ValueError as e:
            if "sdpa" not in str(e).lower():
                raise
            log.info("%s does not support sdpa attention; loading with its default attention", config.model_type)
            model, info = cls.from_pretrained(str(folder), config=config, dtype=dtype, local_files_only=True,
                                              output_loading_info=True)
    except Exception as e:
        raise ModelLoadError(f"loading {folder} with {cls.__name__} failed: {_first_line(e)}; check that its "
                             "weights match config.json (re-save with model.save_pretrained(dir))") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would only warn and leave them random: a silently wrong model
        raise ModelLoadError(f"the weights in {folder} lack {len(missing)} tensor(s) the {type(model).__name__} of "
                             f"config.json needs (e.g. {', '.join(missing[:3])}): the safetensors belong to another "
                             "model or are incomplete; re-save the checkpoint with model.save_pretrained(dir)")
    model.eval()
    model.requires_grad_(False)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)[:300]
