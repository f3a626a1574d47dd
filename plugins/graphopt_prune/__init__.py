"""graphopt-prune: structured (heads, channels), 2:4 and unstructured pruning by magnitude or Wanda.

One pass, ``prune``; see :mod:`graphopt_prune.prune` for what it does and
:mod:`graphopt_prune.dependency` for how structured pruning keeps every dependent shape right.
"""

from __future__ import annotations

from graphopt.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def graphopt_register_passes(register):
    from graphopt_prune.prune import Prune

    register(Prune)
