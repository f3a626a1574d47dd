"""Calibration data: the inputs that lossy passes (quantization, Wanda pruning) observe.

One function turns whatever a user has into input sets a graph can run::

    from graphopt.calibration import load_calibration
    sets = load_calibration("calib.txt", ir=ir, tokenizer="tokenizer.json", max_samples=32, seq_len=128)
    for flat in sets:                  # each: a list of tensors in ir.input_names order
        ir.run(flat)

Sources (``source``):

- a **text file** (any suffix but ``.npz``): tokenized with the model's tokenizer (a
  ``tokenizers`` ``tokenizer.json`` path, a ``tokenizers.Tokenizer``, a Hugging Face tokenizer,
  or a ``str -> list[int]`` callable). ``text_mode="stream"`` (the default; decoders) encodes the
  whole text as one string and cuts it into ``seq_len``-token windows; ``"lines"`` (encoders)
  encodes every non-empty line as one sample, truncated to ``seq_len``, and pads a batch to its
  longest line (``attention_mask`` marks the padding). ``text_span=(0.0, 0.9)`` keeps only that
  fraction of the characters (e.g. a training split, so calibration never sees held-out text);
- an **.npz** file: one array per graph input name, samples along dim 0 (``numpy.savez(
  input_ids=ids, attention_mask=mask)``); it is read without unpickling;
- a **Python iterable** (API only): each item a dict ``{input name: tensor/array}``, a
  tuple/list in input order, a single tensor (the first input), or a string (tokenized).

Inputs the source does not give are filled the way a tokenizer would: ``attention_mask`` with
ones on real tokens (zeros on padding), ``token_type_ids`` / ``position_ids``-free models with
zeros; any other missing input is an error naming it. Samples are grouped ``batch_size`` rows at a
time (default: 1 when the graph's batch dim is dynamic, else the example batch size).

Determinism: the same source gives the same sets, in the same order (no shuffling; windows are
taken evenly spaced over the text), so :func:`fingerprint` of the sets identifies the data —
the quantization plugin keys cached scales by it.

Errors are :class:`CalibrationError` (a :class:`graphopt.errors.InputError`): a missing, empty,
unreadable or corrupt source, or one whose arrays do not match the graph's inputs, with a message
naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graphopt.errors import InputError

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR

log = logging.getLogger(__name__)

__all__ = ["CalibrationError", "fingerprint", "load_calibration", "load_tokenizer"]

#: Inputs filled when a source gives token ids only: name → fill value for real tokens.
_FILLABLE = {"attention_mask": 1, "token_type_ids": 0}


class CalibrationError(InputError):
    """The calibration source is missing, empty, corrupt, or does not fit the graph's inputs."""


