"""``graphopt serve``: check the artifact and the settings, then run the app under uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting connections, lets in-flight requests finish
(up to ``--shutdown-timeout`` seconds), then the app's shutdown stops the scheduler, and the
process exits 0. ``--workers N`` runs N processes, each with its own engine and scheduler (N x the
model's memory); the settings reach them through ``GRAPHOPT_SERVE_CONFIG``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

from graphopt.errors import InputError
from graphopt.serving.app import ServeConfig, create_app
from graphopt.serving.batch import check_servable

ENV = "GRAPHOPT_SERVE_CONFIG"


def check(config: ServeConfig) -> None:
    """What would stop the server from serving, from the manifest alone (no model loaded): an
    :class:`InputError` naming the fix, before the port is bound."""
    from graphopt.artifact import read_manifest
    from graphopt.runtime.generation import limits

    path = Path(config.artifact)
    if not (path / "manifest.json").is_file():
        raise InputError(f"{path} is not an artifact directory (no manifest.json); compile one with "
                         "graphopt compile MODEL --pipeline cleanup,fuse,kv-cache --out DIR")
    manifest = read_manifest(path)
    gen = check_servable(manifest, path)
    if config.cache == "slots" and (manifest.get("target") != "onnx" or gen.get("static")):
        raise InputError(f"--cache slots needs an ONNX artifact with a dynamic cache; {path} is "
                         f"{'a static-cache' if gen.get('static') else 'a ' + str(manifest.get('target'))} artifact: "
                         "serve it with --cache auto or concat")
    lim = limits(manifest)
    if not 1 <= config.max_batch <= lim.batch[1]:
        raise InputError(f"--max-batch {config.max_batch} is outside the batch range the artifact was compiled "
                         f"for ({lim.batch[0]}..{lim.batch[1]}); pass --max-batch {lim.batch[1]} or less, or "
                         f"recompile with --dynamic {lim.ids}:0=1..{config.max_batch}")
    if config.max_queue < 0 or config.max_tokens_per_step < 1:
        raise InputError("--max-queue must be >= 0 and --max-tokens-per-step >= 1")
    if any(e < 0 or (lim.vocab is not None and e >= lim.vocab) for e in config.eos):
        raise InputError(f"--eos {config.eos} holds a token id outside the vocabulary 0..{(lim.vocab or 0) - 1}")


def app_from_env():
    """The app of one uvicorn worker, from the settings ``serve`` put in the environment."""
    return create_app(ServeConfig(**json.loads(os.environ[ENV])))


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info") -> int:
    import uvicorn

    check(config)
    if workers < 1:
        raise InputError("--workers must be >= 1")
    os.environ[ENV] = json.dumps(dataclasses.asdict(config))
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the
    # handlers it found, to end the process "the expected way" (killed by the signal: exit -15).
    # A server that stopped cleanly exits 0: the handlers it finds take the re-raised signal quietly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run("graphopt.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                timeout_graceful_shutdown=int(config.shutdown_timeout), log_level=log_level)
    return 0
