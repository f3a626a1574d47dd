"""Model → GraphIR.

``torch.export.export(strict=False)`` is the primary path: it gives an ATen-level graph with
FakeTensor shapes (symbolic for dynamic dims) and works on Hugging Face models as they are
(keyword inputs, ``ModelOutput`` results). ``torch.fx.symbolic_trace`` is the fallback for plain
modules export cannot take; its graph is at torch-function level, so fewer pass patterns apply.

Capture runs under ``torch.no_grad()``: inference graphs have no autograd state, and it keeps
``@torch.no_grad`` regions of model code (rotary embeddings in HF Llama) from turning into
higher-order ops that every pass would have to look inside.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx

from graphopt.errors import CaptureError, InputError
from graphopt.ir.graph_ir import PROVENANCE, GraphIR, TensorSpec, dtype_name
from graphopt.ir.structure import flatten, leaf_names

log = logging.getLogger(__name__)

DynamicSpec = Mapping[str, Mapping[int, "tuple[int, int] | Any"]]


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional tensors or a dict of keywords."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(f"example_inputs must be a tuple of tensors or a dict of keyword tensors, "
                     f"not {type(example_inputs).__name__}")


def _positional_names(module: torch.nn.Module, n: int) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(n):
        if i < len(params) and params[i].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"arg{i}")
    return names


_LENGTH_ATTRS = ("max_position_embeddings", "n_positions", "block_size", "max_seq_len", "n_ctx",
                 "max_sequence_length", "seq_length")

#: the sequence range passes ask for when neither the user nor the model's config gives one
DEFAULT_MAX_SEQ = 4096
#: the batch range passes ask for when the user gives none
DEFAULT_BATCH = (1, 64)


def model_max_length(module: Any) -> int | None:
    """The longest sequence the model's config says it takes (``max_position_embeddings``,
    ``n_positions``, nanoGPT's ``block_size``, ...), or ``None``."""
    for holder in (getattr(module, "config", None), module):
        if holder is None:
            continue
        for attr in _LENGTH_ATTRS:
            v = getattr(holder, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 1:
                return v
    return None


def _as_range(where: str, rng: Any) -> tuple[int, int]:
    if hasattr(rng, "min") and hasattr(rng, "max") and not isinstance(rng, (tuple, list)):  # a torch.export.Dim
        lo, hi = getattr(rng, "min", None), getattr(rng, "max", None)
        rng = (0 if lo is None else lo, hi)
    if not isinstance(rng, (tuple, list)) or len(rng) != 2:
        raise InputError(f"dynamic range for {where} must be (min, max), got {rng!r}; e.g. {{1: (1, 512)}}")
    lo, hi = rng
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"dynamic range for {where} must be two non-negative ints (min, max), got {rng!r}")
    if lo > hi:
        raise InputError(f"dynamic range for {where} has min {lo} > max {hi}; give (min, max)")
    return int(lo), int(hi)


def normalize_dynamic(dynamic: Any, names: list[str], n_positional: int) -> dict[str, dict[int, tuple[int, int]]]:
    """``{input: {dim: (min, max)}}`` from what users write: that dict form (dims may be strings, as
    in TOML), or torch.export's positional form, a list/tuple with one ``{dim: range}`` or ``None``
    per positional input. Ranges may be ``(min, max)`` or ``torch.export.Dim`` objects."""
    if dynamic is None:
        return {}
    if isinstance(dynamic, (list, tuple)):
        if n_positional == 0:
            raise InputError("dynamic is a list (torch.export's positional form) but the example inputs are a dict "
                             f"of keywords; give a dict: {{input_name: {{dim: (min, max)}}}} with names from {names}")
        if len(dynamic) != n_positional:
            raise InputError(f"dynamic has {len(dynamic)} entries but there are {n_positional} positional example "
                             f"inputs ({names[:n_positional]}); give one {{dim: (min, max)}} or None per input")
        dynamic = {names[i]: d for i, d in enumerate(dynamic) if d is not None}
    if not isinstance(dynamic, Mapping):
        raise InputError(f"dynamic must be a dict {{input_name: {{dim: (min, max)}}}}, not {type(dynamic).__name__}")
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for name, dims in dynamic.items():
        if not isinstance(name, str):
            raise InputError(f"dynamic keys must be input names (str) from {names}, got {name!r}")
        if name not in names:
            raise InputError(f"dynamic dims given for unknown input {name!r}; inputs are {names}")
        if dims is None:
            continue
        if not isinstance(dims, Mapping):
            raise InputError(f"dynamic[{name!r}] must be a dict {{dim: (min, max)}}, got {dims!r}")
        for dim, rng in dims.items():
            try:
                d = int(dim)
            except (TypeError, ValueError):
                raise InputError(f"dynamic[{name!r}] has dim {dim!r}; dims are ints (0 = batch, 1 = sequence)") from None
            out.setdefault(name, {})[d] = _as_range(f"{name}[{d}]", rng)
    return out


