"""graphopt-cleanup: the built-in cleanup passes, shipped as a plugin like any third-party one.

It is found through the ``graphopt`` entry-point group (``graphopt-cleanup = "graphopt_cleanup"``
in graphopt's pyproject) and registers:

=====================================  ================================================
``remove-noops``                       casts to the same dtype, ``x*1``, asserts, eval dropout
``fold-constants``                     weight-only subgraphs, input-free tensors → buffers
``eliminate-common-subexpressions``    one node per distinct value
``eliminate-dead-code``                nodes and parameters no output depends on
=====================================  ================================================

plus the aliases ``cleanup`` (all four, in that order), ``cse`` and ``dce``. The order of
``cleanup`` matters: dropping no-ops and asserts first lets folding see whole constant subgraphs,
folding and no-op removal make formerly different nodes identical for CSE, and DCE sweeps up last.
"""

from __future__ import annotations

from typing import Any

from graphopt.hookspecs import hookimpl

from .eliminate_common_subexpressions import EliminateCommonSubexpressions
from .eliminate_dead_code import EliminateDeadCode
from .fold_constants import FoldConstants
from .remove_noops import RemoveNoops

__version__ = "0.1.0"

PASSES = (RemoveNoops, FoldConstants, EliminateCommonSubexpressions, EliminateDeadCode)
CLEANUP = ",".join(p.name for p in PASSES)


@hookimpl
def graphopt_register_passes(register: Any) -> None:
    for pass_cls in PASSES:
        register(pass_cls)
    register.alias("cleanup", CLEANUP)
    register.alias("dce", EliminateDeadCode.name)
    register.alias("cse", EliminateCommonSubexpressions.name)


__all__ = ["__version__", "RemoveNoops", "FoldConstants", "EliminateCommonSubexpressions",
           "EliminateDeadCode", "graphopt_register_passes"]
