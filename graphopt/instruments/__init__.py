"""Built-in instruments, a plugin like any other: timing, the pass limit (bisection), IR dumps
(``NNN_<pass>.txt``) and per-pass verification against the original graph.

They read their settings from the :class:`graphopt.PassContext` of the run and write into its
report, so the pass manager never special-cases them. Blocking this plugin
(``GRAPHOPT_DISABLE_PLUGINS=graphopt-instruments``) turns all of them off.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from graphopt.errors import VerificationError
from graphopt.hookspecs import hookimpl
from graphopt.passes.manager import StopPipeline

log = logging.getLogger(__name__)

_T0 = "_instrument_t0"
_PHASE = "_instrument_phase"


def _end_phase(ctx, rec, error: str | None = None) -> None:
    started = ctx.data.pop(_PHASE, None)
    tracker = ctx.data.get("phases")
    if started is None or tracker is None:
        return
    from graphopt.memory import PhaseRecord

    extra = {}
    if rec is not None and isinstance(rec.get("verify"), dict) and rec["verify"].get("time_s") is not None:
        extra["verify_s"] = rec["verify"]["time_s"]
    if error:
        extra["error"] = error
    phase = tracker.end(PhaseRecord(started[0], extra=extra), started[1])
    if rec is not None:
        rec["rss_gib"], rec["peak_rss_gib"] = round(phase.rss_gib, 3), round(phase.peak_rss_gib, 3)


def _plugin_of(pass_) -> str | None:
    from graphopt.plugins import get_plugin_manager

    info = get_plugin_manager().passes.passes.get(pass_.name)
    return info.plugin if info else None


@hookimpl(wrapper=True)
def graphopt_before_pass(pass_, ir, ctx):
    if ctx.pass_limit is not None and ctx.index >= ctx.pass_limit:
        raise StopPipeline
    # a wrapper, so the pass is recorded only once no other plugin's hook stopped the pipeline
    results = yield
    if ctx.report is not None:
        ctx.report.start_pass(pass_, ctx.index, ir, _plugin_of(pass_))
    if ctx.progress:
        ctx.progress("start", pass_=pass_, index=ctx.index, total=len(ctx.passes))
    ctx.data[_T0] = time.perf_counter()
    tracker = ctx.data.get("phases")
    if tracker is not None:  # time and memory of the pass with its verification (graphopt.memory)
        ctx.data[_PHASE] = (f"pass:{pass_.name}", tracker.start(f"pass:{pass_.name}"))
    ctx.rewrites = 0
    ctx.pass_rewrites = []
    from graphopt.verify.policies import Equivalence

    if ctx.verify and ctx.verifier is not None:
        ctx.data["_fingerprint"] = _fingerprint(ir)
        ctx.data["_computation"] = computation_digest(ir)
    if ctx.verify and ctx.verifier is not None and isinstance(pass_.verification, Equivalence):
        # a calling-convention change is checked against the graph it rewrote (after a lossy pass
        # such as quantize, that graph, not the captured one): keep it (weights are shared)
        ctx.data["_pre_pass_ir"] = ir.copy()
    return results


@hookimpl(tryfirst=True)
def graphopt_after_pass(pass_, ir, result, ctx):
    elapsed = time.perf_counter() - ctx.data.pop(_T0, time.perf_counter())
    rec = ctx.report.current() if ctx.report is not None else None
    if rec is not None:
        rec.update(changed=result.changed, stats=dict(result.stats), time_s=round(elapsed, 4),
                   nodes_after=ir.node_count(), params_after=ir.param_count(), rewrites=ctx.rewrites)
    if ctx.dump_ir:
        path = Path(ctx.dump_ir)
        path.mkdir(parents=True, exist_ok=True)
        if ctx.index == 0 and ctx.original is not None:
            (path / "000_capture.txt").write_text(ctx.original.format() + "\n")
        f = path / f"{ctx.index + 1:03d}_{pass_.name.replace('-', '_')}.txt"
        f.write_text(f"# pass {pass_.spec()} (changed={result.changed}, stats={result.stats})\n"
                     + ir.format() + "\n")
        if rec is not None:
            rec["ir_dump"] = str(f)
    if ctx.verify and ctx.verifier is not None:
        before = ctx.data.pop("_computation", None)
        if not result.changed and ctx.data.pop("_fingerprint", None) == _fingerprint(ir):
            # same code, same tensors, same interface as the graph the previous check passed: that
            # check stands (a large model's forward is seconds; fold-constants often finds nothing)
            _stands(pass_, ctx, rec, "graph unchanged by the pass (same code and weights): the previous check stands")
        elif before is not None and before == computation_digest(ir):
            # the outputs are computed by the same ops on the same inputs and weights as before the
            # pass (it removed dead code or merged duplicate nodes): the previous check stands
            _stands(pass_, ctx, rec, "the outputs are computed by the same ops from the same inputs and weights as "
                                     "before the pass (dead code and duplicate nodes aside): the previous check stands")
        else:
            _verify(pass_, ir, ctx, rec)
    _end_phase(ctx, rec)
    if ctx.progress:
        ctx.progress("end", pass_=pass_, index=ctx.index, total=len(ctx.passes), record=rec)


def _stands(pass_, ctx, rec, message: str) -> None:
    ctx.data.pop("_pre_pass_ir", None)
    if rec is not None:
        rec["verify"] = {"policy": (pass_.verification.describe() if pass_.verification else "allclose"),
                         "passed": True, "skipped": True, "error_vs_previous": 0.0,
                         **getattr(ctx.verifier, "last_record", {}), "message": message, "time_s": 0.0}


def computation_digest(ir) -> tuple | None:
    """What the graph's outputs compute, independent of node names, node order, dead code and
    duplicate nodes: each node in the outputs' cone gets a digest of its op and its arguments (the
    digests of its input nodes; placeholders by position, weights by the identity, version, shape
    and dtype of their tensor). Two graphs with the same digest compute the same function, so a
    pass that leaves it unchanged (dead-code elimination, CSE) needs no new numeric check. ``None``
    (no shortcut) when the cone holds an op that is random or writes in place, a submodule or a
    method call."""
    import hashlib

    import torch
    from torch.fx.node import map_arg

    graph = ir.graph
    out = ir.output_node()
    cone: set = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        cone.add(n)
        stack.extend(n.all_input_nodes)
    digest: dict = {}
    positions = {n: i for i, n in enumerate(ir.placeholders())}
    for n in graph.nodes:  # topological: inputs first
        if n not in cone:
            continue
        if n.op == "placeholder":
            text = f"in:{positions[n]}"
        elif n.op == "get_attr":
            t = ir.graph_module
            for part in n.target.split("."):
                t = getattr(t, part, None)
            if isinstance(t, torch.Tensor):
                text = f"w:{id(t)}:{_data_ptr(t)}:{t._version}:{tuple(t.shape)}:{t.dtype}"
            else:
                return None
        elif n.op in ("call_function", "output"):
            target = n.target
            if isinstance(target, torch._ops.OpOverload) and (target._schema.is_mutable or _random(n)):
                return None
            name = getattr(target, "__qualname__", None) or str(target)
            mod = getattr(target, "__module__", "")
            text = f"{n.op}:{mod}.{name}:{map_arg((n.args, n.kwargs), lambda a: digest[a])!r}"
        else:
            return None
        digest[n] = hashlib.sha1(text.encode()).hexdigest()
    return digest[out], tuple(ir.input_names), tuple(ir.output_names)


def _fingerprint(ir) -> tuple:
    """What a graph computes, cheaply: its generated code, the identity of every tensor it holds,
    and its interface."""
    from graphopt.ir.graph_ir import shared_tensors

    return (ir.graph_module.code, tuple(sorted(shared_tensors(ir.graph_module))), tuple(ir.input_names),
            tuple(ir.output_names))


def _verify(pass_, ir, ctx, rec):
    from graphopt.verify.policies import allclose
    from graphopt.verify.reproducer import describe_failure, write_reproducer
    from graphopt.verify.verifier import first_divergence

    policy = pass_.verification or allclose()
    t0 = time.perf_counter()
    try:
        _, vrec = ctx.verifier.check(ir, policy, before=ctx.data.pop("_pre_pass_ir", None))
    except Exception as e:
        vrec = {"policy": policy.describe(), "passed": False,
                               "message": f"the graph after {pass_.name!r} no longer runs: {type(e).__name__}: {e}"}
    vrec["time_s"] = round(time.perf_counter() - t0, 4)
    if rec is not None:
        rec["verify"] = vrec
    if vrec["passed"]:
        return
    rtol, atol = policy.tolerance()
    div = first_divergence(ctx.verifier.original, ir, ctx.verifier.input_sets[0], rtol=max(rtol, 1e-6),
                           atol=max(atol, 1e-6), pass_name=pass_.name)
    vrec["first_divergence"] = div
    vrec["rewrites"] = list(ctx.pass_rewrites)
    if ctx.report is not None:
        ctx.report.data["verification"].update(passed=False, failed_pass=pass_.name)
    repro = None
    if ctx.repro_dir:
        try:
            repro = write_reproducer(ctx, pass_, vrec)
        except Exception as e:  # a reproducer is a courtesy; never mask the failure
            log.warning("could not write a reproducer: %s", e)
    raise VerificationError(describe_failure(pass_, ctx, vrec, repro), record=vrec, repro_dir=repro)


@hookimpl
def graphopt_pass_failed(pass_, ir, error, ctx):
    rec = ctx.report.current() if ctx.report is not None else None
    _end_phase(ctx, rec if rec is not None and rec.get("name") == pass_.name else None,
               f"{type(error).__name__}: {error}".splitlines()[0])
    if rec is not None and rec.get("name") == pass_.name and rec.get("error") is None:
        rec["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
    if ctx.dump_ir:
        path = Path(ctx.dump_ir)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{ctx.index + 1:03d}_{pass_.name.replace('-', '_')}.FAILED.txt").write_text(
            f"# pass {pass_.spec()} failed: {error}\n" + ir.format() + "\n")


def _random(n) -> bool:
    """Whether the node draws random numbers: ops tagged so, except attention and dropout
    without dropout (``dropout_p=0``, ``train=False``: what inference graphs hold)."""
    import torch

    if torch.Tag.nondeterministic_seeded not in n.target.tags:
        return False
    schema = n.target._schema
    values = {a.name: (n.args[i] if i < len(n.args) else n.kwargs.get(a.name, a.default_value))
              for i, a in enumerate(schema.arguments)}
    if "dropout_p" in values:
        return values["dropout_p"] not in (0, 0.0, None)
    if "train" in values and "p" in values:
        return bool(values["train"]) and values["p"] not in (0, 0.0)
    return True


def _data_ptr(t) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # fake/meta tensors have no storage
        return 0
