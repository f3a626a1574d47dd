"""Tensor parallelism: the simulated graph a sharding pass writes, each rank's program cut from
it, and the rank processes that run them on torch.distributed.

The ``tensor-parallel`` pass (plugins/graphopt_parallel) rewrites a graph into ONE graph that
holds every rank's shard side by side and still computes the original function, so it is verified
like any other pass (the fp64 rule against the original) and later passes (weight-only
quantization: per-rank scales) rewrite each shard on its own. Four ops mark where ranks meet:

- ``graphopt::tp_reduce(parts)``: the all-reduce after a row-parallel GEMM (o_proj, down). In the
  simulated graph, the sum of the ranks' partial products; in rank ``r``'s program,
  ``_c10d_functional.all_reduce(parts[r], "sum")`` + ``wait_tensor``: a functional collective, so
  the program stays exportable (``torch.export`` keeps it; the group is resolved when it runs);
- ``graphopt::tp_shard(x, dim, rank, world_size)``: a graph input each rank holds only a slice of
  (its KV heads' cache). Simulated: the slice; rank ``r``: the input itself, ``1/N`` as large;
- ``graphopt::tp_gather(parts, dim)``: a graph output each rank returns its slice of (the present
  cache). Simulated: the concatenation; rank ``r``: ``parts[r]``;
- ``graphopt::tp_all_gather(parts, dim)``: a value every rank needs whole (the logits of a lm_head
  split by vocabulary). Simulated: the concatenation; rank ``r``: ``all_gather_into_tensor`` of its
  part (along ``dim``, moved to the front and back).

:func:`rank_ir` cuts rank ``r``'s program out of the simulated graph (the other ranks' shards are
dead code once the markers are replaced). The artifact holds one program per rank and a
rank-independent manifest whose ``tensor_parallel`` entry names the world size and which inputs
and outputs are sharded along which dim; :func:`local_specs` gives a rank's view of them.

At load (:func:`init_rank`), the rank comes from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); the world size must equal the artifact's; the process group is
created when the caller has not (gloo on CPU, NCCL on CUDA) with a timeout
(``GRAPHOPT_TP_TIMEOUT`` seconds, default 60), so on gloo a rank that dies becomes an error on the
others, never a hang (on NCCL, the process group's watchdog ends the survivors after the timeout). :class:`SpawnedRanks` starts the ranks as torchrun would (same environment) and runs
them from one parent process: the compiler's artifact check uses it.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.errors import ArtifactError, InputError

log = logging.getLogger(__name__)

__all__ = ["ALL_GATHER", "GATHER", "MARKERS", "REDUCE", "SHARD", "TIMEOUT_ENV", "RankRunner", "SpawnedRanks",
           "gather_outputs", "init_rank", "local_specs", "rank_ir", "shard_named", "shard_tensor", "tp_all_gather",
           "tp_gather", "tp_reduce", "tp_shard"]

TIMEOUT_ENV = "GRAPHOPT_TP_TIMEOUT"
GROUP = "0"  # torch.distributed's default (world) group name, resolved by the functional collectives


# -- the marker ops ------------------------------------------------------------------------------
@torch.library.custom_op("graphopt::tp_reduce", mutates_args=())
def tp_reduce(parts: list[torch.Tensor]) -> torch.Tensor:
    """All-reduce (sum) of the ranks' partial results, simulated: their sum, in rank order."""
    out = parts[0].clone()
    for p in parts[1:]:
        out = out + p
    return out


