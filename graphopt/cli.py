"""The ``graphopt`` command.

Exit codes: 0 ok, 1 verification failed, 2 usage or input error, 3 internal error (a bug: rerun
with ``--debug`` or ``GRAPHOPT_DEBUG=1`` for the traceback and report it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

EPILOG = """exit codes: 0 ok, 1 verification failed, 2 usage or input error, 3 internal error.
environment: GRAPHOPT_PLUGINS=mod,...  extra plugin modules;  GRAPHOPT_DISABLE_PLUGINS=name,...  block plugins;
             GRAPHOPT_STRICT_PLUGINS=1  a plugin that fails to load is fatal;  GRAPHOPT_DEBUG=1  tracebacks."""


def _eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


class _Progress:
    """Per-pass progress lines on stderr while a pipeline runs."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, event: str, **kw: Any) -> None:
        if self.quiet:
            return
        if event == "start":
            p = kw["pass_"]
            print(f"[{kw['index'] + 1}/{kw['total']}] {p.spec()} ...", end="", file=sys.stderr, flush=True)
        elif event == "end":
            rec = kw.get("record") or {}
            v = rec.get("verify") or {}
            status = "ok" if v.get("passed") else ("not verified" if not v else "FAILED")
            err = v.get("error_vs_original")
            err_s = f", err {err:.2e}" if isinstance(err, float) else ""
            mem = f", rss {rec['rss_gib']:.2f} GiB (peak {rec['peak_rss_gib']:.2f})" if "rss_gib" in rec else ""
            vt = f" in {v['time_s']:.2f}s" if isinstance(v.get("time_s"), (int, float)) else ""
            print(f" {rec.get('time_s', 0):.2f}s, nodes {rec.get('nodes_before')}→{rec.get('nodes_after')}, "
                  f"{v.get('policy', '')} {status}{vt}{err_s}{mem}", file=sys.stderr, flush=True)
        elif event == "phase" and not kw["name"].startswith("pass:"):
            # capture, verification set-up, lowering, its check, writing: elapsed time and memory
            if kw["status"] == "start":
                print(f"[{kw['name']}] ... (at {kw['elapsed_s']:.1f}s, rss {kw['rss_gib']:.2f} GiB)",
                      file=sys.stderr, flush=True)
            else:
                print(f"[{kw['name']}] done in {kw['time_s']:.2f}s, rss {kw['rss_gib']:.2f} GiB "
                      f"(peak {kw['peak_rss_gib']:.2f}), {kw['elapsed_s']:.1f}s elapsed", file=sys.stderr, flush=True)
        elif event == "verification_inputs":
            print(f"[verify:setup] every check runs on {kw['text']}", file=sys.stderr, flush=True)
        elif event == "lower":
            pass  # the "lower" phase lines say it, with time and memory
        elif event == "calibrate":  # graphopt-quant: observing calibration batches
            print(f" {kw['done']}/{kw['total']}" if kw["done"] == kw["total"] or kw["done"] % 8 == 0 else "",
                  end="", file=sys.stderr, flush=True)
        elif event == "lowered":
            rec = kw.get("record") or {}
            v = rec.get("verify") or {}
            err = v.get("error_vs_original")
            err_s = f", err {err:.2e}" if isinstance(err, float) else ""
            print(f"[lower:{rec.get('target', '')}] {v.get('policy', '')} {'ok' if v.get('passed') else 'FAILED'}{err_s}",
                  file=sys.stderr, flush=True)


def _parse_dynamic(items: list[str]) -> dict[str, dict[int, tuple[int, int]]]:
    from graphopt.errors import InputError

    out: dict[str, dict[int, tuple[int, int]]] = {}
    for item in items or []:
        try:
            name, rest = item.split(":", 1)
            dim, rng = rest.split("=", 1)
            lo, hi = rng.replace("..", ":").split(":")
            out.setdefault(name, {})[int(dim)] = (int(lo), int(hi))
        except ValueError:
            raise InputError(f"--dynamic {item!r} must look like NAME:DIM=MIN..MAX, e.g. input_ids:1=1..512") from None
    return out


