"""The keys of ``GraphIR.meta``: what capture, passes, the compile and the backends tell each other
through the graph, each with one owner, a type and what it means.

``ir.meta`` is a dict (it travels with the graph through ``GraphIR.copy``, into the manifest and
the report), but not a free-form one: after every pass the manager checks it
(:func:`check_meta`): a key of the wrong type or a private (underscore) key fails the pass with a
:class:`~graphopt.errors.PassError` naming it; a key nobody declared is logged once. A third-party
pass that hands something to a later pass or to its backend declares its key with
:func:`register_key` (state a pass keeps for itself belongs on the pass object, and what passes of
one pipeline hand each other without the graph, in ``PassContext.data``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphopt.errors import PassError

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetaKey:
    """One key of ``GraphIR.meta``: its ``type``, who writes it (``owner``), who reads it."""

    name: str
    type: type | tuple[type, ...]
    owner: str
    readers: str
    doc: str


KEYS: dict[str, MetaKey] = {}


def register_key(name: str, type_: type | tuple[type, ...], owner: str, readers: str, doc: str) -> MetaKey:
    """Declare a ``GraphIR.meta`` key (a third-party pass's; registering the same key again with
    the same owner replaces it, another owner's is a :class:`PassError`)."""
    if not name or name.startswith("_"):
        raise PassError(f"GraphIR.meta key {name!r}: keys are public names (no leading underscore); keep "
                        "a pass's own state on the pass object")
    old = KEYS.get(name)
    if old is not None and old.owner != owner:
        raise PassError(f"GraphIR.meta key {name!r} is {old.owner}'s; choose another name")
    KEYS[name] = key = MetaKey(name, type_, owner, readers, doc)
    return key


for _args in (
    ("capture", str, "capture", "report, manifest", "how the graph was captured: torch.export or symbolic_trace"),
    ("model_class", str, "capture", "report, manifest, default artifact name", "the captured module's class"),
    ("capture_notes", list, "capture, compile", "report", "what capture did for the user (dims widened or "
     "added for a pass, a model cache left out, layers traced once), as sentences"),
    ("capture_widened", list, "capture", "compile (verification inputs)", "size-1 dynamic dims capture widened to 2"),
    ("capture_shape_facts", list, "capture", "the onnx lowering (graphopt.backends.export)", "how many guards and "
     "runtime asserts the trace's shape environment held: the lowering reuses the graph's values while no "
     "pass added to them"),
    ("generation", dict, "kv-cache pass", "Engine.generate, serving, speculative decoding, the lowerings, the "
     "manifest", "the decoder's cached-generation contract: ids, mask, logits, cache inputs/outputs, static "
     "cache length, cache position"),
    ("lowering_check", dict, "passes that change numerics on purpose (quantize, prune, precision, remove-padding)",
     "the lowering check (graphopt.verify.lowering)", "what the lowered artifact is compared with and how: "
     "against (original|optimized), policy (reference|metric), tol, min_cosine, padding_mask"),
    ("padding_removed", dict, "remove-padding", "compile (expected outputs), the lowering check",
     "the mask input whose padded positions the graph now computes as zeros"),
    ("sparsity", dict, "prune", "report, manifest, the TensorRT lowering", "what was pruned: structure, amount, "
     "the 2:4 weights"),
    ("precision", dict, "precision", "report, manifest, lowerings", "the dtype the graph computes in and what "
     "stayed in fp32"),
    ("quantization", dict, "quantize", "report, manifest", "scheme, quantized and skipped layers, guard results"),
    ("tensor_parallel", dict, "tensor-parallel", "the torch lowering (one program per rank), the manifest, "
     "graphopt.load under torchrun", "world_size, sharded_inputs / sharded_outputs ({name: dim}), what was "
     "sharded and what stayed replicated (graphopt.parallel)"),
    ("artifact_files", dict, "any pass", "compile: files shipped in the artifact", "name -> text of files to write "
     "into the artifact (calibration scales, say); listed and checksummed in the manifest"),
):
    register_key(*_args)


def check_meta(ir: GraphIR, pass_name: str) -> None:
    """After pass ``pass_name``: every key of ``ir.meta`` public and of its declared type."""
    for name, value in ir.meta.items():
        if not isinstance(name, str) or name.startswith("_"):
            raise PassError(f"pass {pass_name!r} left the private key {name!r} in GraphIR.meta; keep a pass's own "
                            "state on the pass object, or declare a public key (graphopt.ir.meta.register_key)")
        key = KEYS.get(name)
        if key is None:
            if name not in _warned:
                _warned.add(name)
                log.warning("pass %r set GraphIR.meta[%r], which no plugin declared (graphopt.ir.meta.register_key "
                            "says who owns it and what it holds)", pass_name, name)
            continue
        if value is not None and not isinstance(value, key.type):
            raise PassError(f"pass {pass_name!r} left GraphIR.meta[{name!r}] as a {type(value).__name__}; it is a "
                            f"{_type_name(key.type)} ({key.owner}: {key.doc})")


_warned: set[str] = set()


def _type_name(t: Any) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__
