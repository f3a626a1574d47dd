"""Shared pytest helpers.

The repo root is not necessarily on ``sys.path``, so sample model factories
under ``samples/models/`` are imported by file path.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MODELS_DIR = REPO_ROOT / "samples" / "models"


def load_sample_model(name: str):
    """Import ``samples/models/<name>.py`` by path and return the module.

    The module is registered in ``sys.modules`` (under a private name) before
    it is executed, which ``dataclasses`` and pickling need.
    """
    mod_name = f"_graphopt_sample_models_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = SAMPLE_MODELS_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load sample model {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


def optimize_verified(module, inputs, pipeline: str, dynamic=None):
    """``graphopt.optimize`` with every pass's verification asserted; returns the original and
    optimized graphs and the last pass's stats (the pass tests' common first step)."""
    import graphopt

    original, optimized, report, _ = graphopt.optimize(module.eval(), inputs, pipeline, dynamic=dynamic)
    for p in report.passes:
        assert p["verify"]["passed"], (p["name"], p["verify"]["message"])
    return original, optimized, report.passes[-1]["stats"]


def run_in_threads(n: int, fn) -> None:
    """``fn(i)`` for ``i`` in ``range(n)``, each in its own thread, all started before any is
    joined; an exception in any of them fails the caller (the first three are shown)."""
    import threading

    errors = []

    def wrap(i):
        try:
            fn(i)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def split_inputs(example_inputs):
    """``(args, kwargs)`` from a factory's tuple-or-dict example inputs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def dynamic_shapes_from_spec(module, example_inputs, dynamic):
    """Turn a factory's ``{input: {dim: (min, max)}}`` spec into export Dims.

    Returns a tuple (positional inputs, in ``forward`` signature order) or a
    dict (keyword inputs) suitable for ``torch.export.export(dynamic_shapes=)``.
    Entries with the same dim index and the same (min, max) share one
    ``torch.export.Dim`` (e.g. ``input_ids`` and ``attention_mask`` dims).
    """
    import torch

    if not dynamic:
        return None
    dims: dict = {}

    def dim_for(idx: int, lo: int, hi: int):
        key = (idx, lo, hi)
        if key not in dims:
            base = {0: "batch", 1: "seq"}.get(idx, f"dim{idx}")
            name = base if not any(k[0] == idx for k in dims) else f"{base}_{lo}_{hi}"
            dims[key] = torch.export.Dim(name, min=lo, max=hi)
        return dims[key]

    def shapes_for(name: str):
        spec = dynamic.get(name)
        if not spec:
            return None
        return {int(i): dim_for(int(i), int(lo), int(hi)) for i, (lo, hi) in spec.items()}

    if isinstance(example_inputs, dict):
        return {name: shapes_for(name) for name in example_inputs}
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = set(dynamic) - set(params[: len(example_inputs)])
    if unknown:
        raise KeyError(f"dynamic spec names {sorted(unknown)} are not positional inputs {params}")
    return tuple(shapes_for(params[i]) for i in range(len(example_inputs)))


@pytest.fixture(scope="session")
def sample_model_loader():
    """Fixture returning :func:`load_sample_model`."""
    return load_sample_model


@pytest.fixture(scope="session")
def sample_models():
    """Namespace of the sample-model helpers (``load``, ``split_inputs``,
    ``dynamic_shapes_from_spec``), so tests need not ``import conftest``."""
    return SimpleNamespace(
        load=load_sample_model,
        split_inputs=split_inputs,
        dynamic_shapes_from_spec=dynamic_shapes_from_spec,
    )


