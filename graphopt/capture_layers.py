"""Capture a stack of identical layers by tracing two of them.

``torch.export``'s trace costs about 0.6 s per decoder layer of a Qwen2.5-0.5B-shaped model on a
2-core CPU (symbolic-shape reasoning on every op; the weights' size does not matter): 15 s of that
24-layer model's 70 s compile. A decoder's layers run the same code on their own weights, so the
graph of layer 1, the first layer whose input is another layer's output, is the graph of every
later layer with its parameters renamed.

:func:`export_repeated` exports the model with its layer list cut to the first two layers, checks
that the two layers' graphs are the same op for op (layer 1 reading layer 0's values where layer 0
reads the layers' input), copies layer 1's graph for layers 2..N-1, each bound to its own
parameters, and checks the whole graph against the whole model run eagerly on the example inputs.
Whatever it cannot show — no list of identical layers, per-layer settings that differ
(``config.layer_types``), layer graphs that differ, values of early layers used after the stack, a
mismatch with the eager model — and the model is exported whole; the reason is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

#: fewer layers than this are traced as they are (two are traced either way)
MIN_LAYERS = 4
#: the config attributes that hold the number of layers a model's forward loops over
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: the environment variable that turns the repetition off (``0``): every layer traced
ENV = "GRAPHOPT_CAPTURE_REPEAT"


def find_layer_stack(module: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The module's largest ``ModuleList`` of at least :data:`MIN_LAYERS` modules of one class
    with the same parameter and buffer names, shapes and dtypes (a decoder's layers), by path."""
    best: tuple[str, torch.nn.ModuleList, int] | None = None
    for name, sub in module.named_modules():
        if not name or not isinstance(sub, torch.nn.ModuleList) or len(sub) < MIN_LAYERS:
            continue
        first = sub[0]
        sig = _signature(first)
        if not sig[0] or any(type(m) is not type(first) or _signature(m) != sig for m in sub):
            continue
        size = sum(p.numel() for p in sub.parameters())
        if best is None or size > best[2]:
            best = (name, sub, size)
    return None if best is None else (best[0], best[1])


def _signature(m: torch.nn.Module) -> tuple:
    return (tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()))


