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

__version__ = "0.1.0"

#: the ``cleanup`` alias, in order
CLEANUP = "remove-noops,fold-constants,eliminate-common-subexpressions,eliminate-dead-code"


@hookimpl
def graphopt_register_passes(register: Any) -> None:
    from graphopt_cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
    from graphopt_cleanup.eliminate_dead_code import EliminateDeadCode
    from graphopt_cleanup.fold_constants import FoldConstants
    from graphopt_cleanup.remove_noops import RemoveNoops

    for pass_cls in (RemoveNoops, FoldConstants, EliminateCommonSubexpressions, EliminateDeadCode):
        register(pass_cls)
    register.alias("cleanup", CLEANUP)
    register.alias("dce", EliminateDeadCode.name)
    register.alias("cse", EliminateCommonSubexpressions.name)