# -- subcommands -----------------------------------------------------------------------------
def cmd_compile(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.checkpoint import is_checkpoint_dir
    from graphopt.errors import InputError
    from graphopt.model_loader import factory_tokenizer, load_factory_with_module
    from graphopt.passes.pipeline import BuildConfig, load_config

    cfg = load_config(args.config) if args.config else BuildConfig()
    if args.pipeline and args.config:
        raise InputError("give either --pipeline or --config (whose 'pipeline' key sets the passes), not both")
    model_spec = args.model or cfg.model
    if not model_spec:
        raise InputError("no MODEL given: pass path/to/file.py:factory or a checkpoint directory (or set "
                         "model = \"...\" in the --config file)")
    pipeline = args.pipeline or cfg.pipeline
    target = args.target or cfg.target or "onnx"
    out = args.out or cfg.out
    if is_checkpoint_dir(model_spec):  # compile() loads it (config.json, safetensors, tokenizer) once the
        module, example_inputs, dynamic, factory_file = model_spec, None, None, None  # pipeline and target check out
    else:
        module, example_inputs, dynamic, factory_file = load_factory_with_module(model_spec)
    dynamic = dict(dynamic or {})
    for name, dims in {**cfg.dynamic, **_parse_dynamic(args.dynamic)}.items():
        dynamic.setdefault(name, {}).update(dims)
    progress = _Progress(args.quiet)
    if not args.quiet:
        _eprint(f"graphopt {graphopt.__version__}: {model_spec} → {target}, pipeline {pipeline!r}")
    art = graphopt.compile(module, example_inputs, pipeline=pipeline, target=target, out=out, dynamic=dynamic or None,
                           verify=not (args.no_verify or not cfg.verify), dump_ir=args.dump_ir,
                           report=None if args.report == "json" else "html", inputs=args.inputs or cfg.inputs,
                           target_options=_require_engine(args, target, cfg.target_options), n_random=args.random_inputs,
                           progress=progress, model_spec=model_spec,
                           tokenizer=args.tokenizer or cfg.tokenizer or factory_tokenizer(factory_file), dtype=args.dtype,
                           layers=args.layers)
    from graphopt.report import format_table

    print(format_table(art.report))
    for note in (art.report.get("lowering") or {}).get("notes", []):
        print(f"note: {note}")
    extra = " + report.html" if args.report != "json" else ""
    print(f"artifact: {art.path} (manifest.json, report.json{extra})")
    return EXIT_OK


LAUNCH_HELP = ("tensor-parallel artifacts: start the N ranks here (torchrun --standalone --nproc-per-node N, "
               "gloo on CPU) and run this command on each; rank 0 prints. N must be the artifact's world size. "
               "Without it, start the command under torchrun yourself")


RANK_STATUS_ENV = "GRAPHOPT_RANK_STATUS_DIR"  # where the ranks --launch started write their exit codes


def launch(args: argparse.Namespace) -> int:
    """``--launch N``: this same command on N ranks under torchrun (``python -m torch.distributed.run
    --standalone --nproc-per-node N -m graphopt.cli ...``), for tensor-parallel artifacts. The
    artifact's world size is checked first, so a wrong N is a usage error, not N failing ranks."""
    import subprocess

    from graphopt.artifact import read_manifest
    from graphopt.errors import InputError

    n = args.launch
    if os.environ.get(RANK_STATUS_ENV) or os.environ.get("RANK"):
        raise InputError("--launch inside a rank (under torchrun, or started by --launch): leave --launch out there")
    if n < 1:
        raise InputError(f"--launch {n}: the number of ranks must be positive")
    tp = read_manifest(args.dir).get("tensor_parallel")
    if not tp:
        raise InputError(f"--launch {n}: {args.dir} is not tensor-parallel (one program for one process); run it "
                         "without --launch, or compile with tensor-parallel(world_size=N) to shard it")
    if n != int(tp["world_size"]):
        raise InputError(f"--launch {n}: {args.dir} is sharded over {tp['world_size']} ranks; use --launch "
                         f"{tp['world_size']}")
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
            continue
        flag = a.split("=", 1)[0]
        if len(flag) > 3 and "--launch".startswith(flag):  # --launch, or an abbreviation argparse took for it
            skip = "=" not in a
            continue
        argv.append(a)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="graphopt-launch-") as tmp:
        codes, logs = Path(tmp, "codes"), Path(tmp, "logs")
        codes.mkdir()
        # rank 0 writes to this console (streamed text); the other ranks' output goes to log files,
        # shown when they fail; torchrun's own log lines and its traceback of a failed rank are
        # dropped when the ranks said what failed themselves
        others = ",".join(f"{r}:3" for r in range(1, n))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               f"--log-dir={logs}", *([f"--redirects={others}"] if others else []), "-m", "graphopt.cli", *argv]
        env = {**os.environ, RANK_STATUS_ENV: str(codes),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))}
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        shown, held = _relay_stderr(proc.stderr)
        rc = proc.wait()
        # torchrun exits 1 for any failed rank: the ranks' own exit codes say what failed
        ranks = {int(p.name[4:]): int(p.read_text()) for p in codes.glob("rank*")}
        failed = [r for r, code in ranks.items() if code != 0]
        unexplained = rc != 0 and not failed  # ranks that died without a word (torchrun ends the others
        if unexplained:  # once one fails: those were stopped, not failing): what torchrun saw is the evidence
            sys.stderr.write("".join(held))
        rank0_err = "".join(shown)
        for r in range(1, n):
            if r in failed or unexplained:
                for f in logs.glob(f"**/{r}/stderr.log"):
                    text = f.read_text(errors="replace").strip()
                    if text and text not in rank0_err:
                        _eprint("\n".join(f"[rank {r}] {line}" for line in text.splitlines()[-20:]))
    if rc == 0:
        return EXIT_OK
    codes_ = list(ranks.values())
    return max(codes_) if codes_ and max(codes_) in (EXIT_VERIFY, EXIT_USAGE) else EXIT_INTERNAL


