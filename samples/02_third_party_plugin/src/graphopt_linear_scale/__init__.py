"""graphopt-linear-scale: a complete third-party graphopt plugin (sample 02).

It adds one pass, ``fold-linear-scale`` (:mod:`graphopt_linear_scale.fold_linear_scale`). graphopt
finds it through the entry point in this package's ``pyproject.toml``::

    [project.entry-points.graphopt]
    linear-scale = "graphopt_linear_scale"

which names this module: when graphopt loads its plugins it imports it and calls its
``graphopt_register_passes`` hook with a ``register`` callback.
"""

from __future__ import annotations

import graphopt
from graphopt_linear_scale.fold_linear_scale import FoldLinearScale

__version__ = "0.1.0"
__all__ = ["FoldLinearScale", "graphopt_register_passes"]


@graphopt.hookimpl
def graphopt_register_passes(register):
    register(FoldLinearScale)