@tp_reduce.register_fake
def _tp_reduce_fake(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(parts[0])


@torch.library.custom_op("graphopt::tp_gather", mutates_args=())
def tp_gather(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The ranks' slices of an output, simulated: concatenated along ``dim`` in rank order."""
    return torch.cat(parts, dim)


@tp_gather.register_fake
def _tp_gather_fake(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat([torch.empty_like(p) for p in parts], dim)


@torch.library.custom_op("graphopt::tp_all_gather", mutates_args=())
def tp_all_gather(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The ranks' slices of a value every rank needs whole (the lm_head's logits under vocabulary
    sharding), simulated: concatenated along ``dim`` in rank order."""
    return torch.cat(parts, dim)


@tp_all_gather.register_fake
def _tp_all_gather_fake(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat([torch.empty_like(p) for p in parts], dim)


@torch.library.custom_op("graphopt::tp_shard", mutates_args=())
def tp_shard(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of an input along ``dim`` (``1/world_size`` of it)."""
    size = x.shape[dim] // world_size
    return x.narrow(dim, rank * size, size).clone()


@tp_shard.register_fake
def _tp_shard_fake(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] // world_size
    return x.new_empty(shape)


REDUCE = torch.ops.graphopt.tp_reduce.default
GATHER = torch.ops.graphopt.tp_gather.default
SHARD = torch.ops.graphopt.tp_shard.default
ALL_GATHER = torch.ops.graphopt.tp_all_gather.default
MARKERS = (REDUCE, GATHER, SHARD, ALL_GATHER)


# -- one rank's program ----------------------------------------------------------------------------
def local_specs(specs: list, sharded: dict[str, int], world_size: int) -> list:
    """``specs`` (TensorSpec) as one rank sees them: each ``sharded`` name's dim divided by the world
    size."""
    out = []
    for s in specs:
        s = copy.deepcopy(s)
        d = sharded.get(s.name)
        if d is not None:
            size = s.shape[d]
            if not isinstance(size, int) or size % world_size:
                raise ArtifactError(f"{s.name} dim {d} ({size}) is sharded over {world_size} ranks but does not "
                                    "divide; the artifact is corrupted, rebuild it")
            s.shape = [*s.shape[:d], size // world_size, *s.shape[d + 1:]]
        out.append(s)
    return out


def rank_ir(ir: Any, rank: int) -> Any:
    """Rank ``rank``'s program cut from the simulated graph: ``tp_reduce`` becomes a functional
    all-reduce of this rank's part, ``tp_all_gather`` a functional all-gather of it, ``tp_shard`` of
    this rank the input itself, ``tp_gather`` this rank's part; the other ranks' shards are then dead
    and dropped. Weights are shared with ``ir``; the example inputs are this rank's slices."""
    tp = ir.meta["tensor_parallel"]
    n = int(tp["world_size"])
    out = ir.copy()
    g = out.graph
    partials, gathers = [], []
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in MARKERS:
            continue
        if node.target is REDUCE:  # this rank's part for now; the all-reduce goes in once shapes are known
            partials.append(node.args[0][rank])
            node.replace_all_uses_with(node.args[0][rank])
        elif node.target is ALL_GATHER:  # this rank's part N times over (the whole's shape) for now
            part, dim = node.args[0][rank], node.args[1]
            with g.inserting_before(node):
                whole = g.call_function(torch.ops.aten.cat.default, ([part] * n, dim))
            gathers.append((whole, part, dim))
            node.replace_all_uses_with(whole)
        elif node.target is GATHER:
            node.replace_all_uses_with(node.args[0][rank])
        elif node.args[2] == rank:  # this rank's slice of an input: the input itself, 1/N as large
            node.replace_all_uses_with(node.args[0])
    from graphopt.fx import erase_dead

    erase_dead(g, list(g.nodes))  # the other ranks' shards (placeholders stay: the interface is rank-independent)
    left = [node.name for node in g.nodes if node.op == "call_function" and node.target in MARKERS]
    if left:
        from graphopt.errors import BackendError

        raise BackendError(f"rank {rank}'s program still reads other ranks' shards ({', '.join(left[:3])}): a pass "
                           "after tensor-parallel mixed the ranks (put tensor-parallel last but quantize), or the "
                           "graph reads a size off a sharded value")
    out.inputs = local_specs(out.inputs, tp["sharded_inputs"], n)
    out.outputs = local_specs(out.outputs, tp["sharded_outputs"], n)
    out.example_inputs = [shard_tensor(t, tp["sharded_inputs"].get(s.name), rank, n)
                          for s, t in zip(ir.inputs, ir.example_inputs)]
    out.recompile()
    out.propagate_shapes()
    for part in partials:
        users = list(part.users)
        with g.inserting_after(part):
            red = g.call_function(torch.ops._c10d_functional.all_reduce.default, (part, "sum", GROUP))
        with g.inserting_after(red):
            wait = g.call_function(torch.ops._c10d_functional.wait_tensor.default, (red,))
        red.meta["val"] = wait.meta["val"] = part.meta.get("val")
        for user in users:
            user.replace_input_with(part, wait)
    for whole, part, dim in gathers:  # all_gather_into_tensor stacks on dim 0: move dim there and back
        _all_gather_along(g, whole, part, dim, n)
    out.recompile()
    return out


def _all_gather_along(g: torch.fx.Graph, whole: torch.fx.Node, part: torch.fx.Node, dim: int, n: int) -> None:
    c10d = torch.ops._c10d_functional
    val = part.meta["val"]
    dim = dim % val.dim()
    with val.fake_mode if hasattr(val, "fake_mode") else contextlib.nullcontext():
        moved_val = val.movedim(dim, 0)
        front_val = moved_val.contiguous()
        gathered_val = front_val.new_empty([front_val.shape[0] * n, *front_val.shape[1:]])
        back_val = gathered_val.movedim(0, dim)
    with g.inserting_before(whole):
        front = g.call_function(torch.ops.aten.movedim.int, (part, dim, 0))
        cont = g.call_function(torch.ops.aten.contiguous.default, (front,))
        gat = g.call_function(c10d.all_gather_into_tensor.default, (cont, n, GROUP))
        wait = g.call_function(c10d.wait_tensor.default, (gat,))
        back = g.call_function(torch.ops.aten.movedim.int, (wait, 0, dim))
    front.meta["val"], cont.meta["val"] = moved_val, front_val
    gat.meta["val"] = wait.meta["val"] = gathered_val
    back.meta["val"] = back_val
    whole.replace_all_uses_with(back)
    g.erase_node(whole)


def shard_tensor(t: Any, dim: int | None, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s slice of ``t`` along ``dim`` (``t`` itself when ``dim`` is None)."""
    if dim is None:
        return t
    size = t.shape[dim] // world_size
    if isinstance(t, torch.Tensor):
        return t.narrow(dim, rank * size, size).contiguous()
    import numpy as np

    return np.ascontiguousarray(np.take(t, range(rank * size, (rank + 1) * size), axis=dim))


# -- the rank processes ----------------------------------------------------------------------------
def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise InputError(f"environment variable {name}={v!r} is not an integer; torchrun sets it") from None


RUN_TIMEOUT_ENV = "GRAPHOPT_TP_CHECK_TIMEOUT"  # seconds one call of the compiler's check may take (default 600)


def _run_timeout_s() -> float:
    try:
        return max(1.0, float(os.environ.get(RUN_TIMEOUT_ENV, "600")))
    except ValueError:
        raise InputError(f"{RUN_TIMEOUT_ENV}={os.environ[RUN_TIMEOUT_ENV]!r} is not a number of seconds") from None


def timeout_s() -> float:
    v = os.environ.get(TIMEOUT_ENV, "60")
    try:
        t = float(v)
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV}={v!r} is not a number of seconds") from None
    if t <= 0:
        raise InputError(f"{TIMEOUT_ENV}={v!r} must be positive")
    return t


def rank_device(device: Any) -> str:
    """The device of this rank's program: ``"cpu"`` (gloo) when none is asked for, even where torch
    sees a GPU; ``"cuda"`` means this rank's own GPU, ``cuda:LOCAL_RANK`` (NCCL)."""
    from graphopt.runtime.torch_runner import resolve_device

    if device is None:
        return "cpu"
    dev = resolve_device(device)  # InputError where torch sees no GPU
    if dev.type != "cuda":
        return str(dev)
    local = _env_int("LOCAL_RANK") or 0
    if dev.index is not None and dev.index != local:
        raise InputError(f"device {str(device)!r} on local rank {local}: each rank runs on its own GPU, "
                         f"cuda:LOCAL_RANK; pass device='cuda'")
    return f"cuda:{local}"


def init_rank(path: Any, tp: dict, device: str | None = None) -> int:
    """This process's rank for a ``tensor_parallel`` artifact, with the process group ready.

    Raises :class:`InputError` (on every rank, before any collective) when the process was not
    started as one of the artifact's ranks or the world size differs from the artifact's."""
    import torch.distributed as dist

    n = int(tp["world_size"])
    launch = (f"run it under `torchrun --nproc-per-node {n} ...` or let graphopt start the ranks: "
              f"`graphopt run/generate {path} --launch {n}`")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if rank is None or world is None:
            raise InputError(f"artifact {path} is sharded over {n} ranks (tensor-parallel) and this process is not "
                             f"one of them (RANK / WORLD_SIZE unset): {launch}")
    if world != n:
        raise InputError(f"artifact {path} is sharded over {n} ranks but this process is rank {rank} of "
                         f"{world}: {launch}")
    if not 0 <= rank < n:
        raise InputError(f"RANK={rank} is outside 0..{n - 1}")
    if not dist.is_initialized():
        cuda = device is not None and str(device).startswith("cuda")
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(torch.device(device))
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise InputError(f"{var} is unset: {launch}")
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s()))
        # the group graphopt made goes before the interpreter does: left to the interpreter's
        # teardown, gloo's threads can outlive it and abort the process ("terminate called without
        # an active exception") after the rank's work was done
        atexit.register(_destroy_group)
    return rank


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class RankRunner:
    """One rank's runner: the backend's, with a failed collective (a rank that died, stopped calling
    or timed out) turned into a :class:`RuntimeFailure` that says so, on every surviving rank."""

    def __init__(self, inner: Any, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def run(self, inputs: list[Any]) -> list[torch.Tensor]:
        from graphopt.errors import GraphoptError, RuntimeFailure, first_line

        try:
            return self.inner.run(inputs)
        except GraphoptError:
            raise
        except Exception as e:
            text = first_line(str(e))
            if any(k in text for k in ("Connection closed", "Connection reset", "Timed out", "timed out",
                                       "aborted")):
                raise RuntimeFailure(f"rank {self.rank} of {self.world_size}: a collective failed ({text}); another "
                                     "rank died, stopped running the same calls, or did not answer within "
                                     f"{TIMEOUT_ENV}={timeout_s():g} s. Every rank must make the same calls in the "
                                     "same order") from e
            raise

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # the wrapped runner's other attributes (device, path)
        return getattr(self.inner, name)


def shard_named(named: dict[str, Any], sharded: dict[str, int], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's slices of the ``sharded`` entries of a ``{name: tensor or array}`` dict."""
    return {k: shard_tensor(v, sharded.get(k), rank, world_size) for k, v in named.items()}


def gather_outputs(engine: Any, outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's outputs made whole: the sharded ones all-gathered and concatenated in rank order
    (a collective: every rank calls it)."""
    import torch.distributed as dist

    sharded = (engine.manifest.get("tensor_parallel") or {}).get("sharded_outputs", {})
    whole = []
    for name, t in zip(engine.output_names, outs):
        d = sharded.get(name)
        if d is None:
            whole.append(t)
            continue
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev).contiguous()
        parts = [torch.empty_like(t) for _ in range(engine.world_size)]
        dist.all_gather(parts, t)
        whole.append(torch.cat(parts, d))
    return whole


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(f: Any, msg: Any) -> None:
    import io

    buf = io.BytesIO()
    torch.save(msg, buf)
    data = buf.getvalue()
    f.write(len(data).to_bytes(8, "little") + data)
    f.flush()


def _recv(f: Any) -> Any:
    import io

    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the other end closed the pipe")
    n = int.from_bytes(head, "little")
    data = f.read(n)
    return torch.load(io.BytesIO(data), weights_only=True)  # tensors, strings, lists only


def _worker_main() -> None:
    """A rank started by :class:`SpawnedRanks` (its environment is torchrun's): load this rank's
    program with the manifest it is given (the compiler checks the payload before the manifest is
    written), then run the input lists read from stdin until it closes."""
    import json
    import sys

    replies = os.fdopen(int(os.environ["GRAPHOPT_TP_REPLY_FD"]), "wb")
    requests = sys.stdin.buffer
    path = Path(os.environ["GRAPHOPT_TP_ARTIFACT"])
    try:
        from graphopt.plugins import get_plugin_manager
        from graphopt.runtime.engine import Engine

        manifest = json.loads(Path(os.environ["GRAPHOPT_TP_MANIFEST"]).read_text())
        eng = Engine(path, manifest, get_plugin_manager().backend(manifest["target"]).load(path, manifest))
        _send(replies, ["ready", None])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send(replies, ["error", [type(e).__name__, str(e)]])
        return
    while True:
        try:
            inputs = _recv(requests)
        except EOFError:
            break
        try:
            _send(replies, ["ok", [t.detach().cpu() for t in eng.run_flat(inputs)]])
        except BaseException as e:  # noqa: BLE001
            _send(replies, ["error", [type(e).__name__, str(e)]])
    eng.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class SpawnedRanks:
    """The ranks of a tensor-parallel artifact as child processes of this one, started with the
    environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), on gloo.
    ``run(flat_inputs)`` hands each rank its slice of the sharded inputs and returns the full outputs
    (sharded ones concatenated in rank order), like a one-device runner: the compiler's artifact
    check runs it."""

    def __init__(self, path: Any, manifest: dict, start_timeout: float = 600.0):
        import json
        import tempfile

        self.tp = manifest["tensor_parallel"]
        self.n = int(self.tp["world_size"])
        self.broken = False
        self.names = [s["name"] for s in manifest["inputs"]]
        self.out_names = [s["name"] for s in manifest["outputs"]]
        self._tmp = tempfile.TemporaryDirectory(prefix="graphopt-ranks-")
        mf = Path(self._tmp.name) / "manifest.json"
        mf.write_text(json.dumps(manifest, default=str))
        port = free_port()
        threads = str(max(1, (os.cpu_count() or 1) // self.n))
        self.procs, self.replies, self.logs = [], [], []
        try:
            self._start(path, mf, port, threads)
            self._collect(start_timeout, "load the artifact")
        except BaseException:
            self.close()
            raise

    def _start(self, path: Any, mf: Path, port: int, threads: str) -> None:
        import queue
        import subprocess
        import sys
        import threading

        for r in range(self.n):
            read_fd, write_fd = os.pipe()
            log_file = open(Path(self._tmp.name) / f"rank{r}.log", "w+b")  # noqa: SIM115 - closed in close()
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(self.n),
                   "CUDA_VISIBLE_DEVICES": "",  # the check runs the ranks on gloo, on the CPU
                   "LOCAL_WORLD_SIZE": str(self.n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": threads, "GRAPHOPT_TP_REPLY_FD": str(write_fd),
                   "GRAPHOPT_TP_ARTIFACT": str(path), "GRAPHOPT_TP_MANIFEST": str(mf)}
            proc = subprocess.Popen([sys.executable, "-c", "from graphopt.parallel import _worker_main; _worker_main()"],
                                    stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    pass_fds=(write_fd,))
            os.close(write_fd)
            q: queue.Queue = queue.Queue()

            def pump(fd=read_fd, q=q) -> None:
                with os.fdopen(fd, "rb") as f:
                    while True:
                        try:
                            q.put(_recv(f))
                        except Exception:  # noqa: BLE001 - the rank exited: say so to the waiting side
                            q.put(["exit", None])
                            return

            threading.Thread(target=pump, daemon=True).start()
            self.procs.append(proc)
            self.replies.append(q)
            self.logs.append(log_file)

    def _log_tail(self, r: int) -> str:
        f = self.logs[r]
        f.flush()
        f.seek(0)
        lines = f.read().decode(errors="replace").strip().splitlines()
        return ("\n    " + "\n    ".join(lines[-8:])) if lines else ""

    def _collect(self, timeout: float, what: str) -> list[Any]:
        import queue

        from graphopt.errors import RuntimeFailure

        replies, deadline = [], time.monotonic() + timeout
        for r, q in enumerate(self.replies):  # every rank's reply, so none is left for the next call
            try:
                replies.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                self.broken = True  # later replies would answer the wrong call
                raise RuntimeFailure(f"rank {r} of {self.n} did not {what} within {timeout:.0f} s "
                                     f"({RUN_TIMEOUT_ENV}){self._log_tail(r)}") from None
        for r, (kind, value) in enumerate(replies):
            if kind == "exit":
                raise RuntimeFailure(f"rank {r} of {self.n} exited before it could {what}{self._log_tail(r)}")
            if kind == "error":
                name, text = value
                if name == "InputError":  # the program refuses these inputs (a size it was not compiled for)
                    raise InputError(f"rank {r} of {self.n}: {text}")
                raise RuntimeFailure(f"rank {r} of {self.n} could not {what}: {name}: {text}")
        return [value for _, value in replies]

    def run(self, inputs: list[Any]) -> list[torch.Tensor]:
        from graphopt.errors import RuntimeFailure

        if self.broken:
            raise RuntimeFailure("the rank processes stopped answering in an earlier call; start them again")
        shard_in = self.tp["sharded_inputs"]
        for r, proc in enumerate(self.procs):
            try:
                _send(proc.stdin, [shard_tensor(t if isinstance(t, torch.Tensor) else torch.as_tensor(t),
                                                shard_in.get(name), r, self.n) for name, t in zip(self.names, inputs)])
            except (OSError, ValueError):
                self.broken = True
                raise RuntimeFailure(f"rank {r} of {self.n} is gone (exit code {proc.poll()})"
                                     f"{self._log_tail(r)}") from None
        per_rank = self._collect(_run_timeout_s(), "run the program")
        shard_out = self.tp["sharded_outputs"]
        outs = []
        for i, name in enumerate(self.out_names):
            d = shard_out.get(name)
            outs.append(per_rank[0][i] if d is None else torch.cat([p[i] for p in per_rank], d))
        return outs

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait()
        for f in self.logs:
            f.close()
        self._tmp.cleanup()
