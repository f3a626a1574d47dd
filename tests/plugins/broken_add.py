"""``break-add``: a deliberately WRONG pass, to prove that verification catches wrong passes.

It rewrites the first ``aten.add.Tensor`` into ``aten.sub.Tensor`` and declares
``verification = exact()``, so any pipeline containing it must fail verification at that pass and
name the rewritten node::

    %add = aten.add.Tensor(%x, %linear)   →   %add = aten.sub.Tensor(%x, %linear)

The node keeps its name, so the verifier's first-divergence search points straight at it.

Use it from Python (register inside the test, unregister after)::

    import tests.plugins.broken_add as broken_add
    pm = graphopt.get_plugin_manager()
    pm.register_plugin(broken_add, name="broken-add")
    try:
        ...
    finally:
        pm.unregister_plugin("broken-add")

or from the CLI, with the repo root importable (the ``graphopt`` script does not put the current
directory on ``sys.path``)::

    PYTHONPATH=. graphopt -p tests.plugins.broken_add compile MODEL --pipeline break-add
"""

from __future__ import annotations

import torch

import graphopt

_ADD = torch.ops.aten.add.Tensor
_SUB = torch.ops.aten.sub.Tensor


class BreakAdd(graphopt.Pass):
    """Turn the first aten.add.Tensor into aten.sub.Tensor (deliberately wrong; for tests only)."""

    name = "break-add"
    verification = graphopt.verify.exact()

    def run(self, ir: graphopt.GraphIR, ctx: graphopt.PassContext) -> graphopt.PassResult:
        for node in ir.graph.nodes:
            # add(a, b, alpha) -> sub(a, b, alpha): same signature, wrong answer
            if node.op == "call_function" and node.target is _ADD:
                if not ctx.should_rewrite(f"break-add: {node.name} add -> sub"):
                    break
                node.target = _SUB
                return graphopt.PassResult(ir, True, {"broken": 1})
        return graphopt.PassResult(ir, False, {"broken": 0})


@graphopt.hookimpl
def graphopt_register_passes(register):
    register(BreakAdd)
