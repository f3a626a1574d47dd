"""The Backend and Runner contracts.

A backend lowers an optimized :class:`GraphIR` into payload files inside an artifact directory
(being written; the caller makes it atomic) and, later, loads those files back as a
:class:`Runner`. Backends are registered by plugins through ``graphopt_register_backends``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from graphopt.ir.graph_ir import GraphIR


@dataclass
class Lowered:
    """What ``Backend.lower`` wrote: payload file names (relative to the artifact directory), the
    runner facts the manifest keeps, and notes shown to the user."""

    files: list[str]
    payload: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Runner:
    """Runs a loaded payload. ``run`` takes flat inputs in manifest order (torch tensors or numpy
    arrays) and returns flat outputs as torch tensors."""

    device: str = "cpu"

    def run(self, inputs: list[Any]) -> list[torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        """Release sessions/contexts (optional)."""


class Backend:
    """Base class of lowering targets. Subclasses set ``name`` and implement ``lower``/``load``."""

    name: str = ""
    #: default tolerance for the post-lowering check against the original graph
    atol: float = 1e-4
    rtol: float = 1e-4

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def lower(self, ir: GraphIR, out_dir: Path, options: dict[str, Any]) -> Lowered:
        raise NotImplementedError

    def load(self, artifact_dir: Path, manifest: dict[str, Any], **options: Any) -> Runner:
        raise NotImplementedError

    def load_for_verification(self, artifact_dir: Path, manifest: dict[str, Any]) -> Runner:
        """The runner the compiler checks a freshly lowered payload with (default: :meth:`load`).
        A backend whose payload cannot run on the build machine (a TensorRT artifact without an
        engine yet) returns a runner for what it can check here."""
        return self.load(artifact_dir, manifest)