# -- the default run's size -----------------------------------------------------------------------
#: Integration runs of 15 s or more on the 2-core CI machine whose mechanism a smaller test in the
#: default run also covers (named after each): deselected by default, run with ``-m heavy`` (or
#: ``make test-full``). Node ids, matched from the start.
HEAVY = {
    # the bench cases end to end; tests/test_bench.py keeps their argument handling and units
    "tests/test_bench.py::test_scale_case_quick_on_the_tiny_model",
    "tests/test_bench.py::test_minilm_case_quick_tiny",
    "tests/test_bench.py::test_compile_case_quick_on_nanogpt",
    "tests/test_bench.py::test_parallel_case_quick_on_the_tiny_model",  # tests/test_parallel.py stays
    # every sample README's commands; the CLI round trips below and make demo cover the commands
    "tests/test_samples.py::test_readme_commands_run",
    # remove-padding on MiniLM: GPT-2's flattened rows and the pass's own tests stay
    "tests/passes/test_remove_padding.py::test_minilm_real_tokens_unchanged_and_padding_zero",
    "tests/passes/test_remove_padding.py::test_graphopt_run_replays_the_zeroed_examples",
    # generate from a prompt: test_checkpoint_dir's CLI compile + generate stays
    "tests/test_cli.py::test_generate_prompt_on_the_trained_model",
    # a lossy pass before kv-cache: test_a_wrong_cache_after_a_lossy_pass_is_still_caught stays;
    # single prompt: qwen2 stays
    "tests/test_first_try.py::test_lossy_pass_before_kv_cache_on_the_trained_decoder[quantize",
    "tests/test_first_try.py::test_lossy_pass_before_kv_cache_on_the_trained_decoder[precision",
    "tests/test_first_try.py::test_single_prompt_kv_cache_with_nothing_declared[llama]",
    "tests/test_first_try.py::test_single_prompt_kv_cache_with_nothing_declared[gpt2]",
    "tests/test_first_try.py::test_bf16_decoder_with_kv_cache_on_the_default_target",
    "tests/test_first_try.py::test_batch_two_example_with_only_the_sequence_declared",
    # copy-on-write: four other pipelines stay
    "tests/test_shared_weights.py::test_no_pass_writes_into_a_shared_weight[shakespeare-smoothquant]",
    # fp16 on MiniLM: tests/passes/test_precision.py's Llama cases stay
    "tests/passes/test_precision.py::test_minilm_fp16[onnx]",
    # CLI compile + run: nanogpt on both targets stays (MiniLM: test_first_try)
    "tests/test_cli.py::test_compile_then_run_reproduces_the_module[hf_gpt2-",
    "tests/test_cli.py::test_compile_then_run_reproduces_the_module[minilm-",
    "tests/test_cli.py::test_compile_then_run_reproduces_the_module[hf_llama-torch]",
    # the TensorRT-style quantized artifacts' static check: smoothquant stays
    "tests/passes/test_quant.py::test_tensorrt_style_quantized_artifacts_pass_the_static_check[fp8]",
    "tests/passes/test_quant.py::test_tensorrt_style_quantized_artifacts_pass_the_static_check[w8a8]",
    # bf16 checkpoints: tests/test_half_precision.py stays
    "tests/test_checkpoint_dir.py::test_bf16_from_the_config_on_the_onnx_target",
    "tests/passes/test_fuse_activations.py::test_gpt2_lowers_to_gelu",
    "tests/backends/test_tensorrt_check.py::test_sample_artifacts_check_clean[10.15]",
    # generate vs eager greedy: tests/test_first_try.py (qwen2, batch 1 and 2) and test_engine_api stay
    "tests/passes/test_kv_cache.py::test_generate_matches_eager_greedy",
    # decoding equivalence on the trained decoder: hf_llama (eager, sdpa, static), GPT-2, nanoGPT stay
    "tests/passes/test_kv_cache.py::test_decoding_equivalence_on_real_models[shakespeare",
    "tests/test_checkpoint_dir.py::test_bf16_from_the_config_on_the_torch_target",
    # a checkpoint directory from Python: the CLI compile of one (+ generate) stays
    "tests/test_checkpoint_dir.py::test_compile_a_checkpoint_dir_from_python",
    # the refusal before capture: test_cli_refusal_exits_2 stays
    "tests/test_shared_weights.py::test_a_compile_that_cannot_fit_is_refused_before_capture",
    "tests/test_shared_weights.py::test_no_pass_writes_into_a_shared_weight[minilm-remove-padding]",
    "tests/test_first_try.py::test_lossy_pass_before_kv_cache_on_the_trained_decoder[prune",
    "tests/test_cli.py::test_compile_then_run_reproduces_the_module[hf_llama-onnx]",
    # half precision: float16 on the same model stays
    "tests/test_half_precision.py::test_half_model_matches_the_module[bfloat16-onnx-cleanup,fuse-qwen2]",
    "tests/passes/test_prune.py::test_structured_artifacts_run[torch-",
    # merge-gemms on Llama: test_llama_qkv_and_gate_up (graph and numerics) stays
    "tests/passes/test_merge_gemms.py::test_llama_lowers",
    # the TensorRT static check of the samples: the quantized and packed artifacts' checks stay
    "tests/backends/test_tensorrt_check.py::test_sample_artifacts_check_clean[11]",
    # GPT-2 through the onnx backend: tests/passes/test_remove_padding.py's GPT-2 artifact stays
    "tests/backends/test_onnx_backend.py::test_gpt2_tiny",
    # concurrent generation: test_8_threads_x_100_direct_calls_identical_to_single_thread stays
    "tests/test_production_loading.py::test_concurrent_generation_matches_sequential",
    # the serve bench end to end: tests/serving covers the server under concurrent load, test_bench
    # the harness (as for the other bench cases above)
    "tests/test_bench.py::test_serve_case_quick_on_the_trained_decoder",
    "tests/test_bench.py::test_speculative_case_quick_on_the_trained_decoder",
    # speculative decoding on GPT-2: nanoGPT's learned positions and the Llama's stay
    "tests/test_speculative.py::test_greedy_tokens_equal_plain_generate[gpt2]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.nodeid.startswith(h) for h in HEAVY):
            item.add_marker(pytest.mark.heavy)


def pytest_configure(config):
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs two workers on two cores: one thread each
        import torch

        torch.set_num_threads(1)