def _token_inputs(inputs: dict[str, Any], ids: str = "") -> list[str]:
    """The token-id input (the 2-D integer input that is not ``attention_mask``, or ``ids``) and
    the attention mask, when present: the inputs decoder passes need dynamic."""
    if ids:
        names = [ids] if ids in inputs else []
    else:
        names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2
                 and not v.is_floating_point() and v.dtype != torch.bool and n != "attention_mask"]
        if len(names) != 1:
            return []
    if "attention_mask" in inputs:
        names.append("attention_mask")
    return names


def decoder_requirements(inputs: dict[str, Any], declared: dict[str, dict[int, tuple[int, int]]], module: Any,
                         *, ids: str = "", max_len: int = 0) -> dict[str, dict[int, tuple[int, int]]]:
    """Batch and sequence dynamic on the token ids and the attention mask, with one range each: the
    range the user declared on either, else ``max_len`` / the model's configured length (capped at
    :data:`DEFAULT_MAX_SEQ`) for the sequence and :data:`DEFAULT_BATCH` for the batch."""
    names = _token_inputs(inputs, ids)
    if not names:
        return {}

    def pick(dim: int, default: tuple[int, int]) -> tuple[int, int]:
        for n in names:
            if dim in declared.get(n, {}):
                return declared[n][dim]
        return default

    seq_max = max_len or min(model_max_length(module) or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
    seq = pick(1, (1, seq_max))
    batch = pick(0, DEFAULT_BATCH)
    return {n: {0: batch, 1: seq} for n in names}


def plan_dynamic(module: Any, example_inputs: Any, dynamic: Any, passes: list[Any] = ()
                 ) -> tuple[dict[str, dict[int, tuple[int, int]]], list[str]]:
    """The dynamic dims to capture with: the user's, plus what each pass declares it needs
    (:meth:`graphopt.Pass.capture_requirements`). User-declared ranges win; a declared range a pass
    cannot work with is an :class:`InputError` naming the input, dim and fix. Returns the dims and
    notes for the report (what was added, by which pass)."""
    args, kwargs = normalize_example_inputs(example_inputs)
    names = _positional_names(module, len(args)) + list(kwargs)
    values = list(args) + list(kwargs.values())
    declared = normalize_dynamic(dynamic, names, len(args))
    by_name = dict(zip(names, values))
    final = {n: dict(d) for n, d in declared.items()}
    notes: list[str] = []
    for p in passes:
        req = p.capture_requirements(by_name, declared, module) or {}
        added = []
        for name, dims in req.items():
            for d, rng in dims.items():
                if name in declared and d in declared[name]:
                    lo, hi = declared[name][d]
                    if hi < 2 or lo == hi:
                        raise InputError(
                            f"{p.name} needs dim {d} of {name!r} dynamic (e.g. {tuple(rng)}), but it was declared "
                            f"({lo}, {hi}); widen it: dynamic={{{name!r}: {{{d}: {tuple(rng)}}}}}")
                    continue
                if d in final.get(name, {}) and final[name][d] != tuple(rng):
                    continue  # an earlier pass set it
                final.setdefault(name, {})[d] = tuple(rng)
                added.append(f"{name}[{d}] in {tuple(rng)}")
        if added:
            notes.append(f"dynamic dims added for {p.name}: {', '.join(added)}")
    return final, notes


def _widen(value: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``value`` grown to ``size`` along ``dim`` by repeating it (an example of size 1 would make
    torch.export specialize the dim)."""
    reps = [1] * value.dim()
    reps[dim] = -(-size // max(int(value.shape[dim]), 1))
    return value.repeat(*reps).narrow(dim, 0, size).contiguous()


def _check_tensors(names: list[str], values: list[Any]) -> None:
    for name, v in zip(names, values):
        if not isinstance(v, torch.Tensor):
            raise InputError(
                f"example input {name!r} is a {type(v).__name__}, not a tensor; graphopt captures tensor "
                "inputs only. Bind other arguments in the factory (functools.partial, the model config) "
                "or leave them at their defaults.")


def _dims_for(names: list[str], values: list[torch.Tensor], dynamic: DynamicSpec | None
              ) -> tuple[dict[str, dict[int, Any]], dict[str, dict[int, tuple[int, int]]], dict[tuple[str, int], str]]:
    """Build torch.export Dims. Dims of equal example size and range share one Dim (``input_ids``
    and ``attention_mask`` share batch and sequence), since export requires equal dims to be one."""
    dynamic = dynamic or {}
    by_key: dict[tuple, Any] = {}
    dims: dict[str, dict[int, Any]] = {}
    ranges: dict[str, dict[int, tuple[int, int]]] = {}
    dim_names: dict[tuple[str, int], str] = {}
    used: set[str] = set()
    for name, value in zip(names, values):
        spec = dynamic.get(name) or {}
        for raw_dim, rng in spec.items():
            dim = int(raw_dim)
            if dim < 0:
                dim += value.dim()
            if not 0 <= dim < value.dim():
                raise InputError(f"dynamic dim {raw_dim} of input {name!r} is out of range for its shape "
                                 f"{tuple(value.shape)}")
            if not isinstance(rng, (tuple, list)) or len(rng) != 2:
                raise InputError(f"dynamic range for {name}[{dim}] must be (min, max), got {rng!r}")
            lo, hi = int(rng[0]), int(rng[1])
            size = int(value.shape[dim])
            if not lo <= size <= hi:
                raise InputError(f"example input {name!r} has size {size} at dim {dim}, outside its dynamic "
                                 f"range ({lo}, {hi}); widen the range or change the example")
            if lo == hi:  # a single size is no range: torch.export cannot make a Dim of it; the dim is static
                continue
            key = (dim, lo, hi, size)
            if key not in by_key:
                base = {0: "batch", 1: "seq"}.get(dim, f"{name}_d{dim}")
                label, k = base, 1
                while label in used:
                    k += 1
                    label = f"{base}{k}"
                used.add(label)
                # torch.export specialises sizes 0 and 1; a range starting at 1 is still served at
                # run time by the artifact (the ONNX/torch programs take any size in range).
                by_key[key] = (torch.export.Dim(label, min=lo, max=hi), label)
            d, label = by_key[key]
            dims.setdefault(name, {})[dim] = d
            ranges.setdefault(name, {})[dim] = (lo, hi)
            dim_names[(name, dim)] = label
    return dims, ranges, dim_names


def capture(module: torch.nn.Module, example_inputs: Any, dynamic: DynamicSpec | None = None,
            *, method: str = "auto") -> GraphIR:
    """Capture ``module`` called on ``example_inputs`` into a :class:`GraphIR`.

    Args:
        module: the model (put into eval mode by the caller; training graphs are not supported).
        example_inputs: tuple of positional tensors or dict of keyword tensors.
        dynamic: ``{input_name: {dim: (min, max)}}`` for dims that vary at run time.
        method: ``"auto"`` (export, then symbolic_trace), ``"export"`` or ``"symbolic_trace"``.
    """
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(module).__name__}")
    args, kwargs = normalize_example_inputs(example_inputs)
    names = _positional_names(module, len(args)) + list(kwargs)
    values = list(args) + list(kwargs.values())
    _check_tensors(names, values)
    dynamic = normalize_dynamic(dynamic, names, len(args))
    user_values = list(values)
    widened = []
    for i, name in enumerate(names):
        for d, (lo, hi) in sorted((dynamic.get(name) or {}).items()):
            if d < values[i].dim() and int(values[i].shape[d]) < 2 <= hi and lo <= int(values[i].shape[d]):
                # torch.export specializes sizes 0 and 1: capture with the example repeated to 2
                values[i] = _widen(values[i], d, 2)
                widened.append(f"{name}[{d}] {int(user_values[i].shape[d])} -> 2")
    if widened:
        args = tuple(values[: len(args)])
        kwargs = dict(zip(list(kwargs), values[len(args):]))
    dims, ranges, dim_names = _dims_for(names, values, dynamic)
    if module.training:
        log.info("capturing %s in eval mode", type(module).__name__)
        try:
            module.eval()
        except NotImplementedError:  # modules unlifted from an ExportedProgram are already inference graphs
            pass

    with _without_model_cache(module, kwargs) as cache_note:
        ir = _capture(module, args, kwargs, names, values, user_values, widened, dims, ranges, dim_names, method)
    if cache_note:
        ir.meta.setdefault("capture_notes", []).append(cache_note)
    return ir


@contextlib.contextmanager
def _without_model_cache(module: torch.nn.Module, kwargs: dict[str, Any]) -> Iterator[str | None]:
    """Capture a Hugging Face model with ``config.use_cache = False`` (restored afterwards).

    Models built from a config have ``use_cache=True``, and then return their own
    ``DynamicCache``, which torch.export cannot flatten ("Found DynamicCache in output"): every
    such model would fail to capture on a first try. graphopt's kv-cache pass inserts its own
    cache, so the model's is not needed; the compile's notes say it was left out. A caller who
    passes ``use_cache`` as an example input decides for themselves."""
    config = getattr(module, "config", None)
    if "use_cache" in kwargs or not getattr(config, "use_cache", False):
        yield None
        return
    config.use_cache = False
    try:
        yield (f"captured {type(module).__name__} with use_cache=False: its own cache output (DynamicCache) is "
               "not a tensor torch.export can capture; compile with the kv-cache pass for a cached decoder")
    finally:
        config.use_cache = True


def _capture(module, args, kwargs, names, values, user_values, widened, dims, ranges, dim_names,
             method) -> GraphIR:
    errors: list[str] = []
    gm = None
    how = None
    reference: Any = _NOT_RUN
    repeat_note = None
    if method in ("auto", "export"):
        try:
            gm, reference, repeat_note = _export_layers_once(module, args, kwargs, names, dims)
            how = "torch.export"
        except CaptureError:
            raise
        except Exception as e:
            _run_eagerly(module, args, kwargs)  # a model that raises on its inputs: say that first
            errors.append(f"torch.export: {type(e).__name__}: {_first_lines(str(e))}")
            log.debug("torch.export failed", exc_info=True)
    if gm is None and method in ("auto", "symbolic_trace"):
        reference = _run_eagerly(module, args, kwargs)
        if kwargs:
            errors.append("torch.fx.symbolic_trace: skipped (it takes positional tensor inputs only)")
        else:
            try:
                gm = _symbolic_trace(module, len(args))
                how = "symbolic_trace"
            except Exception as e:
                errors.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {_first_lines(str(e))}")
    if gm is None:
        hint = _hint(errors)
        raise CaptureError(f"could not capture {type(module).__name__}:\n  " + "\n  ".join(errors) +
                           (f"\nhint: {hint}" if hint else ""))
    if reference is _NOT_RUN:
        reference = _run_eagerly(module, args, kwargs)

    leaves, out_structure = flatten(reference, is_leaf=lambda x: isinstance(x, torch.Tensor))
    ran = all(isinstance(t, torch.Tensor) and not _is_fake(t) for t in leaves)
    gm = _normalize_outputs(gm, len(leaves))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs but {len(names)} example inputs "
                           f"were given ({names}); pass every tensor the model uses")
    for n, name in zip(placeholders, names):
        n.meta.setdefault("graphopt_input", name)

    ir = GraphIR(gm, [], [], call_convention="keyword" if kwargs else "positional",
                 out_structure=out_structure, example_inputs=[v.detach() for v in values],
                 meta={"capture": how, "model_class": f"{type(module).__module__}.{type(module).__qualname__}"})
    if how == "torch.export" and repeat_note:
        ir.meta.setdefault("capture_notes", []).append(repeat_note)
    if ran:
        ir.captured_outputs = [t.detach() for t in leaves]
    if widened:
        # the user's own example is verified too (compile adds it to the verification inputs)
        ir.meta["capture_widened"] = widened
        ir.user_example_inputs = [v.detach() for v in user_values]
    if how != "torch.export" or any("val" not in n.meta for n in gm.graph.nodes if n.op != "output"):
        ir.propagate_shapes()
    for n in gm.graph.nodes:
        n.meta[PROVENANCE] = "capture"
    env = getattr(getattr(placeholders[0].meta.get("val") if placeholders else None, "fake_mode", None), "shape_env", None)
    if env is not None:
        # what torch.export's trace established about the dims: the lowering reuses the graph's
        # values only while no pass has added to it (graphopt.backends.export._reusable_values)
        ir.meta["capture_shape_facts"] = _shape_facts(env)

    sym_names = {}
    for n, name in zip(placeholders, names):
        val = n.meta.get("val")
        for d, s in enumerate(getattr(val, "shape", ())):
            if isinstance(s, torch.SymInt) and (name, d) in dim_names:
                sym_names[str(s)] = dim_names[(name, d)]
    ir.inputs = [_spec(name, n, ranges.get(name, {}), sym_names, dim_names) for n, name in zip(placeholders, names)]
    ir.outputs = [_spec(oname, node, {}, sym_names, {}) for oname, node in
                  zip(leaf_names(out_structure), ir.output_values())]
    ir.recompile()
    return ir


_NOT_RUN = object()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _shape_facts(env) -> list[int]:
    """How many guards and runtime assertions a shape environment holds (a pass whose
    propagation specialises or constrains a dim adds one)."""
    asserts = getattr(env, "deferred_runtime_asserts", {}) or {}
    return [len(env.guards), sum(len(v) for v in asserts.values()), len(getattr(env, "divisible", ()) or ())]


def _run_eagerly(module, args, kwargs) -> Any:
    with torch.no_grad():
        try:
            return module(*args, **kwargs)
        except Exception as e:
            raise CaptureError(f"the model raised on its example inputs: {type(e).__name__}: {e}. "
                               "Check the inputs' names, shapes and dtypes against the model's forward().") from e


def _export_layers_once(module, args, kwargs, names, dims) -> tuple[torch.fx.GraphModule, Any, str | None]:
    """:func:`_export`, through :func:`graphopt.capture_layers.export_repeated` when the model
    is a stack of identical layers (its layers traced once, not N times); the note says how."""
    from graphopt.capture_layers import export_repeated

    done = export_repeated(module, args, kwargs, lambda: _export(module, args, kwargs, names, dims))
    if done is not None:
        return done
    return (*_export(module, args, kwargs, names, dims), None)


def _export(module, args, kwargs, names, dims) -> tuple[torch.fx.GraphModule, Any]:
    """The graph, and the model's output rebuilt from the program's output spec with the fake
    tensors of the graph's outputs (the structure the eager call returns, without running the
    model once more: a forward of a 1B model is seconds on a CPU); ``_NOT_RUN`` when the spec
    cannot rebuild it."""
    dynamic_shapes = None
    if dims:
        if kwargs:
            dynamic_shapes = {n: dims.get(n) for n in kwargs}
            if args:
                raise CaptureError("mixing positional and keyword example inputs with dynamic dims is not "
                                   "supported; pass all inputs as a dict")
        else:
            dynamic_shapes = tuple(dims.get(n) for n in names)
    from graphopt.ir.shapes import fake_tensor_cache_off

    with torch.no_grad(), fake_tensor_cache_off():
        ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    try:
        gm = ep.module(check_guards=False)
    except TypeError:  # torch < 2.9 has no guard function to leave out
        gm = ep.module()
    return gm, _output_from_spec(ep)


def _output_from_spec(ep) -> Any:
    import torch.utils._pytree as pytree

    try:
        out = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
        user = [spec.arg for spec in ep.graph_signature.output_specs if spec.kind.name == "USER_OUTPUT"]
        by_name = {a.name: a for a in out.args[0] if isinstance(a, torch.fx.Node)}
        vals = []
        for arg in user:
            name = getattr(arg, "name", None)
            if name is not None and name in by_name:
                vals.append(by_name[name].meta["val"])
            elif hasattr(arg, "value"):  # a constant output
                vals.append(arg.value)
            else:
                return _NOT_RUN
        return pytree.tree_unflatten(vals, ep.call_spec.out_spec)
    except Exception:  # noqa: BLE001 - another torch layout, an unregistered output type: run the model
        log.debug("output structure from the program's spec failed; running the model", exc_info=True)
        return _NOT_RUN


def _symbolic_trace(module, n_args) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(module)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for p in placeholders[n_args:]:  # optional arguments left at their defaults
        if p.users:
            raise CaptureError(f"symbolic_trace: forward() argument {p.name!r} is used but no example "
                               "input was given for it")
        gm.graph.erase_node(p)
    return gm


def _normalize_outputs(gm: torch.fx.GraphModule, n_leaves: int) -> torch.fx.GraphModule:
    """Plain codegen (flat positional tensors in, flat tuple out) instead of pytree in/out specs.

    Returns a fresh GraphModule: the one from ``ExportedProgram.module()`` carries a forward
    pre-hook that checks calls against the pytree input spec, which no longer applies."""
    gm.graph.set_codegen(torch.fx.graph.CodeGen())
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves, _ = flatten(out.args[0], is_leaf=lambda x: isinstance(x, torch.fx.Node))
    if len(leaves) != n_leaves:
        raise CaptureError(f"captured graph returns {len(leaves)} tensors but the model returned {n_leaves}; "
                           "outputs that are not computed from the inputs are not supported")
    out.args = (tuple(leaves),)
    fresh = torch.fx.GraphModule(gm, gm.graph, class_name="GraphIRModule")
    fresh.meta.update(getattr(gm, "meta", {}))
    return fresh


def _spec(name, node, ranges, sym_names, dim_names) -> TensorSpec:
    val = node.meta.get("val")
    if val is None and "tensor_meta" in node.meta:
        val = node.meta["tensor_meta"]
    shape: list[int | str] = []
    for s in getattr(val, "shape", ()):
        if isinstance(s, torch.SymInt):
            text = str(s)
            for sym, label in sorted(sym_names.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(sym, label)
            shape.append(text)
        else:
            shape.append(int(s))
    for d in ranges:
        if d < len(shape) and isinstance(shape[d], int):
            shape[d] = dim_names.get((name, d), str(shape[d]))
    dtype = dtype_name(val.dtype) if getattr(val, "dtype", None) is not None else "float32"
    return TensorSpec(name, dtype, shape, dict(ranges))


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[:n]) + ("\n    ..." if len(lines) > n else "")


def _hint(errors: list[str]) -> str:
    text = " ".join(errors)
    if "Constraints violated" in text or "specializ" in text or "ConstraintViolation" in text:
        return ("a dim you marked dynamic is fixed by the model (a reshape to a constant, a size check); "
                "mark fewer dims dynamic or narrow their ranges")
    if "data-dependent" in text.lower() or "GuardOnDataDependentSymNode" in text:
        return ("the model branches on tensor values; rewrite that branch with torch.where / torch.cond, "
                "or compute it outside the model")
    if "Unsupported" in text or "graph break" in text:
        return "the model calls Python code torch.export cannot trace; move it out of forward()"
    return "run with GRAPHOPT_DEBUG=1 for the full traceback"
