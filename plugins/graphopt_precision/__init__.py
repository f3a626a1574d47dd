"""graphopt-precision: low-precision graphs (fp16 / bf16) with fp32 islands.

Registers ``precision(dtype=fp16|bf16)``. TensorRT 11 is strongly typed only, so precision has to
live in the graph; the same graph runs in low precision on the torch target and on ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

from graphopt.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def graphopt_register_passes(register: Any) -> None:
    from graphopt_precision.precision import Precision

    register(Precision)