def export_repeated(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
                    export: Callable[[], tuple[torch.fx.GraphModule, Any]]
                    ) -> tuple[torch.fx.GraphModule, Any, str] | None:
    """``(graph module, eager output, note)`` for ``module`` captured with its layers traced
    once, or ``None`` when the model is to be exported whole. ``export`` runs graphopt's export
    of ``module`` as it is at the time of the call (here: with two layers)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    found = find_layer_stack(module)
    if found is None:
        return None
    path, layers = found
    n = len(layers)
    try:
        with _first_layers(module, path, layers, 2) as why_not:
            if why_not:
                log.info("capture: tracing all %d layers of %s: %s", n, path, why_not)
                return None
            gm, _ = export()
    except Exception:  # noqa: BLE001 - the cut model would not trace: the whole one may
        log.info("capture: the model cut to 2 of its %d layers did not export; tracing all of them", n,
                 exc_info=log.isEnabledFor(logging.DEBUG))
        return None
    why_not = _repeat(gm, path, layers)
    if why_not:
        log.info("capture: tracing all %d layers of %s: %s", n, path, why_not)
        return None
    with torch.no_grad():
        eager = module(*args, **kwargs)
        got = gm(*args, **kwargs)
    err = _mismatch(eager, got)
    if err:
        log.warning("capture: the graph with layer 1's graph repeated for %s.2..%d differs from the model "
                    "(%s); tracing all %d layers", path, n - 1, err, n)
        return None
    note = (f"torch.export traced 2 of the {n} layers in {path} and repeated layer 1's graph for layers "
            f"2..{n - 1} (each with its own weights); the graph's outputs equal the model's on the example inputs")
    return gm, eager, note


@contextlib.contextmanager
def _first_layers(module: torch.nn.Module, path: str, layers: torch.nn.ModuleList, keep: int
                  ) -> Iterator[str | None]:
    """Within it, ``module`` has only the first ``keep`` of its layers, and every config object
    its modules hold says so (layer counts, per-layer lists such as ``layer_types``); yields why
    that cannot be done, or ``None``. Everything is restored afterwards."""
    n = len(layers)
    parent_path, _, attr = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    configs = {id(c): c for c in (getattr(m, "config", None) for m in module.modules()) if c is not None}
    changes: list[tuple[dict, str, Any]] = []
    why_not = None
    for cfg in configs.values():
        fields = getattr(cfg, "__dict__", None)
        if not isinstance(fields, dict):
            continue
        for k, v in list(fields.items()):
            if k in LAYER_COUNT_ATTRS and type(v) is int and v == n:
                changes.append((fields, k, keep))
            elif isinstance(v, (list, tuple)) and len(v) == n and "layer" in k:
                if len({repr(x) for x in v}) > 1:
                    why_not = f"config.{k} differs between layers"
                changes.append((fields, k, type(v)(v[:keep])))
    if why_not:
        yield why_not
        return
    saved = [(fields, k, fields[k]) for fields, k, _ in changes]
    try:
        for fields, k, v in changes:
            fields[k] = v
        setattr(parent, attr, torch.nn.ModuleList(list(layers)[:keep]))
        yield None
    finally:
        setattr(parent, attr, layers)
        for fields, k, v in saved:
            fields[k] = v


def _layer_of(node: torch.fx.Node, path: str) -> int | None:
    """0 or 1: the layer whose module call made ``node`` (from its ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    where = list(stack.values())[-1][0]
    for i in (0, 1):
        p = f"{path}.{i}"
        if where == p or where.startswith(p + "."):
            return i
    return None


def _repeat(gm: torch.fx.GraphModule, path: str, layers: torch.nn.ModuleList) -> str | None:
    """Copy layer 1's nodes for layers 2..N-1 in place; returns why it cannot, or ``None``."""
    g = gm.graph
    calls = [n for n in g.nodes if n.op not in ("placeholder", "get_attr", "output")]
    spans: dict[int, list[torch.fx.Node]] = {0: [], 1: []}
    for n in calls:
        i = _layer_of(n, path)
        if i is not None:
            spans[i].append(n)
    s0, s1 = spans[0], spans[1]
    if not s0 or len(s0) != len(s1):
        return f"the graphs of layers 0 and 1 differ ({len(s0)} and {len(s1)} nodes)"
    pos = {n: k for k, n in enumerate(calls)}
    if (pos[s0[-1]] - pos[s0[0]] + 1 != len(s0) or pos[s1[-1]] - pos[s1[0]] + 1 != len(s1)
            or pos[s1[0]] != pos[s0[-1]] + 1):
        return "the layers' nodes are not one contiguous run per layer"
    in0, in1 = {n: k for k, n in enumerate(s0)}, {n: k for k, n in enumerate(s1)}
    p0, p1 = f"{path}.0.", f"{path}.1."
    chain: dict[torch.fx.Node, int] = {}  # layer 0's input → the layer-0 node layer 1 reads there
    shared: set[torch.fx.Node] = set()

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                return False
            if a in in0:
                return b in in1 and in0[a] == in1[b]
            if b in in1:
                return False
            if a.op == "get_attr" and str(a.target).startswith(p0):
                return b.op == "get_attr" and b.target == p1 + str(a.target)[len(p0):]
            if b in in0:
                return chain.setdefault(a, in0[b]) == in0[b]
            shared.add(a)
            return a is b
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return type(a) is type(b) and (a is b or a == b)

    for a, b in zip(s0, s1):
        if a.op != b.op or a.target != b.target or not same(a.args, b.args) or not same(a.kwargs, b.kwargs):
            return f"layer 1's node {b.name} ({b.target}) differs from layer 0's {a.name}"
    if shared & chain.keys():
        return "a value feeds layer 0 both as the layers' input and as a shared input"
    if any(u not in in0 and u not in in1 for n in s0 for u in n.users):
        return "a value of layer 0 is used after the layers"

    first_input = next((n for n in g.nodes if n.op == "placeholder"), None)
    by_index = {k: n for n, k in in1.items()}
    prev = list(s1)  # the nodes of the layer before the one being made
    anchor = s1[-1]
    copies: set[torch.fx.Node] = set()
    for i in range(2, len(layers)):
        attrs: dict[torch.fx.Node, torch.fx.Node] = {}
        env: dict[torch.fx.Node, torch.fx.Node] = {}

        def arg(x: torch.fx.Node, i: int = i, attrs: dict = attrs, env: dict = env, prev: list = prev
                ) -> torch.fx.Node:
            if x in env:
                return env[x]
            if x in in0:  # layer 0's node that layer 1 reads as its input: the previous layer's
                return prev[in0[x]]
            if x.op == "get_attr" and str(x.target).startswith(p1):
                if x not in attrs:
                    attrs[x] = _bind(gm, x, f"{path}.{i}.", str(x.target)[len(p1):], layers[i], first_input)
                return attrs[x]
            return x

        made = []
        for n in s1:
            with g.inserting_after(anchor):
                c = g.node_copy(n, arg)
            c.meta["nn_module_stack"] = _renumbered(n.meta.get("nn_module_stack"), f"{path}.1", f"{path}.{i}")
            env[n] = anchor = c
            made.append(c)
        copies.update(made)
        prev = made
    last = {n: prev[k] for k, n in by_index.items()}
    for n in s1:
        for u in list(n.users):
            if u not in in1 and u not in copies:
                u.replace_input_with(n, last[n])
    g.lint()
    gm.recompile()
    return None


def _bind(gm: torch.fx.GraphModule, template: torch.fx.Node, prefix: str, suffix: str,
          layer: torch.nn.Module, before: torch.fx.Node | None) -> torch.fx.Node:
    """A ``get_attr`` of layer ``prefix``'s tensor ``suffix`` (the model's own, not a copy),
    registered on ``gm`` as the exported module registers layer 0's and 1's."""
    owner_path, _, name = suffix.rpartition(".")
    owner = layer.get_submodule(owner_path) if owner_path else layer
    tensor = owner._parameters.get(name) if name in owner._parameters else owner._buffers.get(name)
    if tensor is None:
        raise RuntimeError(f"{prefix}{suffix} is neither a parameter nor a buffer")
    target = prefix + suffix
    holder: torch.nn.Module = gm
    for part in target.split(".")[:-1]:
        if not hasattr(holder, part):
            holder.add_module(part, torch.nn.Module())
        holder = getattr(holder, part)
    if isinstance(tensor, torch.nn.Parameter):
        holder.register_parameter(name, tensor)
    else:
        holder.register_buffer(name, tensor)
    ctx = gm.graph.inserting_before(before) if before is not None else contextlib.nullcontext()
    with ctx:
        node = gm.graph.get_attr(target)
    node.meta = dict(template.meta)
    return node


def _renumbered(stack: Any, old: str, new: str) -> Any:
    if not isinstance(stack, dict):
        return stack
    out = {}
    for key, (where, kind) in stack.items():
        if where == old or where.startswith(old + "."):
            where = new + where[len(old):]
            key = f"{key}@{new}"
        out[key] = (where, kind)
    return out


def _mismatch(eager: Any, got: Any) -> str | None:
    a, b = pytree.tree_leaves(eager), pytree.tree_leaves(got)
    ta = [x for x in a if isinstance(x, torch.Tensor)]
    tb = [x for x in b if isinstance(x, torch.Tensor)]
    if len(ta) != len(tb):
        return f"{len(tb)} output tensors instead of {len(ta)}"
    for k, (x, y) in enumerate(zip(ta, tb)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {k}: {tuple(y.shape)} {y.dtype} instead of {tuple(x.shape)} {x.dtype}"
        if x.is_floating_point():
            scale = float(x.abs().max()) if x.numel() else 0.0
            err = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
            if not err <= 1e-4 * max(scale, 1.0):
                return f"output {k}: max abs error {err:.3g} (scale {scale:.3g})"
        elif not torch.equal(x, y):
            return f"output {k}: values differ"
    return None
