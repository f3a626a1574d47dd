"""Property-based testing for passes: random small models, and one call that checks a pipeline.

Plugin authors reuse this module to test their passes the way graphopt tests its own::

    from hypothesis import given, settings
    from graphopt.testing import check_pass, random_models

    @given(random_models())
    @settings(max_examples=15, deadline=None)
    def test_my_pass_keeps_what_the_model_computes(rm):
        check_pass("cleanup,my-pass", rm.module, rm.example_inputs)

:func:`random_models` draws stacks of the blocks passes meet in LLMs (linears, norms, hand-written
attention, activations, SwiGLU, reshape round trips, residuals) plus the no-ops cleanup passes
remove (``x*1``, ``x+0``, ``clone``, ``contiguous``). When a property fails, hypothesis shrinks the
model to the smallest stack that still fails and prints its description.

:func:`check_pass` runs a pipeline exactly as :func:`graphopt.compile` does (capture, every pass
verified against the original graph with its own policy) and then checks what per-pass
verification cannot see: ``graph.lint()`` on the result, and that the optimized graph reproduces
the EAGER module on fresh random inputs it was never verified on.

``hypothesis`` is needed only by :func:`random_models` (``pip install 'graphopt[dev]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.compiler import optimize
from graphopt.errors import PassError, VerificationError
from graphopt.ir.structure import flatten
from graphopt.passes.pipeline import resolve
from graphopt.plugins import get_plugin_manager
from graphopt.verify.policies import Evidence, Policy, allclose
from graphopt.verify.verifier import make_verification_inputs

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ["RandomModel", "RandomNet", "check_pass", "random_models"]

#: Floor of the eager-vs-optimized tolerance: a captured ATen graph may round differently from the
#: eager module (decomposed ops) even when every pass is exact.
EAGER_RTOL = 1e-5
EAGER_ATOL = 1e-5


# -- the blocks random models are built from ---------------------------------------------------
# Each block maps [B, T, H_in] -> [B, T, H_out] and has a short ``describe()`` for failure output.


class Linear(nn.Linear):
    def describe(self) -> str:
        return f"Linear({self.in_features}->{self.out_features}{'' if self.bias is not None else ', no bias'})"


class LayerNorm(nn.LayerNorm):
    def describe(self) -> str:
        return f"LayerNorm({self.normalized_shape[0]})"


class RMSNorm(nn.Module):
    """Hand-written, as in Llama: ``x * rsqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def describe(self) -> str:
        return f"RMSNorm({self.weight.shape[0]}, eps={self.eps:g})"


