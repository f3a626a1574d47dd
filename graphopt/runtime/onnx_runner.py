"""Runs an ONNX payload with ONNX Runtime.

Provider choice: CUDA when this onnxruntime build has the CUDA execution provider *and* torch sees
a GPU (onnxruntime-gpu on a machine without a usable GPU would otherwise fail at the first run),
else CPU. Graph optimizations are at ``ORT_ENABLE_ALL``: ONNX Runtime's own fusions come on top of
graphopt's passes, except the ones measured to slow graphopt's graphs down on the CPU provider
(:data:`CPU_DISABLED_OPTIMIZERS`; ``disabled_optimizers=[]`` restores them all).

Thread safety: ``InferenceSession.run`` (and ``run_with_iobinding`` with distinct bindings) may
be called from several threads at once, and the runner keeps no mutable state of its own, so one
runner serves concurrent requests. What is NOT shareable lives per call: an ``IOBinding`` (and the
generation state bound to it) is created by each ``Engine.generate`` call for its own steps
(``runtime/generation.py``), never stored on the runner. ``close()`` only drops the reference: calls
already running keep their session alive; later calls get an ArtifactError.

bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels (no bf16 ``MatMul``), and numpy
has no bfloat16 for its Python API either, so the onnx target computes a bfloat16 graph in float32
(:mod:`graphopt.backends.onnx`). The runner keeps the model's own interface on top of that: bfloat16
inputs (torch tensors, or ``ml_dtypes`` arrays) are widened to the float32 the session takes
(exact), and the outputs the model returns in bfloat16 are rounded back to bfloat16
(``output_dtypes``), as the model itself rounds them.

Loading reads protobuf (and raw external-data bytes) only; nothing is unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.backends.base import Runner
from graphopt.errors import ArtifactError, InputError, first_line
from graphopt.runtime.arrays import RAW_BITS, as_tensor, is_ml_dtypes_array

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


#: ONNX Runtime fusions left out when the CPU provider runs the graph. Measured with onnxruntime
#: 1.31 on MiniLM-L6 (batch 8 x 128, 2 threads, graphopt ``cleanup,fuse``): the contrib
#: ``SkipLayerNormalization`` kernel takes ~1.15 ms per call where the ``Add`` +
#: ``LayerNormalization`` it replaces take ~0.5 ms, and ``BiasGelu`` is no faster than ``Add`` +
#: ``Gelu``; with both fusions off the model runs ~15 % faster. (graphopt already emits the
#: standard fused ops, so nothing else is lost.) GPU providers keep every fusion.
CPU_DISABLED_OPTIMIZERS: tuple[str, ...] = ("SkipLayerNormFusion", "BiasGeluFusion")

#: Also left out on CPU when the graph quantizes activations (``QuantizeLinear``): on 2-D
#: activations (after ``remove-padding``) ONNX Runtime 1.32 turns ``MatMul`` + ``Add`` into ``Gemm``
#: before its QDQ fusion runs, and a ``Gemm`` between dequantized operands then runs in fp32
#: instead of becoming ``MatMulIntegerToFloat`` (measured: 0 of 13 int8 GEMMs fused with it, 13 of
#: 13 without it).
CPU_DISABLED_OPTIMIZERS_QDQ: tuple[str, ...] = ("MatMulAddFusion",)


def default_providers() -> list[str]:
    """CUDA then CPU where both onnxruntime and torch can use a GPU; CPU otherwise."""
    import onnxruntime as ort

    if CUDA_PROVIDER in ort.get_available_providers() and torch.cuda.is_available():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


class OnnxRuntimeRunner(Runner):
    """An ``onnxruntime.InferenceSession`` over ``model.onnx``.

    Args:
        model_path: the ``.onnx`` file (its external data file, if any, beside it).
        providers: execution providers in priority order (default: :func:`default_providers`).
        threads: intra-op thread count (default: ONNX Runtime's choice, one per physical core).
        spinning: whether idle intra-op threads spin waiting for work (ONNX Runtime's default,
            ``None``, is yes: lowest latency for back-to-back calls; ``False`` frees the cores between
            calls for other work in the process, e.g. torch, or a benchmark's other systems).
        disabled_optimizers: ONNX Runtime graph optimizers to leave out (default: none on GPU
            providers, :data:`CPU_DISABLED_OPTIMIZERS` when the CPU provider comes first).
        session_config: extra ``SessionOptions`` config entries (``{"session.disable_prepacking": "1"}``).
        output_dtypes: per output, the torch dtype to return it in when the session computes it in
            another one (``torch.bfloat16`` for the outputs of a bfloat16 graph computed in float32);
            ``None`` entries (and the default) return what the session gives.
    """

    def __init__(self, model_path: str | Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None, spinning: bool | None = None,
                 disabled_optimizers: Sequence[str] | None = None,
                 output_dtypes: Sequence[torch.dtype | None] | None = None,
                 session_config: dict[str, str] | None = None, model: bytes | None = None):
        import onnxruntime as ort

        self.options = {"providers": providers, "threads": threads, "spinning": spinning,
                        "disabled_optimizers": disabled_optimizers, "session_config": session_config}
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ArtifactError(f"ONNX model {self.model_path} does not exist; the artifact directory is "
                                "incomplete: compile the model again")
        available = ort.get_available_providers()
        wanted = list(providers) if providers else default_providers()
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise ArtifactError(f"execution provider(s) {unknown} are not in this onnxruntime build "
                                f"({ort.__version__}); available: {available}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if int(threads) < 0:
                raise InputError(f"threads must be >= 0 (0: onnxruntime's default), got {threads}")
            opts.intra_op_num_threads = int(threads)
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        for key, value in (session_config or {}).items():  # e.g. session.disable_prepacking
            opts.add_session_config_entry(str(key), str(value))
        if model is not None:  # a model given as bytes: its external data files are beside model_path
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(self.model_path.parent))
        opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
        if disabled_optimizers is None:
            disabled_optimizers = CPU_DISABLED_OPTIMIZERS if wanted[0] == CPU_PROVIDER else ()
            if wanted[0] == CPU_PROVIDER and _quantizes_activations(self.model_path if model is None else model):
                disabled_optimizers += CPU_DISABLED_OPTIMIZERS_QDQ
        self.disabled_optimizers = list(disabled_optimizers)
        extra = {"disabled_optimizers": self.disabled_optimizers} if self.disabled_optimizers else {}
        try:
            self.session = ort.InferenceSession(str(self.model_path) if model is None else model, sess_options=opts,
                                                providers=wanted,
                                                **extra)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise ArtifactError(
                f"onnxruntime {ort.__version__} could not load {self.model_path}: "
                f"{type(e).__name__}: {first_line(str(e))}. The file is damaged or was built for a newer "
                "onnxruntime (IR version / opset); compile it again with this environment") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = [i.type for i in self.session.get_inputs()]  # "tensor(float)", ...
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = list(output_dtypes) if output_dtypes is not None else [None] * len(self.output_names)
        if len(self.output_dtypes) != len(self.output_names):
            raise ArtifactError(f"{self.model_path} has {len(self.output_names)} outputs but the manifest lists "
                                f"{len(self.output_dtypes)}; the artifact directory is inconsistent: compile it again")
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers and self.providers[0] == CUDA_PROVIDER else "cpu"

    def run(self, inputs: list[Any]) -> list[torch.Tensor]:
        """Run on flat inputs in manifest order (torch tensors or numpy arrays); outputs as torch
        tensors on the CPU."""
        if len(inputs) != len(self.input_names):
            raise InputError(f"the ONNX model takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        session = self.session  # one read: close() from another thread cannot pull it away mid-call
        if session is None:
            raise ArtifactError(f"{self!r} was closed; load the artifact again to run it")
        feed = {name: self.feed_array(i, x) for i, (name, x) in enumerate(zip(self.input_names, inputs))}
        try:
            outs = session.run(self.output_names, feed)
        except Exception as e:
            if type(e).__name__ == "InvalidArgument":  # wrong dtype, rank or static size
                raise InputError(f"onnxruntime rejected the inputs: {first_line(str(e))}") from e
            raise
        out = [torch.from_numpy(np.ascontiguousarray(o)) if isinstance(o, np.ndarray) else torch.as_tensor(o)
               for o in outs]
        return [t if dt is None or t.dtype == dt else t.to(dt) for t, dt in zip(out, self.output_dtypes)]

    def feed_array(self, index: int, x: Any) -> np.ndarray:
        """Input ``index`` (a torch tensor or numpy array) as the numpy array the session takes.

        A bfloat16 value (torch, or an ``ml_dtypes`` array) for a float32 session input is widened
        to float32, which holds every bfloat16 value exactly; other dtypes pass as they are (the
        Engine has already cast them to the artifact's dtypes)."""
        name, onnx_type = self.input_names[index], self.input_types[index]
        if is_ml_dtypes_array(x):
            x = as_tensor(x)
        if isinstance(x, np.ndarray):
            return x
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input {name!r} is a {type(x).__name__}; pass a torch tensor or a numpy array")
        x = x.detach()
        if x.dtype in RAW_BITS:
            if onnx_type != "tensor(float)":
                raise InputError(f"input {name!r} is {x.dtype}, which ONNX Runtime's Python API cannot take (this "
                                 f"model's input is {onnx_type}); compile with --target onnx, which computes a "
                                 "bfloat16 graph in float32, or use the torch target")
            x = x.float()
        return x.cpu().contiguous().numpy()

    def sibling(self, model: bytes) -> OnnxRuntimeRunner:
        """A runner of another model (serialized, its external data files those of this one's) with
        this one's session options (providers, threads, spinning, optimizers)."""
        return OnnxRuntimeRunner(self.model_path, model=model, **self.options)

    def close(self) -> None:
        # Dropping the session frees its memory (and the mapped external-data file).
        self.session = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OnnxRuntimeRunner({self.model_path.name}, providers={self.providers})"




def _quantizes_activations(path: Path | bytes) -> bool:
    """Whether the graph (a file, or serialized) holds a ``QuantizeLinear`` (activation
    quantization; weights are stored quantized and only dequantized). Reads the graph structure
    only, not external weight data."""
    import onnx

    try:
        model = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path),
                                                                                     load_external_data=False)
    except Exception:
        return False  # the session load that follows reports a damaged file
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)
