"""Passes: the Pass contract, the registry, pipelines and the pass manager."""

from graphopt.passes.base import NoOptions, Pass, PassContext, PassResult
from graphopt.passes.manager import PassManager, StopPipeline, run_passes
from graphopt.passes.pipeline import BuildConfig, PassSpec, load_config, parse_pipeline, resolve

__all__ = ["NoOptions", "Pass", "PassContext", "PassResult", "PassManager", "StopPipeline", "run_passes",
           "BuildConfig", "PassSpec", "load_config", "parse_pipeline", "resolve"]