def load_calibration(
    source: Any,
    *,
    ir: GraphIR | None = None,
    input_names: Sequence[str] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    tokenizer: Any = None,
    max_samples: int = 32,
    seq_len: int = 128,
    batch_size: int | None = None,
    text_mode: str = "stream",
    text_span: tuple[float, float] = (0.0, 1.0),
) -> list[list[torch.Tensor]]:
    """Load calibration input sets for a graph.

    Args:
        source: a text file path, an ``.npz`` path, or an iterable of samples (see the module doc).
        ir: the graph the sets are for (gives input names, dtypes and example inputs). Without it,
            pass ``input_names`` (and ``example_inputs`` for dtypes).
        tokenizer: how to tokenize text (see :func:`load_tokenizer`); required for text.
        max_samples: at most this many samples (rows) in total.
        seq_len: tokens per text sample.
        batch_size: rows per returned set; default 1 for dynamic batch graphs, else the example
            batch size (a static batch dim must be matched).
        text_mode: ``"stream"`` or ``"lines"``.
        text_span: ``(start, end)`` fractions of the text's characters to use.

    Returns:
        A list of input sets, each a list of tensors in the graph's input order.

    Raises:
        CalibrationError: the source is missing, empty, corrupt or does not fit the graph.
    """
    names = list(ir.input_names if ir is not None else (input_names or []))
    examples = list(ir.example_inputs if ir is not None else (example_inputs or []))
    if not names:
        raise CalibrationError("load_calibration needs the graph's inputs: pass ir= or input_names=")
    if max_samples < 1 or seq_len < 1:
        raise CalibrationError(f"max_samples ({max_samples}) and seq_len ({seq_len}) must be >= 1")
    if batch_size is None:
        batch_size = _default_batch(ir, examples)
    rows: list[dict[str, torch.Tensor]]
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration source {path} does not exist; pass a text file, an .npz or "
                                   "(API) an iterable of input dicts")
        if not path.is_file():
            raise CalibrationError(f"calibration source {path} is not a file")
        if path.suffix.lower() == ".npz":
            rows = _rows_from_npz(path, names, max_samples)
        else:
            text = _read_text(path)
            rows = _rows_from_text(text, str(path), tokenizer, names, max_samples, seq_len, text_mode, text_span)
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, torch.Tensor, np.ndarray)):
        rows = _rows_from_iterable(source, names, tokenizer, max_samples, seq_len)
    else:
        raise CalibrationError(f"calibration source of type {type(source).__name__} is not supported; pass a "
                               "text file path, an .npz path, or an iterable of input dicts/tuples/tensors")
    if not rows:
        raise CalibrationError(f"calibration source {_describe(source)} holds no samples; give it at least one")
    cache = _cache_inputs(ir)
    if not cache:
        return _batch(rows, names, examples, batch_size, _describe(source))
    # a kv-cache graph (calibrate after kv-cache): the text is a prefill, the cache starts empty
    data_names = [n for n in names if n not in cache]
    data_examples = [e for n, e in zip(names, examples) if n not in cache]
    sets = _batch(rows, data_names, data_examples, batch_size, _describe(source))
    out = []
    for data in sets:
        by_name = dict(zip(data_names, data))
        b = int(data[0].shape[0])
        out.append([by_name[n] if n in by_name else cache[n](b) for n in names])
    return out


def _cache_inputs(ir: GraphIR | None) -> dict[str, Any]:
    """For a graph with a KV cache (``ir.meta["generation"]``): input name -> ``f(batch)`` giving its
    prefill value (an empty dynamic cache, a zeroed static one, position 0)."""
    gen = (ir.meta.get("generation") or {}) if ir is not None else {}
    if not gen:
        return {}
    from graphopt.ir.graph_ir import dtype_from_name

    specs = {s.name: s for s in ir.inputs}
    makers: dict[str, Any] = {}
    for name in gen.get("cache_inputs", []):
        spec = specs[name]

        def empty(b: int, spec=spec) -> torch.Tensor:
            shape = [b if i == 0 else (0 if isinstance(d, str) else int(d)) for i, d in enumerate(spec.shape)]
            return torch.zeros(shape, dtype=dtype_from_name(spec.dtype))
        makers[name] = empty
    if gen.get("cache_position"):
        makers[gen["cache_position"]] = lambda b: torch.zeros(1, dtype=torch.int64)
    return makers


def fingerprint(sets: Sequence[Sequence[torch.Tensor]]) -> str:
    """sha256 over the dtypes, shapes and bytes of every tensor of every set, in order."""
    h = hashlib.sha256()
    for flat in sets:
        h.update(b"set")
        for t in flat:
            a = t.detach().cpu().contiguous()
            h.update(f"{a.dtype}{tuple(a.shape)}".encode())
            h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def load_tokenizer(tokenizer: Any) -> Callable[[str], list[int]]:
    """A ``str -> list[int]`` encoder from a ``tokenizer.json`` path, a ``tokenizers.Tokenizer``,
    a Hugging Face tokenizer, or a callable (returned as is)."""
    if tokenizer is None:
        raise CalibrationError("text calibration data needs the model's tokenizer: pass tokenizer= (a "
                               "tokenizer.json path or object), or give an .npz of token ids instead")
    if isinstance(tokenizer, (str, Path)):
        p = Path(tokenizer)
        if not p.is_file():
            raise CalibrationError(f"tokenizer file {p} does not exist")
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise CalibrationError(f"tokenizer file {p} is not a readable tokenizers tokenizer.json ({e})") from None
        tok.no_padding()
        tok.no_truncation()
        return lambda s: tok.encode(s).ids
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        def _encode(s: str) -> list[int]:
            out = encode(s)
            return list(getattr(out, "ids", out))
        return _encode
    if callable(tokenizer):
        return tokenizer
    raise CalibrationError(f"tokenizer of type {type(tokenizer).__name__} has no encode(); pass a tokenizer.json "
                           "path, a tokenizers.Tokenizer, a Hugging Face tokenizer or a str -> ids callable")


