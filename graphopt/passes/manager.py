"""The pass manager: runs passes in order and calls the instrument hooks around each one.

It knows nothing of timing, dumps, bisection or verification: those are built-in plugins
(``graphopt.instruments``) implementing ``graphopt_before_pass`` / ``graphopt_after_pass`` /
``graphopt_pass_failed``, loaded like any other plugin. What the manager itself guarantees:

- ``requires`` before and ``ensures`` after each pass, plus ``graph.lint()`` and a fresh shape
  propagation (structural verification);
- provenance: every node a pass creates or rewrites in place is stamped with the pass's name;
- fixpoint passes are rerun until they stop changing the graph (bounded by ``max_iterations``);
- a pass that raises becomes a :class:`PassError` naming the pass and the passes before it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch.fx.node import map_arg

from graphopt.errors import GraphoptError, PassError, VerificationError
from graphopt.ir.graph_ir import PROVENANCE, GraphIR
from graphopt.ir.meta import check_meta
from graphopt.passes.base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)


class StopPipeline(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a ``graphopt_before_pass`` hook to end the pipeline before the current pass."""


def _snapshot(ir: GraphIR) -> dict[int, tuple[Any, str, str, list]]:
    """What each node is before a pass: its op, its args (node names included), its args with the
    nodes blanked out (the constants), and the ``val`` of its input nodes."""
    return {id(n): (n.target, repr(n.args) + repr(n.kwargs), _constants(n),
                    [a.meta.get("val") for a in n.all_input_nodes]) for n in ir.graph.nodes}


def _constants(n: Any) -> str:
    return repr(map_arg((n.args, n.kwargs), lambda _: "%"))


def _stamp(ir: GraphIR, before: dict[int, tuple[Any, str, str, list]], name: str,
           rewired: dict[int, list] | None = None) -> set[int]:
    """Stamp the nodes the pass created or changed with its name; returns their ids. Nodes that
    kept their op and constants but read other input nodes also go into ``rewired`` (id -> the
    ``val`` of the inputs they had), first sighting kept: shape propagation skips them when the new
    inputs have the same shapes."""
    touched = set()
    for n in ir.graph.nodes:
        old = before.get(id(n))
        if old is None or old[:2] != (n.target, repr(n.args) + repr(n.kwargs)):
            if n.op not in ("placeholder", "output"):
                n.meta[PROVENANCE] = name
            touched.add(id(n))
            if rewired is not None and old is not None and old[0] == n.target and old[2] == _constants(n):
                rewired.setdefault(id(n), old[3])
    return touched


def _merge_stats(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Accumulate a fixpoint pass's stats over iterations: numbers add up, dicts merge, the rest
    keeps the last value."""
    for k, v in new.items():
        old = into.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(old, (int, float)):
            into[k] = old + v
        elif isinstance(v, dict) and isinstance(old, dict):
            merged = dict(old)
            _merge_stats(merged, v)
            into[k] = merged
        else:
            into[k] = v


class PassManager:
    def __init__(self, passes: list[Pass], hook: Any = None):
        self.passes = passes
        if hook is None:
            from graphopt.plugins import get_plugin_manager

            hook = get_plugin_manager().hook
        self.hook = hook

    def run(self, ir: GraphIR, ctx: PassContext) -> GraphIR:
        ctx.passes = self.passes
        for i, p in enumerate(self.passes):
            ctx.index = i
            try:
                self.hook.graphopt_before_pass(pass_=p, ir=ir, ctx=ctx)
            except StopPipeline:
                log.info("pipeline stopped before pass %d (%s)", i + 1, p.name)
                break
            try:
                result = self._run_one(p, ir, ctx)
                self.hook.graphopt_after_pass(pass_=p, ir=result.ir, result=result, ctx=ctx)
            except BaseException as e:
                self._failed(p, ir, e, ctx)
                if isinstance(e, (GraphoptError, KeyboardInterrupt)):
                    raise
                before = ", ".join(ctx.passes_before) or "none"
                raise PassError(f"pass {p.name!r} (#{i + 1}) raised {type(e).__name__}: {e}\n"
                                f"  passes before it: {before}\n"
                                f"  fix the pass, or leave it out of the pipeline") from e
            ir = result.ir
        return ir

    def _run_one(self, p: Pass, ir: GraphIR, ctx: PassContext) -> PassResult:
        p.requires(ir)
        stats: dict[str, Any] = {}
        changed_any = False
        iterations = 0
        touched: set[int] = set()
        rewired: dict[int, list] = {}  # same op and constants, other input nodes (first sighting)
        dirty: set[int] = set()  # new nodes, changed op or constants
        replaced, gm = False, ir.graph_module
        t0 = time.perf_counter()
        while True:
            iterations += 1
            before = _snapshot(ir)
            result = p.run(ir, ctx)
            if not isinstance(result, PassResult):
                raise PassError(f"pass {p.name!r} returned {type(result).__name__}; "
                                "run() must return graphopt.PassResult(ir, changed, stats)")
            replaced = replaced or result.ir is not ir or result.ir.graph_module is not gm
            ir = result.ir
            if result.changed:
                now_rewired: dict[int, list] = {}
                now = _stamp(ir, before, p.name, now_rewired)
                touched |= now
                dirty |= now - now_rewired.keys()
                # rewired again in a later iteration of a fixpoint pass: the inputs its ``val`` was
                # computed from are the ones of the first sighting
                for k, v in now_rewired.items():
                    rewired.setdefault(k, v)
            _merge_stats(stats, result.stats)
            changed_any |= result.changed
            if not (p.fixpoint and result.changed) or iterations >= p.max_iterations:
                break
        if p.fixpoint:
            stats["iterations"] = iterations
        try:
            ir.recompile()
        except Exception as e:
            raise PassError(f"pass {p.name!r} left an invalid graph: {e}") from e
        if changed_any:
            # only what the pass touched (new placeholders included); a pass that replaced the graph
            # module gets a full propagation
            incremental = not replaced
            rewired = {k: v for k, v in rewired.items() if k not in dirty}
            ir.propagate_shapes(dirty if incremental else None, rewired if incremental else None)
        p.ensures(ir)
        check_meta(ir, p.name)  # GraphIR.meta's keys: declared, public, of their type (graphopt.ir.meta)
        log.debug("pass %s: changed=%s in %.3fs", p.name, changed_any, time.perf_counter() - t0)
        return PassResult(ir, changed_any, stats)

    def _failed(self, p: Pass, ir: GraphIR, error: BaseException, ctx: PassContext) -> None:
        try:
            self.hook.graphopt_pass_failed(pass_=p, ir=ir, error=error, ctx=ctx)
        except Exception:  # never hide the original error
            log.exception("a graphopt_pass_failed hook raised")


def run_passes(ir: GraphIR, passes: list[Pass], ctx: PassContext | None = None) -> GraphIR:
    """Run ``passes`` on ``ir`` with the loaded plugins' instruments."""
    ctx = ctx or PassContext(original=ir.copy())
    return PassManager(passes).run(ir, ctx)


__all__ = ["PassManager", "StopPipeline", "run_passes", "VerificationError"]
