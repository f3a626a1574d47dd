"""Every pluggy hook graphopt calls. One module, typed, each saying how its results are used.

A plugin is a module (or object) with functions decorated ``@graphopt.hookimpl`` and named after
these specs. Installed plugins are found through the ``graphopt`` entry-point group, exactly like
the built-in ones::

    [project.entry-points.graphopt]
    myplugin = "myplugin"

Registration hooks hand the plugin a ``register`` callback instead of exposing internal tables, so
graphopt knows which plugin registered what and can isolate one that fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR
    from graphopt.passes.base import Pass, PassContext, PassResult

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


@hookspec
def graphopt_register_passes(register: Any) -> None:
    """Register passes: ``register(PassClass)``; pipeline aliases:
    ``register.alias("cleanup", "remove-noops,eliminate-dead-code")``.

    Called once per plugin when plugins load; results are ignored. An exception here marks the
    plugin as failed (shown by ``graphopt plugins``) and skips it.
    """


@hookspec
def graphopt_register_backends(register: Any) -> None:
    """Register lowering targets: ``register(BackendClass)`` (a :class:`graphopt.Backend`).

    Called once per plugin when plugins load; results are ignored.
    """


@hookspec
def graphopt_register_onnx_translations(register: Any) -> None:
    """Register how the onnx target lowers the custom ops this plugin's passes insert:
    ``register(op, function, min_opset=18)``, ``op`` a torch op overload
    (``torch.ops.mylib.my_op.default``), ``function`` an onnxscript function building its ONNX
    graph (``torch.onnx.export``'s ``custom_translation_table`` contract). An op may have several
    translations; the one with the highest ``min_opset`` not above the export opset is used.

    Called once per plugin when plugins load; the translations belong to the plugin: listed by
    ``graphopt plugins`` and removed with it (``PluginManager.unregister_plugin``).
    """


@hookspec
def graphopt_before_pass(pass_: Pass, ir: GraphIR, ctx: PassContext) -> None:
    """Called before each pass runs (instruments: timing, the bisect limit).

    All implementations are called; results are ignored. Raising
    :class:`graphopt.passes.manager.StopPipeline` ends the pipeline before this pass (bisection).
    """


@hookspec
def graphopt_after_pass(pass_: Pass, ir: GraphIR, result: PassResult, ctx: PassContext) -> None:
    """Called after each pass succeeded structurally (instruments: timing, IR dumps, verification).

    All implementations are called; results are ignored. Raising
    :class:`graphopt.VerificationError` fails the pipeline at this pass.
    """


@hookspec
def graphopt_pass_failed(pass_: Pass, ir: GraphIR, error: BaseException, ctx: PassContext) -> None:
    """Called when a pass raised or failed verification, before the error propagates.

    All implementations are called; results are ignored; exceptions raised here are logged and
    swallowed so the original error is the one the user sees.
    """