class Attention(nn.Module):
    """Hand-written multi-head self-attention (nanoGPT / HF eager style).

    ``scale``: where ``1/sqrt(head_dim)`` is applied: ``"mul"`` or ``"div"`` on the scores, or
    ``"q"`` as ``q_proj(x) * scale`` right after the projection (BART/OPT/Whisper style).
    """

    def __init__(self, hidden: int, heads: int, scale: str, causal: bool, out_proj: bool, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.scale_mode, self.causal = scale, causal
        self.q = nn.Linear(hidden, hidden, bias=bias)
        self.k = nn.Linear(hidden, hidden, bias=bias)
        self.v = nn.Linear(hidden, hidden, bias=bias)
        self.o = nn.Linear(hidden, hidden, bias=bias) if out_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q = self.q(x)
        if self.scale_mode == "q":
            q = q * (1.0 / math.sqrt(self.head_dim))
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        att = q @ k.transpose(-2, -1)
        if self.scale_mode == "mul":
            att = att * (1.0 / math.sqrt(self.head_dim))
        elif self.scale_mode == "div":
            att = att / math.sqrt(self.head_dim)
        if self.causal:
            mask = torch.tril(torch.ones(t, t, device=x.device))
            att = att.masked_fill(mask == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, h)
        return self.o(y) if self.o is not None else y

    def describe(self) -> str:
        h = self.q.in_features
        flags = [f"heads={self.heads}", f"scale={self.scale_mode}"]
        flags += ["causal"] if self.causal else []
        flags += ["out_proj"] if self.o is not None else []
        flags += [] if self.q.bias is not None else ["no bias"]
        return f"Attention({h}, {', '.join(flags)})"


class Activation(nn.Module):
    KINDS = ("relu", "gelu", "gelu-tanh", "silu")

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "gelu":
            return F.gelu(x)
        if self.kind == "gelu-tanh":
            return F.gelu(x, approximate="tanh")
        return F.silu(x)

    def describe(self) -> str:
        return self.kind


class SwiGLU(nn.Module):
    """Llama's MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def describe(self) -> str:
        return f"SwiGLU({self.gate.in_features}->{self.gate.out_features})"


class ReshapeRoundTrip(nn.Module):
    """Layout changes that cancel out: what head splitting and merging leave behind."""

    MODES = ("transpose", "heads", "flatten")

    def __init__(self, mode: str, groups: int):
        super().__init__()
        self.mode, self.groups = mode, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        if self.mode == "transpose":
            return x.transpose(1, 2).transpose(1, 2)
        if self.mode == "heads":
            y = x.view(b, t, self.groups, h // self.groups).transpose(1, 2)
            return y.contiguous().transpose(1, 2).reshape(b, t, h)
        return x.reshape(b * t, h).view(b, t, h)

    def describe(self) -> str:
        return f"reshape-{self.mode}" + (f"({self.groups})" if self.mode == "heads" else "")


class NoOps(nn.Module):
    """``x*1``, ``x+0``, ``clone``, ``contiguous``: nothing computed, something for cleanup to remove."""

    KINDS = ("mul1", "add0", "clone", "contiguous")

    def __init__(self, kinds: list[str]):
        super().__init__()
        self.kinds = list(kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind in self.kinds:
            if kind == "mul1":
                x = x * 1
            elif kind == "add0":
                x = x + 0
            elif kind == "clone":
                x = x.clone()
            else:
                x = x.contiguous()
        return x

    def describe(self) -> str:
        return "noops(" + ",".join(self.kinds) + ")"


class Residual(nn.Module):
    """``x + inner(x)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)

    def describe(self) -> str:
        return f"x + {self.inner.describe()}"


class RandomNet(nn.Module):
    """A stack of blocks applied in order to ``x: float[B, T, H]``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def describe(self) -> str:
        return " -> ".join(b.describe() for b in self.blocks)


@dataclass(repr=False)
class RandomModel:
    """What :func:`random_models` draws: an eval-mode module, its example inputs ``(x,)``, a
    one-line description (shown when hypothesis reports a failing example) and, for
    ``random_models(dynamic=True)``, the dynamic dims to capture with."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    description: str
    dynamic: dict[str, dict[int, tuple[int, int]]] | None = None

    def __repr__(self) -> str:
        shapes = ", ".join(f"{list(t.shape)}" for t in self.example_inputs)
        dyn = f", dynamic={self.dynamic}" if self.dynamic else ""
        return f"RandomModel(x: {shapes}: {self.description}{dyn})"