def _relay_stderr(stream) -> tuple[list[str], list[str]]:
    """Copy the launched command's stderr to ours as it comes, except torchrun's own log lines
    (``W1206 21:07:58.844 ... torch/distributed/...``) and, from its first ``Traceback`` on, what
    torchrun prints when a rank fails: returns (the lines shown, those held back, to be shown only if
    no rank explained)."""
    import re

    agent = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d")
    shown: list[str] = []
    held: list[str] = []
    for line in stream:
        if held or line.startswith("Traceback (most recent call last)") or agent.match(line):
            held.append(line)
            continue
        shown.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()
    # a traceback that is not torchrun's (a rank's, under --debug) is shown after all
    text = "".join(held)
    if held and "torch/distributed/run.py" not in text and "ChildFailedError" not in text:
        rest = [x for x in held if not agent.match(x)]
        sys.stderr.write("".join(rest))
        return shown + rest, []
    return shown, held


def _secondary_rank(eng) -> bool:
    """A rank other than 0 of a tensor-parallel artifact: it computes, rank 0 prints."""
    return eng.world_size > 1 and eng.rank != 0


def _empty_cache_feeds(eng, feeds: dict) -> dict:
    """A kv-cache artifact's stored examples are the model's own inputs: the cache inputs they lack
    are an empty cache (a prefill), so the logits compare with the model's."""
    gen = eng.manifest.get("generation")
    if not gen or gen["ids"] not in feeds:
        return {}
    import torch

    from graphopt.runtime.generation import empty_cache_input

    batch = feeds[gen["ids"]].shape[0]
    out = {}
    for spec in eng.inputs:
        if spec.name in feeds:
            continue
        if spec.name in gen["cache_inputs"]:
            out[spec.name] = empty_cache_input(spec, batch)
        elif spec.name == gen.get("cache_position"):
            out[spec.name] = torch.zeros(1, dtype=torch.int64)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import graphopt
    from graphopt.compiler import read_npz
    from graphopt.runtime.arrays import RAW_BITS, to_numpy

    if args.launch:
        return launch(args)
    opts = {"threads": args.threads} if args.threads else {}
    eng = graphopt.load(args.dir, **opts)
    if args.inputs:
        feeds, expected = read_npz(args.inputs), None
        if eng.world_size > 1:  # whole arrays in the file: this rank's slices
            from graphopt.parallel import shard_named

            feeds = shard_named(feeds, eng.manifest["tensor_parallel"]["sharded_inputs"], eng.rank, eng.world_size)
    else:
        feeds = eng.example_inputs()  # bfloat16 examples come back as torch tensors (numpy has none)
        expected = eng.expected_outputs()
        feeds.update(_empty_cache_feeds(eng, feeds))
    flat = eng.bind(**feeds)
    t0 = time.perf_counter()
    outs = [o.detach().cpu() for o in eng.run_flat(flat)]
    dt = time.perf_counter() - t0
    if eng.world_size > 1:  # tensor-parallel: the ranks' slices of the sharded outputs, made whole
        from graphopt.parallel import gather_outputs

        outs = gather_outputs(eng, outs)
        if _secondary_rank(eng):  # rank 0 reports and writes
            return EXIT_OK
    # numpy has no bfloat16: such outputs are written as float32, which holds them exactly
    arrays = {n: to_numpy(o) for n, o in zip(eng.output_names, outs)}
    ranks = f" on {eng.world_size} ranks (tensor-parallel)" if eng.world_size > 1 else ""
    prefill = " (a prefill: empty KV cache)" if eng.manifest.get("generation") and expected is not None else ""
    print(f"ran {eng.path} ({eng.target}){ranks} in {dt * 1000:.1f} ms on "
          f"{'the stored example inputs' + prefill if expected is not None else args.inputs}")
    for n, o in zip(eng.output_names, outs):
        widened = " (written as float32)" if args.output and o.dtype in RAW_BITS else ""
        print(f"  {n}: {str(o.dtype).replace('torch.', '')}{list(o.shape)}{widened}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **arrays)
        print(f"outputs written to {out}")
    if expected is not None:
        # fp16/bf16 outputs round at ~1e-3 / ~8e-3 relative: a runtime that sums in another order (or
        # computes a bf16 graph in fp32) differs by a few ulps, so for them --atol is raised to 4 ulps of
        # the output's largest magnitude
        worst, bound = 0.0, args.atol
        for n, o in zip(eng.output_names, outs):
            if n not in expected or o.numel() == 0:
                continue
            want = to_numpy(expected[n]).astype(np.float64)
            err = float(np.abs(to_numpy(o).astype(np.float64) - want).max())
            tol = args.atol
            if o.dtype in (torch.float16, torch.bfloat16):
                tol = max(tol, 4 * torch.finfo(o.dtype).eps * float(np.abs(want).max()))
            if err - tol > worst - bound:
                worst, bound = err, tol
        ok = worst <= bound
        whose = ("the optimized graph (a lossy pass ran)" if (eng.manifest.get("examples") or {}).get("outputs_of")
                 == "optimized" else "the original module")
        rule = f"atol {bound:.3g}" + (" = 4 ulps of the half-precision output" if bound > args.atol else "")
        print(f"max abs error vs {whose}: {worst:.3g} ({'ok' if ok else 'FAILED'}, {rule})")
        return EXIT_OK if ok else EXIT_VERIFY
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.errors import InputError

    if args.launch:
        return launch(args)
    eng = graphopt.load(args.dir)
    if _secondary_rank(eng):  # tensor-parallel: every rank decodes the same tokens, rank 0 prints them
        args.quiet, sys.stdout = True, open(os.devnull, "w")  # noqa: SIM115 - for this process's rest
    tok = None
    tok_file = eng.path / "tokenizer.json"
    if args.prompt is not None:
        if not tok_file.is_file():
            raise InputError(f"{eng.path} has no tokenizer.json, so --prompt cannot be tokenized; pass --ids 1,2,3")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        ids = [tok.encode(args.prompt).ids]
    else:
        try:
            ids = [[int(x) for x in args.ids.split(",") if x.strip()]]
        except ValueError:
            raise InputError(f"--ids {args.ids!r} must be comma-separated integers") from None
    if not ids[0]:
        raise InputError("the prompt is empty")
    import torch

    prompt = torch.tensor(ids)
    n_prompt = prompt.shape[1]
    # checks every argument and the artifact's length limit before anything is printed
    speculative = None
    if args.speculative:
        from graphopt.speculative import Draft, PromptLookup

        if args.speculative.strip().lower() == "prompt-lookup":
            speculative = PromptLookup(ngram=args.ngram, **({"num_tokens": args.draft_tokens} if args.draft_tokens else {}))
        else:
            speculative = Draft(args.speculative, **({"num_tokens": args.draft_tokens} if args.draft_tokens else {}))
    elif args.draft_tokens is not None:
        raise InputError("--draft-tokens needs --speculative prompt-lookup or --speculative DRAFT_DIR")
    steps = eng.stream(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, eos_token_id=args.eos, truncate=args.truncate, speculative=speculative)
    seq, shown = prompt, ""
    if tok is not None and not args.quiet:  # stream the text as it is generated
        shown = tok.decode(ids[0])
        print(shown, end="", flush=True)
    for seq in steps:
        if tok is not None and not args.quiet:
            text = tok.decode(seq[0].tolist())
            if text.startswith(shown):
                print(text[len(shown):], end="", flush=True)
                shown = text
    new = seq[0, n_prompt:].tolist()
    if tok is not None:
        text = tok.decode(ids[0] + new)
        print(text[len(shown):] if not args.quiet and text.startswith(shown) else ("" if not args.quiet else text))
    else:
        print(",".join(str(i) for i in ids[0] + new))
    if not args.quiet:  # on stderr: stdout stays the text (or ids) alone, for pipes
        from graphopt.runtime.generation import STOP_LENGTH, limits

        reason = getattr(seq, "stop_reason", None) or STOP_LENGTH  # no step ran: the prompt filled the artifact
        why = f", the artifact's limit of {limits(eng.manifest).max_len} tokens" if reason == STOP_LENGTH else ""
        _eprint(f"[stopped: {reason} ({len(new)} new token{'s' * (len(new) != 1)}{why})]")
        spec = getattr(seq, "speculation", None)
        if spec:
            _eprint(f"[speculative {spec['method']}: {spec['accepted']}/{spec['proposed']} drafts accepted "
                    f"({spec['acceptance_rate']:.0%}), {spec['target_calls']} target calls for {len(new)} tokens]")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from graphopt.serving.server import ServeConfig, serve
    except ImportError as e:
        from graphopt.errors import InputError

        raise InputError(f"graphopt serve needs the serve extra ({e.name} is not installed): "
                         "pip install 'graphopt[serve]'") from None
    config = ServeConfig(artifact=args.dir, model_name=args.model_name or "", max_batch=args.max_batch,
                         max_queue=args.max_queue, max_tokens_per_step=args.max_tokens_per_step, eos=args.eos or [],
                         threads=args.threads, shutdown_timeout=args.shutdown_timeout, cache=args.cache)
    return serve(config, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)


def cmd_passes(args: argparse.Namespace) -> int:
    from graphopt.passes.base import describe_options
    from graphopt.plugins import get_plugin_manager

    pm = get_plugin_manager()
    rows = []
    for name in sorted(pm.passes.passes):
        info = pm.passes.get(name)
        rows.append({"name": name, "plugin": info.plugin, "summary": info.cls.summary(),
                     "options": describe_options(info.cls),
                     "verification": (info.cls.verification.label() if info.cls.verification else "allclose (default)")})
    aliases = {k: {"pipeline": v[0], "plugin": v[1]} for k, v in sorted(pm.passes.aliases.items())}
    if args.json:
        print(json.dumps({"passes": rows, "aliases": aliases}, indent=2))
        return EXIT_OK
    if not rows:
        print("no passes registered (is graphopt installed? see `graphopt plugins`)")
    for r in rows:
        print(f"{r['name']}  [{r['plugin']}]  {r['summary']}")
        print(f"    verification: {r['verification']}")
        for o in r["options"]:
            print(f"    option {o}")
    if aliases:
        print("\naliases:")
        for k, v in aliases.items():
            print(f"{k} = {v['pipeline']}  [{v['plugin']}]")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from graphopt.plugins import get_plugin_manager

    pm = get_plugin_manager()
    infos = sorted(pm.plugins.values(), key=lambda i: i.name)
    if args.json:
        print(json.dumps([{**vars(i), "status": i.status} for i in infos], indent=2))
        return EXIT_OK
    for i in infos:
        print(f"{i.name} {i.version}  [{i.status}]  from {i.source}: {i.module}")
        if i.passes:
            print(f"    passes: {', '.join(i.passes)}")
        if i.aliases:
            print(f"    aliases: {', '.join(i.aliases)}")
        if i.backends:
            print(f"    backends: {', '.join(i.backends)}")
        if i.onnx_translations:
            print(f"    onnx translations: {', '.join(i.onnx_translations)}")
        if i.error:
            print(f"    error: {i.error}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphopt.artifact import read_manifest, verify_checksums
    from graphopt.errors import ChecksumError
    from graphopt.report import format_table

    m = read_manifest(args.dir)
    if args.json:
        print(json.dumps(m, indent=2))
        return EXIT_OK
    try:
        verify_checksums(args.dir, m)
        checks = f"all {len(m['files'])} files match their sha256"
    except ChecksumError as e:
        checks = f"MISMATCH: {e}"
    print(f"artifact {args.dir}")
    payload = m["payload"].get("file") or ", ".join(m["payload"].get("rank_files") or [])
    print(f"  target: {m['target']}  payload: {payload}  pipeline: {m.get('pipeline')!r}")
    tp = m.get("tensor_parallel")
    if tp:
        print(f"  tensor-parallel: {tp['world_size']} ranks (run under torchrun, or --launch {tp['world_size']}); "
              f"sharded: {len(tp.get('sharded') or {})} groups, replicated: {len(tp.get('replicated') or {})}; "
              f"per rank, dim 1/{tp['world_size']} of: {', '.join(tp.get('sharded_inputs') or {}) or 'no input'}")
    model = m.get("model") or {}
    print(f"  model: {model.get('spec') or model.get('class')}  (captured with {model.get('capture')})")
    print("  inputs:  " + ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in m["inputs"]))
    print("  outputs: " + ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in m["outputs"]))
    if (m["payload"] or {}).get("compute_dtype"):  # e.g. a bf16 graph computed in fp32 (onnx on ONNX Runtime CPU)
        print(f"  computes in: {m['payload']['compute_dtype']} (the model's {m['payload'].get('source_dtype')} graph, upcast)")
    from graphopt.errors import InputError
    from graphopt.runtime.generation import limits

    try:  # decoder artifacts: how long a sequence `generate` can make
        print(f"  generation: {limits(m).describe()}")
    except (InputError, KeyError, StopIteration):
        pass  # not a decoder LM
    v = m.get("versions") or {}
    print("  built with: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    print(f"  checksums: {checks}")
    rp = Path(args.dir) / "report.json"
    if rp.is_file():
        print()
        print(format_table(json.loads(rp.read_text())))
    return EXIT_OK


def cmd_bisect(args: argparse.Namespace) -> int:
    from graphopt.capture import capture
    from graphopt.errors import InputError
    from graphopt.model_loader import load_factory
    from graphopt.passes.pipeline import resolve
    from graphopt.plugins import get_plugin_manager
    from graphopt.verify.bisect import bisect

    pipeline = args.pipeline
    if Path(args.model).is_dir():
        from graphopt.verify.reproducer import load_reproducer

        rep = load_reproducer(args.model)
        pipeline = pipeline or rep["pipeline"]
        ir = capture(rep["module"], rep["example_inputs"], rep["dynamic"] or None)
    else:
        if not pipeline:
            raise InputError("--pipeline is required unless MODEL is a reproducer directory")
        module, example_inputs, dynamic = load_factory(args.model)
        ir = capture(module, example_inputs, dynamic)
    passes = resolve(pipeline, get_plugin_manager().passes)
    _eprint(f"bisecting {len(passes)} passes of {pipeline!r} ...")
    result = bisect(ir, passes, pipeline_text=pipeline)
    print(result.format())
    return EXIT_VERIFY if result.guilty_pass else EXIT_OK


def _require_engine(args: argparse.Namespace, target: str, options: dict | None) -> dict | None:
    """--require-engine → the tensorrt backend's ``build=true`` (it refuses before anything is written)."""
    if not getattr(args, "require_engine", False):
        return options
    from graphopt.errors import InputError

    if target != "tensorrt":
        raise InputError(f"--require-engine applies to --target tensorrt, not {target!r}")
    return {**(options or {}), "build": True}


def cmd_build_engine(args: argparse.Namespace) -> int:
    """Complete a --target tensorrt artifact in place: build model.plan, verify it, swap atomically."""
    from graphopt.backends.tensorrt import build_engine_in_place

    facts = build_engine_in_place(args.dir, cache_dir=args.cache_dir, rebuild=args.rebuild, verify=not args.no_verify)
    if facts.get("status") == "present":
        print(f"{args.dir} already has a TensorRT {facts.get('tensorrt')} engine for compute capability "
              f"{facts.get('compute_capability')}; pass --rebuild to build it again")
        return EXIT_OK
    v = facts.get("verification") or {}
    checked = (f", verified on the stored examples (worst error {v['worst_error']:.3g})" if v.get("passed")
               else ", not verified (--no-verify)")
    print(f"built TensorRT {facts['tensorrt']} engine for compute capability {facts['compute_capability']} "
          f"({facts['status']}; cache key {facts['cache_key'][:16]}…){checked}")
    print(f"artifact: {args.dir} (model.plan added, manifest updated atomically)")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Static TensorRT compatibility check: exit 0 clean (warnings allowed), 1 errors found, 2 bad input."""
    from graphopt.backends.tensorrt_check import check_onnx
    from graphopt.errors import InputError

    target, _, version = args.target.partition("=")
    if target != "tensorrt":
        raise InputError(f"--target {args.target!r}: only 'tensorrt' or 'tensorrt=VERSION' (e.g. tensorrt=10.15) "
                         f"can be checked")
    loaded = {}
    for flag, path in (("--build-config", args.build_config), ("--profiles", args.profiles)):
        if path:
            try:
                loaded[flag] = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise InputError(f"{flag} {path}: cannot read it as JSON ({e})") from None
    report = check_onnx(args.file, version=version or None, profiles=loaded.get("--profiles"),
                        build_config=loaded.get("--build-config"))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return EXIT_OK if report.ok else EXIT_VERIFY


# the longer help texts of two commands
CHECK_TEXT = {
    "description": "Check FILE.onnx (or an artifact directory holding model.onnx) against a TensorRT release without "
                   "TensorRT or a GPU: operator support per version, Q/DQ rules, precision flags removed in TensorRT "
                   "11, optimization profiles, IR/opset range. Every finding names the node and the fix.",
    "epilog": "exit codes: 0 no errors (warnings allowed), 1 errors found, 2 usage or input error.\n"
              "A build.json next to FILE is read for builder flags and profiles unless --build-config is given.\n"
              "example: graphopt check --target tensorrt=10.15 build/llama-trt/model.onnx"}
BUILD_ENGINE_TEXT = {
    "description": "Complete an artifact compiled with --target tensorrt where TensorRT or a GPU was missing: build "
                   "model.plan from its model.onnx and build.json (engine cache keyed by the ONNX bytes, every builder "
                   "setting, the TensorRT version and the GPU's compute capability; timing cache reused), run it on "
                   "the stored example inputs against the original module's outputs, and replace the artifact "
                   "atomically.",
    "epilog": "exit codes: 0 built (or already present), 1 the engine does not reproduce the module,\n"
              "2 TensorRT or a GPU missing, or not a tensorrt artifact.\nexample: graphopt build-engine build/llama-trt"}


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    import graphopt

    p = argparse.ArgumentParser(
        prog="graphopt", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile PyTorch models: capture with torch.export, run plugin passes verified "
                    "against the original graph after every pass, lower to ONNX Runtime or a torch program.")
    p.add_argument("--version", action="version", version=f"graphopt {graphopt.__version__}")
    p.add_argument("-p", "--plugin", action="append", default=[], metavar="MODULE",
                   help="load an extra plugin module by import name (repeatable)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="compile MODEL into an artifact directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Capture MODEL, run the pipeline with per-pass verification against the original "
                                   "graph, lower to TARGET and write an artifact directory atomically.\n"
                                   "MODEL is path/to/file.py:factory; factory() returns (module, example_inputs) "
                                   "or (module, example_inputs, dynamic). MODEL may also be a Hugging Face checkpoint "
                                   "directory (config.json, *.safetensors, tokenizer.json): it is loaded from local "
                                   "files with transformers, with example inputs from its tokenizer, dynamic batch "
                                   "1..8 and sequence 1..min(max_position_embeddings, 4096), and its tokenizer "
                                   "shipped in the artifact.")
    c.add_argument("model", nargs="?", help="path/to/file.py:factory or a checkpoint directory (or `model` in --config)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--pipeline", help="pipeline text, e.g. 'cleanup,my-pass(k=3)' (default: cleanup)")
    g.add_argument("--config", metavar="build.toml", help="TOML build config (pipeline, target, out, dynamic, ...)")
    c.add_argument("--target", help="onnx (default), torch, or any plugin backend; see `graphopt plugins`")
    c.add_argument("--out", metavar="DIR", help="artifact directory (default build/<model class>)")
    c.add_argument("--inputs", metavar="FILE.npz", help="extra evaluation inputs (one array per input name)")
    c.add_argument("--dynamic", action="append", default=[], metavar="NAME:DIM=MIN..MAX",
                   help="mark an input dim dynamic (repeatable), e.g. input_ids:1=1..512")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="checkpoint directories: load the weights in this dtype (default: the dtype in its config.json)")
    c.add_argument("--layers", type=int, metavar="N", help="checkpoint directories: keep the first N decoder layers "
                   "(embeddings, final norm and head stay): a draft for `graphopt generate --speculative DRAFT_DIR` "
                   "made from the target's own checkpoint")
    c.add_argument("--tokenizer", metavar="tokenizer.json", help="ship this tokenizer in the artifact for "
                   "`graphopt generate --prompt` (default: the factory file's TOKENIZER, if any)")
    c.add_argument("--no-verify", action="store_true", help="skip per-pass and post-lowering verification")
    c.add_argument("--report", choices=["html", "json"], default="html", help="write report.html too (default) or only report.json")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass as DIR/NNN_<pass>.txt")
    c.add_argument("--random-inputs", type=int, default=1, metavar="N",
                   help="fresh random input sets verified besides the example inputs (default 1)")
    c.add_argument("--require-engine", action="store_true",
                   help="--target tensorrt: fail (exit 2, nothing written) unless a TensorRT engine is built now; "
                        "without it, a machine lacking TensorRT or a GPU writes the ONNX + build.json for build-engine")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run an artifact on inputs",
                       description="Run an artifact. Without --inputs it replays the stored example inputs and "
                                   "compares with the original module's outputs (exit 1 if they differ beyond --atol).")
    r.add_argument("dir", help="artifact directory")
    r.add_argument("--inputs", metavar="FILE.npz", help="inputs: one array per input name")
    r.add_argument("--output", metavar="FILE.npz", help="write the outputs here")
    r.add_argument("--atol", type=float, default=1e-4, help="tolerance when replaying the examples (default 1e-4)")
    r.add_argument("--threads", type=int, help="intra-op threads for the runner")
    r.add_argument("--launch", type=int, metavar="N", help=LAUNCH_HELP)
    r.set_defaults(func=cmd_run)

    gen = sub.add_parser("generate", help="decode tokens with a decoder artifact")
    gen.add_argument("dir", help="artifact directory")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer.json in the artifact)")
    src.add_argument("--ids", help="prompt token ids, comma-separated")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--eos", type=int, help="stop at this token id")
    gen.add_argument("--truncate", action="store_true", help="stop at the artifact's maximum length (prompt + new "
                     "tokens, see `graphopt inspect`) instead of refusing a request that does not fit")
    gen.add_argument("--speculative", metavar="prompt-lookup|DRAFT_DIR",
                     help="speculative decoding (kv-cache artifacts): 'prompt-lookup' drafts from n-grams of the "
                          "prompt and the text so far; DRAFT_DIR is a smaller artifact over the same tokenizer, "
                          "compiled with kv-cache. Same tokens as without (greedy), same distribution (sampling); "
                          "the acceptance rate is printed on stderr")
    gen.add_argument("--draft-tokens", type=int, help="draft length to start with (adapted per step; default 8 "
                     "for prompt-lookup, 4 for a draft model)")
    gen.add_argument("--ngram", type=int, default=3, help="prompt-lookup: longest n-gram matched (default 3)")
    gen.add_argument("--launch", type=int, metavar="N", help=LAUNCH_HELP)
    gen.add_argument("-q", "--quiet", action="store_true")
    gen.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching over a kv-cache artifact",
                        description="Serve DIR (compiled with kv-cache) over HTTP: POST /v1/completions (OpenAI's API; "
                                    "text prompts need the artifact's tokenizer.json), GET /v1/models, /health, "
                                    "/metrics (Prometheus). Requests join and leave the running batch between "
                                    "decode steps. SIGTERM stops accepting, finishes running requests, exits 0. "
                                    "Needs the serve extra: pip install 'graphopt[serve]'.")
    sv.add_argument("dir", help="artifact directory (compiled with the kv-cache pass)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per step (default 8; at "
                    "most the artifact's compiled batch); bounds the KV cache to max-batch x the artifact's length")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a batch row; past that, "
                    "429 with Retry-After (default 64)")
    sv.add_argument("--max-tokens-per-step", type=int, default=256, help="prompt tokens (padding counted) "
                    "prefilled per iteration, between decode steps; a longer prompt is prefilled in chunks of this "
                    "size. Lower: running requests' inter-token latency is steadier; higher: new requests start "
                    "sooner (default 256)")
    sv.add_argument("--cache", choices=["auto", "slots", "concat"], default="auto", help="the running batch's KV "
                    "cache. slots: buffers written in place by a slot graph derived from the artifact's ONNX model "
                    "when the server starts (checked against it on a probe); concat: the artifact's own graph, "
                    "which appends to the cache and copies it every step; auto (default): slots where the artifact "
                    "allows them (ONNX Runtime on the CPU, dynamic cache), else concat, saying why in the log")
    sv.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    sv.add_argument("--eos", type=int, action="append", help="end-of-sequence token id (repeatable): a sequence "
                    "that produces it finishes with finish_reason 'stop'")
    sv.add_argument("--model-name", help="the model id in the API (default: the artifact directory's name)")
    sv.add_argument("--threads", type=int, help="intra-op threads of the runtime")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish "
                    "after SIGTERM (default 30)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)

    ps = sub.add_parser("passes", help="list every registered pass: name, plugin, summary, options")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_passes)

    pl = sub.add_parser("plugins", help="list every plugin: name, version, source, what it adds, errors")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    ins = sub.add_parser("inspect", help="show an artifact's manifest and verification report")
    ins.add_argument("dir")
    ins.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ins.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bisect", help="find the first pass, rewrite and node that break verification",
                       description="MODEL is path/to/file.py:factory or a reproducer directory written by a failed compile.")
    b.add_argument("model")
    b.add_argument("--pipeline", help="pipeline text (default: the reproducer's)")
    b.set_defaults(func=cmd_bisect)

    ck = sub.add_parser("check", help="static TensorRT compatibility report of an ONNX file",
                        formatter_class=argparse.RawDescriptionHelpFormatter, **CHECK_TEXT)
    ck.add_argument("file", metavar="FILE.onnx", help="ONNX model, or an artifact directory with model.onnx")
    ck.add_argument("--target", default="tensorrt", metavar="tensorrt[=VERSION]",
                    help="TensorRT release to check against, e.g. tensorrt=10.15 or tensorrt=11 "
                         "(default: the newest recorded release)")
    ck.add_argument("--build-config", metavar="build.json", help="builder settings (flags, profiles) as JSON")
    ck.add_argument("--profiles", metavar="FILE.json", help="optimization profiles as JSON: "
                    "{input: {min: [...], opt: [...], max: [...]}} or {name: {input: ...}} for several")
    ck.add_argument("--json", action="store_true", help="print the report as JSON")
    ck.set_defaults(func=cmd_check)

    be = sub.add_parser("build-engine", help="build the TensorRT engine of a --target tensorrt artifact (GPU node)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, **BUILD_ENGINE_TEXT)
    be.add_argument("dir", help="artifact directory (compiled with --target tensorrt)")
    be.add_argument("--cache-dir", metavar="DIR", help="engine cache (default $GRAPHOPT_TRT_CACHE or "
                    "~/.cache/graphopt/tensorrt)")
    be.add_argument("--rebuild", action="store_true", help="build again even if the artifact has an engine")
    be.add_argument("--no-verify", action="store_true", help="skip running the engine on the stored examples")
    be.set_defaults(func=cmd_build_engine)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --launch runs again on every rank
    debug = args.debug or os.environ.get("GRAPHOPT_DEBUG", "") not in ("", "0")
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from graphopt.errors import GraphoptError

    try:
        if args.plugin:
            from graphopt.plugins import get_plugin_manager

            pm = get_plugin_manager()
            for mod in args.plugin:
                info = pm.load_module(mod)
                if info.error:
                    raise GraphoptError(f"plugin {mod!r} given with -p failed to load: {info.error}")
        return args.func(args)
    except GraphoptError as e:
        if debug:
            raise
        _eprint(f"error: {e}" if e.exit_code == EXIT_USAGE else f"verification failed: {e}"
                if not str(e).startswith("verification failed") else str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _eprint("interrupted; nothing was written")
        return 130
    except Exception as e:
        if debug:
            raise
        _eprint(f"internal error: {type(e).__name__}: {e}\n"
                "this is a bug in graphopt or a plugin; rerun with --debug for the traceback and report it")
        return EXIT_INTERNAL


def _main_with_status(argv: list[str] | None = None) -> int:
    code = main(argv)
    status = os.environ.get(RANK_STATUS_ENV)
    if status and os.environ.get("RANK"):  # a rank started by --launch: its code for the launcher
        Path(status, f"rank{os.environ['RANK']}").write_text(str(code))
    return code


def run() -> None:
    """The ``graphopt`` command: :func:`main`, then the exit handlers (``atexit``: log handlers,
    temporary files), then exit without the interpreter's teardown, which frees every object one
    by one: 1.8 s after a 0.5B model's compile, for a process that is ending anyway. An exception
    out of ``main`` (argparse's exit on a usage error included) exits the ordinary way."""
    code = _main_with_status()
    try:
        import atexit

        atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter exit runs; os._exit skips it
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)


if __name__ == "__main__":
    run()
