"""graphopt: a plugin-based graph compiler for PyTorch models.

Capture with torch.export, optimize with pluggy-registered passes verified against the original
graph after every pass, lower to ONNX Runtime (default), TensorRT or a torch program.
"""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt import errors, verify
from graphopt.backends.base import Backend, Lowered, Runner
from graphopt.capture import capture
from graphopt.compiler import Artifact, compile, optimize  # noqa: E402  (needs the names above)
from graphopt.errors import *  # noqa: F403  (every exception class: graphopt.errors.__all__)
from graphopt.hookspecs import hookimpl
from graphopt.ir.graph_ir import GraphIR, TensorSpec
from graphopt.passes.base import Pass, PassContext, PassResult
from graphopt.plugins import get_plugin_manager
from graphopt.runtime.engine import Engine, load  # noqa: E402

__all__ = [
    "__version__", "verify", "capture", "compile", "optimize", "load", "Artifact", "Engine",
    "GraphIR", "TensorSpec", "Pass", "PassContext", "PassResult", "Backend", "Lowered", "Runner",
    "hookimpl", "get_plugin_manager", *errors.__all__,
]
