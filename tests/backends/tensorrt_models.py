"""Factories for the TensorRT backend's CLI tests (``graphopt compile tests/backends/tensorrt_models.py:mlp``)."""

from __future__ import annotations

import torch

from tests.backends.models import MLP, RANGE


def mlp():
    """The shared two-output MLP with dynamic batch/sequence: ``(module, inputs, dynamic)``."""
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(3, 5, 16), torch.ones(3, 5)), {"x": RANGE, "mask": RANGE}
