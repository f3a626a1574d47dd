"""Every error graphopt raises on purpose.

One base class, :class:`GraphoptError`; each subclass also derives from the builtin that fits, so
``except KeyError`` keeps working for callers who do not know graphopt. A message says what failed,
where (node, file, pass) and how to fix it. The CLI maps :class:`VerificationError` to exit code 1
and every other :class:`GraphoptError` to exit code 2.
"""

from __future__ import annotations

__all__ = ["GraphoptError", "ArtifactError", "BackendError", "CaptureError", "ChecksumError", "InputError",
           "ModelLoadError", "PassError", "PassOptionError", "PipelineError", "PluginError", "ResourceError",
           "RuntimeFailure", "UnknownBackendError", "UnknownPassError", "VerificationError"]


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""

    exit_code = 2


class CaptureError(GraphoptError, RuntimeError):
    """The model could not be captured into a GraphIR."""


class ModelLoadError(GraphoptError, ImportError):
    """A ``path/to/file.py:factory`` model spec could not be loaded."""


class PipelineError(GraphoptError, ValueError):
    """The pipeline text or build config is malformed, or its ordering constraints conflict."""


class UnknownPassError(GraphoptError, KeyError):
    """A pipeline names a pass that no plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PassOptionError(GraphoptError, ValueError):
    """A pass was given an option it does not declare, or a value of the wrong type."""


class PassError(GraphoptError, RuntimeError):
    """A pass raised, or broke a structural rule (lint, its ``ensures``)."""


class VerificationError(GraphoptError, AssertionError):
    """A pass changed what the graph computes beyond its verification policy."""

    exit_code = 1

    def __init__(self, message: str, *, record: dict | None = None, repro_dir: str | None = None):
        super().__init__(message)
        self.record = record or {}
        self.repro_dir = repro_dir


class PluginError(GraphoptError, RuntimeError):
    """A plugin failed to import or register (fatal only with GRAPHOPT_STRICT_PLUGINS=1)."""


class BackendError(GraphoptError, RuntimeError):
    """Lowering to a target failed, or the target is unknown."""


class UnknownBackendError(BackendError, KeyError):
    """A target name that no plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ArtifactError(GraphoptError, OSError):
    """An artifact directory is missing, malformed, from an incompatible version, or tampered with."""


class ChecksumError(ArtifactError):
    """A payload file's sha256 does not match the manifest."""


class InputError(GraphoptError, ValueError):
    """Inputs given to an Engine or the CLI do not match what the artifact expects."""


class RuntimeFailure(GraphoptError, RuntimeError):
    """A runtime could not run a valid artifact on valid inputs (out of GPU memory, an execution
    error reported by the runtime): the message says which resource ran out and what to change
    (a smaller batch or sequence, fewer concurrent contexts, a smaller workspace)."""


class ResourceError(GraphoptError, MemoryError):
    """A compile would need more memory than the machine has: refused before it starts (never
    killed by the kernel half-way), with the estimate and the ways to need less."""


def first_line(text: str) -> str:
    """The first non-blank line of an error message, stripped (``""`` for none): what a typed
    error quotes from a library's multi-line message."""
    return next((ln.strip() for ln in str(text).strip().splitlines() if ln.strip()), "")
