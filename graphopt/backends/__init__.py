"""Lowering targets: onnx (embedded default, run by ONNX Runtime) and torch (.pt2)."""

from graphopt.backends.base import Backend, Lowered, Runner

__all__ = ["Backend", "Lowered", "Runner"]
