"""graphopt-quant: calibration observers, W8A8 / SmoothQuant / fp8 Q/DQ, weight-only int8 and int4.

Passes: ``calibrate`` (observe activations on calibration data; scales cached in the artifact)
and ``quantize`` (rewrite linears with the chosen scheme, with an optional accuracy guard).
"""

from __future__ import annotations

from graphopt.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def graphopt_register_passes(register):
    from graphopt_quant import ops  # noqa: F401  (registers the custom ops with torch)
    from graphopt_quant.calibrate import Calibrate
    from graphopt_quant.quantize import Quantize

    register(Calibrate)
    register(Quantize)


@hookimpl
def graphopt_register_onnx_translations(register):
    from graphopt_quant.ops import ONNX_TRANSLATIONS

    for op, function, min_opset in ONNX_TRANSLATIONS:
        register(op, function, min_opset=min_opset)