# -- sources ------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"calibration file {path} cannot be read ({e})") from None
    if b"\x00" in data[:4096]:
        raise CalibrationError(f"calibration file {path} is binary, not text; text files are tokenized, "
                               "token ids go in an .npz (numpy.savez(input_ids=...))")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text ({e}); save it as UTF-8") from None
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty; give it text to calibrate on")
    return text


def _rows_from_text(text: str, where: str, tokenizer: Any, names: list[str], max_samples: int, seq_len: int,
                    mode: str, span: tuple[float, float]) -> list[dict[str, torch.Tensor]]:
    lo, hi = span
    if not 0.0 <= lo < hi <= 1.0:
        raise CalibrationError(f"text_span={span} must satisfy 0 <= start < end <= 1")
    text = text[int(lo * len(text)): int(hi * len(text))]
    encode = load_tokenizer(tokenizer)
    ids_name = _ids_name(names)
    if mode == "lines":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise CalibrationError(f"calibration file {where} has no non-empty line in the span {span}")
        pick = _evenly(len(lines), max_samples)
        out = []
        for i in pick:
            ids = encode(lines[i])[:seq_len]
            if ids:
                out.append({ids_name: torch.tensor(ids, dtype=torch.int64)})
        return out
    if mode != "stream":
        raise CalibrationError(f"text_mode={mode!r} must be 'stream' or 'lines'")
    ids = encode(text)
    if len(ids) < seq_len:
        raise CalibrationError(f"calibration file {where} gives {len(ids)} tokens, fewer than one window of "
                               f"seq_len={seq_len}; give more text or a smaller seq_len")
    n_windows = len(ids) // seq_len
    starts = [k * seq_len for k in _evenly(n_windows, max_samples)]
    t = torch.tensor(ids, dtype=torch.int64)
    return [{ids_name: t[s: s + seq_len].clone()} for s in starts]


