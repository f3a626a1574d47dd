"""Tensors of dtypes numpy lacks (bfloat16, float8), stored and passed without loss.

numpy has no bfloat16 (nor float8): ``tensor.numpy()`` raises ``TypeError: Got unsupported
ScalarType BFloat16``. Where graphopt writes tensors to ``.npz`` files (the artifact's example
inputs and expected outputs), such tensors are stored as their raw bits — an unsigned integer
array of the same item size — and the real dtype is recorded beside them (the manifest's
``examples.dtypes``). Reading them back gives torch tensors of the real dtype: there is no numpy
array to give.

Callers may also hand runners ``ml_dtypes`` arrays (``ml_dtypes.bfloat16``, what ``onnx`` uses for
bfloat16): :func:`as_tensor` reads them bit for bit.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch

from graphopt.errors import ArtifactError

#: torch dtypes numpy cannot hold → the unsigned integer dtypes their bits are stored as.
RAW_BITS: dict[torch.dtype, tuple[torch.dtype, type]] = {torch.bfloat16: (torch.uint16, np.uint16)}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        RAW_BITS[getattr(torch, _name)] = (torch.uint8, np.uint8)

#: numpy dtypes for them from ``ml_dtypes`` (a dependency of onnx; what onnx and ONNX tools use), by
#: name: an Engine casts numpy inputs of a bfloat16 artifact to it, and runners read it bit for bit.
ML_DTYPES: dict[str, Any] = {"bfloat16": ml_dtypes.bfloat16}

#: the same dtypes by name (``"bfloat16"``), as manifests and TensorSpecs write them.
RAW_BIT_NAMES: dict[str, torch.dtype] = {str(dt).replace("torch.", ""): dt for dt in RAW_BITS}


def to_storable(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """``t`` as a numpy array for ``np.savez``, plus the dtype name to record when the array holds
    raw bits (``"bfloat16"``), else ``None``."""
    t = t.detach().cpu().contiguous()
    raw = RAW_BITS.get(t.dtype)
    if raw is None:
        return t.numpy(), None
    return t.view(raw[0]).numpy(), str(t.dtype).replace("torch.", "")


def from_stored(name: str, arr: np.ndarray, dtype: str | None) -> np.ndarray | torch.Tensor:
    """The inverse of :func:`to_storable`: ``arr`` unchanged when ``dtype`` is ``None``, else a torch
    tensor of ``dtype`` made from its bits.

    Raises:
        ArtifactError: ``dtype`` is unknown, or ``arr`` is not the raw-bits array it must be.
    """
    if dtype is None:
        return arr
    want = RAW_BIT_NAMES.get(dtype)
    if want is None:
        raise ArtifactError(f"example {name!r} is recorded as dtype {dtype!r}, which this graphopt cannot read "
                            f"(known raw-bit dtypes: {sorted(RAW_BIT_NAMES)}); upgrade graphopt or compile again")
    bits_torch, bits_np = RAW_BITS[want]
    if arr.dtype != bits_np:
        raise ArtifactError(f"example {name!r} is recorded as {dtype} but stored as {arr.dtype}, not as its raw "
                            f"bits ({np.dtype(bits_np).name}); the artifact is damaged: compile it again")
    return torch.from_numpy(np.ascontiguousarray(arr)).view(want)


def is_ml_dtypes_array(x: Any) -> bool:
    """Whether ``x`` is a numpy array of an ``ml_dtypes`` dtype torch knows (bfloat16, float8)."""
    return isinstance(x, np.ndarray) and x.dtype.name in RAW_BIT_NAMES


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A numpy array (``ml_dtypes`` bfloat16/float8 included, bit for bit) as a torch tensor."""
    x = np.ascontiguousarray(x)
    if is_ml_dtypes_array(x):
        want = RAW_BIT_NAMES[x.dtype.name]
        return torch.from_numpy(x.view(RAW_BITS[want][1])).view(want)
    return torch.from_numpy(x)


def to_numpy(t: Any) -> np.ndarray:
    """A tensor (or array) as a plain numpy array a user can read: dtypes numpy lacks are widened
    to float32, which holds every bfloat16 / float8 value exactly."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return (t.float() if t.dtype in RAW_BITS else t).numpy()
    arr = np.asarray(t)
    return arr.astype(np.float32) if is_ml_dtypes_array(arr) else arr


def raw_bit_dtypes(ir: Any) -> dict[str, str]:
    """``{name: "bfloat16"}`` for the inputs and outputs of a GraphIR whose tensors are stored as raw
    bits (what the manifest's ``examples.dtypes`` records)."""
    return {s.name: s.dtype for s in [*ir.inputs, *ir.outputs] if s.dtype in RAW_BIT_NAMES}