def init_weights(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic, well-scaled weights from ``seed`` (independent of the global RNG): matrices
    ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() == 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def random_models(*, max_blocks: int = 4, dynamic: bool = False) -> SearchStrategy[RandomModel]:
    """A hypothesis strategy of :class:`RandomModel`: 1..``max_blocks`` random blocks on an input
    ``x: float32[B, T, H]`` (B in 1..3, T in 2..8, H in 4..32), weights from a drawn seed.

    With ``dynamic=True`` batch and sequence are dynamic dims (``{"x": {0: (1, 4), 1: (2, 16)}}``);
    B is then at least 2 (torch.export specialises size-1 dims), and the flatten round trip is
    left out (torch.export cannot keep ``seq`` symbolic through a causal mask followed by
    ``reshape(b*t, h)``).
    """
    try:
        from hypothesis import strategies as st
    except ImportError as e:  # a dev dependency, not a runtime one
        raise ImportError("graphopt.testing.random_models needs hypothesis: pip install 'graphopt[dev]'") from e

    reshape_modes = [m for m in ReshapeRoundTrip.MODES if not (dynamic and m == "flatten")]

    # Block kinds, simplest first: hypothesis shrinks towards the start of the list.
    same_width = ["noops", "activation", "layernorm", "rmsnorm", "reshape", "linear-square", "swiglu", "attention"]
    kinds = ["noops", "activation", "linear", "layernorm", "rmsnorm", "reshape", "residual", "swiglu", "attention"]

    def draw_block(draw: Any, kind: str, h: int) -> tuple[nn.Module, int]:
        if kind == "noops":
            return NoOps(draw(st.lists(st.sampled_from(NoOps.KINDS), min_size=1, max_size=3))), h
        if kind == "activation":
            return Activation(draw(st.sampled_from(Activation.KINDS))), h
        if kind == "linear":
            out = draw(st.integers(4, 32))
            return Linear(h, out, bias=draw(st.booleans())), out
        if kind == "linear-square":
            return Linear(h, h, bias=draw(st.booleans())), h
        if kind == "layernorm":
            return LayerNorm(h), h
        if kind == "rmsnorm":
            return RMSNorm(h, eps=draw(st.sampled_from([1e-6, 1e-5]))), h
        if kind == "reshape":
            mode = draw(st.sampled_from(reshape_modes))
            groups = draw(st.sampled_from([d for d in (2, 4, 1) if h % d == 0])) if mode == "heads" else 1
            return ReshapeRoundTrip(mode, groups), h
        if kind == "swiglu":
            return SwiGLU(h, draw(st.integers(4, 48))), h
        if kind == "attention":
            heads = draw(st.sampled_from([d for d in (1, 2, 4) if h % d == 0]))
            return Attention(h, heads, scale=draw(st.sampled_from(["mul", "div", "q"])),
                             causal=draw(st.booleans()), out_proj=draw(st.booleans()),
                             bias=draw(st.booleans())), h
        if kind == "residual":
            inner, _ = draw_block(draw, draw(st.sampled_from(same_width)), h)
            return Residual(inner), h
        raise ValueError(kind)

    @st.composite
    def models(draw: Any) -> RandomModel:
        h_in = h = draw(st.integers(4, 32))
        blocks = []
        for _ in range(draw(st.integers(1, max_blocks))):
            block, h_out = draw_block(draw, draw(st.sampled_from(kinds)), h)
            blocks.append(block)
            h = h_out
        net = RandomNet(blocks)
        seed = draw(st.integers(0, 2**16))
        init_weights(net, seed).eval()
        b = draw(st.integers(2 if dynamic else 1, 3))
        t = draw(st.integers(2, 8))
        x = torch.randn(b, t, h_in, generator=torch.Generator().manual_seed(seed + 1))
        dyn = {"x": {0: (1, 4), 1: (2, 16)}} if dynamic else None
        return RandomModel(net, (x,), f"seed={seed}: {net.describe()}", dyn)

    return models()


# -- checking a pipeline -----------------------------------------------------------------------


def check_pass(pipeline: str, model: nn.Module, example_inputs: Any, *, dynamic: Any = None,
               fresh_inputs: int = 2, seed: int = 1234, policy: Policy | None = None) -> dict[str, Any]:
    """Run ``pipeline`` on ``model`` as :func:`graphopt.compile` does and check the result.

    1. capture, then every pass verified against the original graph with its own policy
       (:func:`graphopt.optimize`, ``verify=True``): a failing pass raises its
       :class:`graphopt.VerificationError`, which names the pass and the first diverging node;
    2. every pass must actually have been verified (not so when the ``graphopt-instruments``
       plugin is blocked);
    3. ``graph.lint()`` on the optimized graph;
    4. the optimized graph must reproduce the EAGER ``model`` on ``fresh_inputs`` random input
       sets drawn with ``seed`` (dynamic dims varied within their ranges), under ``policy``
       (default: ``allclose`` with the loosest tolerance the pipeline's passes declare, at least
       ``rtol=atol=1e-5``; give ``graphopt.verify.metric(...)`` for lossy pipelines).

    Returns the compile report data (``report["passes"][i]["stats"]``, ``["verify"]``, ...) plus
    ``report["harness"]`` with the fresh-input check.

    Raises:
        graphopt.VerificationError: a pass, or the whole pipeline on fresh inputs, changed what
            the model computes.
        graphopt.PassError: a pass raised, or left a graph that fails ``lint()``.
    """
    passes = resolve(pipeline, get_plugin_manager().passes)
    original, optimized, report, _ = optimize(model, example_inputs, pipeline, dynamic=dynamic, verify=True)

    unverified = [r["name"] for r in report.passes if not (r.get("verify") or {}).get("passed")]
    if len(report.passes) != len(passes) or unverified:
        raise VerificationError(
            f"pipeline {pipeline!r}: {len(passes)} passes ran but {len(report.passes) - len(unverified)} were "
            f"verified (unverified: {unverified or 'all'}); is the graphopt-instruments plugin blocked by "
            "GRAPHOPT_DISABLE_PLUGINS?")

    try:
        optimized.graph.lint()
    except Exception as e:
        raise PassError(f"pipeline {pipeline!r} left a graph that fails graph.lint(): {e}") from e

    if policy is None:
        rtol = max([EAGER_RTOL] + [(p.verification or allclose()).tolerance()[0] for p in passes])
        atol = max([EAGER_ATOL] + [(p.verification or allclose()).tolerance()[1] for p in passes])
        policy = allclose(rtol=rtol, atol=atol)
    sets = make_verification_inputs(original, n_random=fresh_inputs, seed=seed)[1:]
    eager = [_run_eager(model, original, inp) for inp in sets]
    names = original.output_names
    for label, ir in (("captured graph (before any pass)", original), ("optimized graph", optimized)):
        got = [ir.run(inp) for inp in sets]
        outcome = policy.check(Evidence(output_names=names, original=eager, candidate=got, original_ir=original,
                                        candidate_ir=ir, inputs=sets))
        if not outcome.passed:
            shapes = "; ".join(", ".join(str(list(t.shape)) for t in inp) for inp in sets)
            blame = ("capture, not the pipeline: report it with the model" if ir is original else
                     "the pipeline; every pass verified on the example inputs, so a pass depends on their values")
            raise VerificationError(
                f"pipeline {pipeline!r}: the {label} does not reproduce the eager module on fresh random inputs "
                f"(seed {seed}, shapes {shapes}), policy {policy.describe()}: {outcome.message}\n"
                f"  this points at {blame}", record={"policy": policy.describe(), "message": outcome.message,
                                                     "worst_output": outcome.worst_output, **outcome.figures})
    data = dict(report.data)
    data["harness"] = {"fresh_input_sets": len(sets), "seed": seed, "policy": policy.describe(),
                       "message": outcome.message, "lint": "ok",
                       "nodes": {"original": original.node_count(), "optimized": optimized.node_count()}}
    return data


def _run_eager(model: nn.Module, ir: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The eager module on flat inputs, as flat output leaves in the graph's output order."""
    with torch.no_grad():
        if ir.call_convention == "keyword":
            out = model(**dict(zip(ir.input_names, inputs)))
        else:
            out = model(*inputs)
    leaves, _ = flatten(out, is_leaf=lambda x: isinstance(x, torch.Tensor))
    return list(leaves)
