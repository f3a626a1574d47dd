"""The built-in backends, registered as a plugin exactly like a third-party one would be.

Importing this module is cheap: the backend modules import torch.onnx, onnx, onnx-graphsurgeon
and onnxruntime only inside ``lower``/``load``, so loading plugins stays fast.
"""

from __future__ import annotations

from typing import Any

from graphopt.backends.onnx import OnnxBackend
from graphopt.backends.tensorrt import TensorRTBackend
from graphopt.backends.torch import TorchBackend
from graphopt.hookspecs import hookimpl


@hookimpl
def graphopt_register_backends(register: Any) -> None:
    register(OnnxBackend)
    register(TorchBackend)
    register(TensorRTBackend)
