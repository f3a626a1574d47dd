"""Nested input/output structures as JSON, so an artifact can rebuild a model's outputs.

A captured graph takes and returns flat lists of tensors. What the user's module returned (a
tensor, a tuple, a dict, a ``ModelOutput``) is kept as a small JSON tree whose leaves index into
that flat list::

    {"type": "dict", "keys": ["logits"], "items": [{"type": "tensor", "index": 0}]}

``ModelOutput`` (and every other ``Mapping``) is stored as a dict: a loaded engine must not need
transformers to rebuild its outputs. The flattening order is the one torch.export's pytree uses
(mappings in insertion order, sequences in order), so the leaves line up with the graph's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from graphopt.errors import CaptureError

Structure = dict


def flatten(obj: Any, is_leaf: Callable[[Any], bool]) -> tuple[list[Any], Structure]:
    """Split ``obj`` into its leaves and the JSON structure that rebuilds it."""
    leaves: list[Any] = []

    def walk(x: Any, path: str) -> Structure:
        if is_leaf(x):
            leaves.append(x)
            return {"type": "tensor", "index": len(leaves) - 1, "name": path or "output"}
        if x is None:
            return {"type": "none"}
        if isinstance(x, Mapping):
            keys = [k for k in x.keys()]
            if not all(isinstance(k, str) for k in keys):
                raise CaptureError(f"output dict at {path or 'top level'} has non-string keys {keys!r}; "
                                   "return a dict keyed by strings")
            return {"type": "dict", "keys": keys,
                    "items": [walk(x[k], f"{path}.{k}" if path else k) for k in keys]}
        if isinstance(x, (tuple, list)):
            return {"type": "tuple" if isinstance(x, tuple) else "list",
                    "items": [walk(v, f"{path}.{i}" if path else f"output_{i}") for i, v in enumerate(x)]}
        if isinstance(x, (int, float, bool, str)):
            return {"type": "const", "value": x}
        raise CaptureError(f"cannot represent a {type(x).__name__} at {path or 'top level'} of the model's "
                           "outputs; return tensors, tuples, lists or dicts of them")

    structure = walk(obj, "")
    return leaves, structure


def unflatten(structure: Structure, leaves: list[Any]) -> Any:
    """Rebuild a nested output from ``structure`` and the flat ``leaves``."""
    kind = structure["type"]
    if kind == "tensor":
        return leaves[structure["index"]]
    if kind == "none":
        return None
    if kind == "const":
        return structure["value"]
    if kind == "dict":
        return {k: unflatten(s, leaves) for k, s in zip(structure["keys"], structure["items"])}
    items = [unflatten(s, leaves) for s in structure["items"]]
    return tuple(items) if kind == "tuple" else items


def leaf_names(structure: Structure) -> list[str]:
    """Names of the tensor leaves in flat order (``logits``, ``output_0``, ``hidden.2``...)."""
    names: dict[int, str] = {}

    def walk(s: Structure) -> None:
        if s["type"] == "tensor":
            names[s["index"]] = s.get("name") or f"output_{s['index']}"
        for child in s.get("items", []):
            walk(child)

    walk(structure)
    return [names[i] for i in sorted(names)]