def _rows_from_npz(path: Path, names: list[str], max_samples: int) -> list[dict[str, torch.Tensor]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise CalibrationError(f"calibration file {path} is not a readable .npz ({type(e).__name__}: {e}); "
                               "write it with numpy.savez(input_ids=..., attention_mask=...)") from None
    if not arrays:
        raise CalibrationError(f"calibration file {path} holds no arrays; save one array per input "
                               f"({', '.join(names)}) with samples along dim 0")
    unknown = [k for k in arrays if k not in names]
    if unknown:
        raise CalibrationError(f"calibration file {path} has arrays {unknown} that are not inputs of the graph; "
                               f"the inputs are {names}")
    counts = {k: (a.shape[0] if a.ndim else 0) for k, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise CalibrationError(f"calibration file {path}: every array needs the same number (>= 1) of samples "
                               f"along dim 0, got {counts}")
    n = next(iter(counts.values()))
    return [{k: torch.from_numpy(np.ascontiguousarray(a[i])) for k, a in arrays.items()}
            for i in _evenly(n, max_samples)]


def _rows_from_iterable(source: Iterable, names: list[str], tokenizer: Any, max_samples: int,
                        seq_len: int) -> list[dict[str, torch.Tensor]]:
    rows: list[dict[str, torch.Tensor]] = []
    encode = None
    for k, item in enumerate(source):
        if len(rows) >= max_samples:
            break
        if isinstance(item, str):
            encode = encode or load_tokenizer(tokenizer)
            sample = {_ids_name(names): torch.tensor(encode(item)[:seq_len], dtype=torch.int64)}
        elif isinstance(item, Mapping):
            unknown = [n for n in item if n not in names]
            if unknown:
                raise CalibrationError(f"calibration sample #{k} has inputs {unknown} that the graph lacks; "
                                       f"its inputs are {names}")
            sample = {n: _tensor(v, f"sample #{k} input {n!r}") for n, v in item.items()}
        elif isinstance(item, (tuple, list)):
            if len(item) > len(names):
                raise CalibrationError(f"calibration sample #{k} has {len(item)} positional inputs; the graph "
                                       f"takes {len(names)} ({', '.join(names)})")
            sample = {n: _tensor(v, f"sample #{k} input {n!r}") for n, v in zip(names, item)}
        else:
            sample = {names[0]: _tensor(item, f"sample #{k}")}
        rows.extend(_split_rows(sample, k))
    return rows[:max_samples]


def _split_rows(sample: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """A batched sample ``[N, ...]`` (every tensor with ndim >= 2 and equal dim 0) → N rows; a 1-D
    sample is one row."""
    if all(t.dim() >= 2 for t in sample.values()):
        counts = {t.shape[0] for t in sample.values()}
        if len(counts) != 1:
            raise CalibrationError(f"calibration sample #{k}: inputs disagree on the batch size {sorted(counts)}")
        return [{n: t[i] for n, t in sample.items()} for i in range(counts.pop())]
    return [sample]


def _tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    try:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(v)))
    except Exception as e:
        raise CalibrationError(f"calibration {what} is not an array ({type(v).__name__}: {e})") from None


# -- batching -----------------------------------------------------------------------------------
def _batch(rows: list[dict[str, torch.Tensor]], names: list[str], examples: list[torch.Tensor],
           batch_size: int, where: str) -> list[list[torch.Tensor]]:
    sets = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        if len(chunk) < batch_size and sets:
            break  # a static batch must be matched; a short tail is dropped (never padded with fakes)
        sets.append(_stack(chunk, names, examples, where))
    return sets


def _stack(chunk: list[dict[str, torch.Tensor]], names: list[str], examples: list[torch.Tensor],
           where: str) -> list[torch.Tensor]:
    lengths = [max((t.shape[0] for t in r.values() if t.dim() >= 1), default=0) for r in chunk]
    longest = max(lengths)
    flat = []
    for idx, name in enumerate(names):
        example = examples[idx] if idx < len(examples) else None
        dtype = example.dtype if example is not None else None
        cols = []
        for r, n_tok in zip(chunk, lengths):
            if name in r:
                t = r[name]
            elif name in _FILLABLE:
                t = torch.full((n_tok,), _FILLABLE[name], dtype=torch.int64)
            else:
                raise CalibrationError(f"calibration source {where} gives no {name!r}; it gives "
                                       f"{sorted(r)}, the graph needs {names}")
            if dtype is not None and t.dtype != dtype:
                if t.is_floating_point() and not dtype.is_floating_point:
                    raise CalibrationError(f"calibration input {name!r} is {t.dtype}, the graph wants {dtype}")
                t = t.to(dtype)
            if t.dim() >= 1 and t.shape[0] < longest:
                t = _pad(t, longest)
            cols.append(t)
        try:
            stacked = torch.stack(cols)
        except RuntimeError as e:
            raise CalibrationError(f"calibration input {name!r}: samples of different shapes cannot form a batch "
                                   f"({e})") from None
        if example is not None and stacked.dim() != example.dim():
            raise CalibrationError(f"calibration input {name!r} has rank {stacked.dim()} after batching, the graph "
                                   f"wants rank {example.dim()} (shape like {tuple(example.shape)})")
        flat.append(stacked)
    return flat


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 0 to ``length`` with zeros (pad id 0; in an attention mask 0 = padding)."""
    pad = torch.zeros((length - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad])


def _default_batch(ir: GraphIR | None, examples: list[torch.Tensor]) -> int:
    if ir is not None and ir.inputs and ir.inputs[0].shape and 0 not in ir.inputs[0].dynamic and examples:
        return int(examples[0].shape[0])
    return 1


def _ids_name(names: list[str]) -> str:
    return "input_ids" if "input_ids" in names else names[0]


def _evenly(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (deterministic)."""
    if n <= k:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"({type(source).__name__})"
