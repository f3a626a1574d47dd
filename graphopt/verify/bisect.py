"""``graphopt bisect``: the first pass, then the first rewrite and node, that breaks verification.

1. Guilty pass: the pipeline runs with per-pass verification against the original graph; the
   first pass whose check fails is the guilty one (every pass is compared with the ORIGINAL, so an
   early pass that hides its error behind a later one is still caught where it happened).
2. Guilty rewrite: passes ask ``ctx.should_rewrite()`` before each rewrite. The guilty pass is
   rerun on the graph the earlier passes produced with a rewrite limit, binary-searching the
   smallest limit that fails: that rewrite is the culprit (like LLVM's -opt-bisect-limit).
3. Guilty node: the first node whose value differs from the original's, with that one rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import VerificationError
from graphopt.ir.graph_ir import GraphIR
from graphopt.passes.base import Pass, PassContext
from graphopt.passes.manager import PassManager
from graphopt.report import Report
from graphopt.verify.policies import allclose
from graphopt.verify.verifier import Verifier, first_divergence, make_verification_inputs


class _NoHooks:
    """Hook relay with no instruments: bisection drives verification itself."""

    def graphopt_before_pass(self, **kw: Any) -> None:
        pass

    def graphopt_after_pass(self, **kw: Any) -> None:
        pass

    def graphopt_pass_failed(self, **kw: Any) -> None:
        pass


@dataclass
class BisectResult:
    guilty_pass: str | None
    pass_index: int | None = None
    passes_before: list[str] = field(default_factory=list)
    message: str = ""
    rewrite_index: int | None = None
    rewrites_total: int | None = None
    rewrite: str | None = None
    node: dict | None = None
    steps: int = 0

    def format(self) -> str:
        if self.guilty_pass is None:
            return "no pass breaks verification: " + (self.message or "every pass verified")
        lines = [f"guilty pass: {self.guilty_pass} (#{self.pass_index}; passes before it: "
                 f"{', '.join(self.passes_before) or 'none'})", f"  {self.message}"]
        if self.rewrite is not None:
            lines.append(f"guilty rewrite: #{self.rewrite_index} of {self.rewrites_total}: {self.rewrite}")
        if self.node and self.node.get("node"):
            lines.append(f"guilty node: {self.node['format']}")
            lines.append(f"  {self.node['why']}; made by {self.node['provenance']!r}")
        return "\n".join(lines)


def bisect(ir: GraphIR, passes: list[Pass], *, pipeline_text: str = "", n_random: int = 1) -> BisectResult:
    original = ir.copy()
    inputs = make_verification_inputs(original, n_random=n_random)
    verifier = Verifier(original, inputs)
    ctx = PassContext(original=original, pipeline_text=pipeline_text, verify=True, verifier=verifier,
                      report=Report(pipeline=pipeline_text))
    from graphopt.plugins import get_plugin_manager

    try:
        PassManager(passes, get_plugin_manager().hook).run(ir.copy(), ctx)
        return BisectResult(None, message=f"all {len(passes)} passes verified on {len(inputs)} input sets")
    except VerificationError as e:
        failed_index = ctx.index
        record = e.record
    guilty = passes[failed_index]
    result = BisectResult(guilty.name, failed_index + 1, [p.name for p in passes[:failed_index]],
                          message=str(record.get("message", "")))

    # The graph the earlier passes produced (they verified), without instruments.
    prefix = ir.copy()
    pctx = PassContext(original=original, pipeline_text=pipeline_text, verify=False)
    prefix = PassManager(passes[:failed_index], _NoHooks()).run(prefix, pctx)
    policy = guilty.verification or allclose()

    def attempt(limit: int | None) -> tuple[bool, GraphIR, PassContext]:
        cand = prefix.copy()
        c = PassContext(original=original, pipeline_text=pipeline_text, verify=False, rewrite_limit=limit,
                        passes=[guilty], index=0)
        cand = PassManager([guilty], _NoHooks()).run(cand, c)
        check = Verifier(original, inputs)
        outcome, _ = check.check(cand, policy)
        return outcome.passed, cand, c

    ok, cand, c = attempt(None)
    total = c.rewrites
    result.rewrites_total = total
    rtol, atol = policy.tolerance()
    if total == 0 or ok:
        # the pass does not report its rewrites (or failed only with earlier state): blame by node
        result.node = first_divergence(original, cand, inputs[0], rtol=max(rtol, 1e-6), atol=max(atol, 1e-6),
                                       pass_name=guilty.name)
        return result
    lo, hi = 0, total  # invariant: limit lo passes, limit hi fails
    steps = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        steps += 1
        if attempt(mid)[0]:
            lo = mid
        else:
            hi = mid
    _, cand, c = attempt(hi)
    result.steps = steps
    result.rewrite_index = hi
    done = c.pass_rewrites
    result.rewrite = done[hi - 1] if len(done) >= hi else None
    result.node = first_divergence(original, cand, inputs[0], rtol=max(rtol, 1e-6), atol=max(atol, 1e-6),
                                   pass_name=guilty.name)
    return result
