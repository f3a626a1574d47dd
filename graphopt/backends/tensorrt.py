"""The ``tensorrt`` target: the onnx backend's model → ``trt.OnnxParser`` → strongly typed network →
builder config → serialized plan (``model.plan``), run by :mod:`graphopt.runtime.tensorrt_runner`.

Lowering, step by step::

    GraphIR ──onnx backend──▶ model.onnx (TensorRT-ready: opset-23 Attention/RMSNormalization where fused)
        ──static check (graphopt.backends.tensorrt_check.check_onnx)──▶ findings in the report
        ──BuildSettings (workspace, profiles from the dynamic dims, timing cache, optimization level,
          hardware/version compatibility, sparse weights)──▶ build.json + the equivalent trtexec line
        ──TensorRT present and a GPU?──▶ yes: build (or take from the engine cache) → model.plan
                                     no:  the artifact says so; `graphopt build-engine DIR` completes it

Why these choices:

- Strongly typed networks only (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x; always on
  and the flag ignored on 11.x). TensorRT 11 removed the FP16/INT8/BF16 builder flags, so no
  precision flag is ever set: precision lives in the graph (the ``precision`` pass, Q/DQ nodes).
- One optimization profile from the captured dynamic dims (min = the declared minimum, opt = the
  example input's size, max = the declared maximum); KV-cache artifacts get two, ``prefill``
  (``seq`` over its range, ``past`` = 0) and ``decode`` (``seq`` = 1, ``past`` over its range),
  since one profile over both would tune the kernels for neither.
- Engine cache keyed by sha256(ONNX bytes + every builder setting + TensorRT version + GPU compute
  capability): any change to any of them is a different engine. The timing cache is not in the key
  (it only shortens the tactic search; it grows with every build) and is reused across builds.
- ``import tensorrt`` happens only inside functions (:func:`import_tensorrt`), and everything
  version-dependent is guarded there, so this module imports on any machine; tests inject a
  recording fake module through the ``trt`` arguments.
- Without TensorRT (or without a GPU) the compile still writes the TensorRT-ready ONNX, build.json
  and the trtexec command, checks the ONNX numerically with ONNX Runtime, says so, and succeeds;
  ``graphopt compile --require-engine`` turns that into an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.backends.base import Backend, Lowered
from graphopt.backends.tensorrt_check import version_tuple
from graphopt.errors import ArtifactError, BackendError

if TYPE_CHECKING:
    from graphopt.ir.graph_ir import GraphIR
    from graphopt.runtime.tensorrt_runner import TensorRTRunner

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PLAN_FILE = "model.plan"
BUILD_FILE = "build.json"
BUILD_FORMAT = "graphopt-tensorrt-build"
#: first bytes of every serialized TensorRT engine ("ftrt")
PLAN_MAGIC = b"ftrt"
#: bytes of the plan header recorded in the manifest and compared before deserializing
HEADER_BYTES = 32
MIN_MAJOR = 10
HARDWARE_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
TRTEXEC_HARDWARE = {"none": None, "ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}

INSTALL_HINT = ("install TensorRT 10 or 11 for Python (pip install tensorrt, or graphopt[tensorrt]) on a machine "
                "with an NVIDIA GPU and driver")


# -- TensorRT, imported lazily -------------------------------------------------------------------
def import_tensorrt(required: bool = False) -> Any:
    """The ``tensorrt`` module, or None when it cannot be imported (``required``: raise instead)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install failing to load libnvinfer
        if required:
            raise BackendError(f"TensorRT is not available here ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
        return None
    major = version_tuple(getattr(trt, "__version__", "0"))[0]
    if major < MIN_MAJOR:
        msg = f"TensorRT {trt.__version__} is too old: graphopt builds with TensorRT {MIN_MAJOR}.x or 11.x"
        if required:
            raise BackendError(msg)
        log.warning("%s; ignoring it", msg)
        return None
    return trt


def gpu_compute_capability(device: int | str | None = None) -> str | None:
    """``"9.0"`` for the CUDA device torch sees (``None`` without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def engine_available(trt: Any = None) -> tuple[bool, str]:
    """Whether an engine can be built here, and if not, what is missing (for messages)."""
    trt = trt if trt is not None else import_tensorrt()
    if trt is None:
        return False, "the tensorrt Python module is not installed"
    if gpu_compute_capability() is None:
        return False, "no CUDA GPU is visible to torch"
    return True, ""


# -- builder settings ----------------------------------------------------------------------------
@dataclasses.dataclass
class BuildSettings:
    """Every builder setting; build.json holds exactly these (and the cache key hashes them)."""

    profiles: dict[str, dict[str, dict[str, list[int]]]]
    workspace_mib: int = 4096
    optimization_level: int = 3
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    sparse_weights: bool = False
    strongly_typed: bool = True
    tf32: bool = False   # TF32 math in fp32 GEMMs: faster, ~1e-3 relative error; off keeps fp32 graphs fp32
    # Execution contexts that may run at once. TensorRT lets only one context use an optimization
    # profile at a time when shapes are dynamic, so the build adds this many copies of every
    # profile and the runner keeps a pool of contexts, one per copy.
    contexts: int = 2
    timing_cache: str | None = None   # path; None → the engine cache directory's shared timing cache

    def validate(self) -> BuildSettings:
        if self.hardware_compatibility not in HARDWARE_LEVELS:
            raise BackendError(f"tensorrt option hardware_compatibility={self.hardware_compatibility!r}: use one of "
                               f"{', '.join(HARDWARE_LEVELS)}")
        if not 0 <= int(self.optimization_level) <= 5:
            raise BackendError(f"tensorrt option optimization_level={self.optimization_level}: use 0..5 (default 3)")
        if not isinstance(self.contexts, int) or isinstance(self.contexts, bool) or not 1 <= self.contexts <= 64:
            raise BackendError(f"tensorrt option contexts={self.contexts!r}: give the number of concurrent "
                               "execution contexts, 1..64 (default 2)")
        if int(self.workspace_mib) <= 0:
            raise BackendError(f"tensorrt option workspace_mib={self.workspace_mib}: give a positive size in MiB")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise BackendError("tensorrt option exclude_lean_runtime needs version_compatible=true")
        if not self.strongly_typed:
            raise BackendError("graphopt builds strongly typed networks only (TensorRT 11 has no other kind); "
                               "put the precision in the graph with the precision pass")
        return self

    def cache_fields(self) -> dict[str, Any]:
        """The settings that decide the engine (the timing cache location does not)."""
        d = dataclasses.asdict(self)
        d.pop("timing_cache")
        return d

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BuildSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ArtifactError(f"build.json has unknown builder settings {unknown}; it was written by a newer "
                                "graphopt: upgrade graphopt or compile again")
        return cls(**d).validate()


OPTION_KEYS = ("workspace_mib", "optimization_level", "hardware_compatibility", "version_compatible",
               "exclude_lean_runtime", "sparse_weights", "tf32", "timing_cache", "contexts")


def settings_for(ir: GraphIR, options: dict[str, Any]) -> BuildSettings:
    """Builder settings from the IR (profiles, sparsity) and the target options."""
    values = {k: options[k] for k in OPTION_KEYS if k in options}
    sparse = values.get("sparse_weights", "auto")
    if sparse in ("auto", None):
        values["sparse_weights"] = ((ir.meta.get("sparsity") or {}).get("pattern") == "2:4")
    settings = BuildSettings(profiles=profiles_for(ir), **values)
    for flag in ("version_compatible", "exclude_lean_runtime", "sparse_weights", "tf32"):
        if not isinstance(getattr(settings, flag), bool):
            raise BackendError(f"tensorrt option {flag}={getattr(settings, flag)!r} must be true or false")
    return settings.validate()


def profiles_for(ir: GraphIR) -> dict[str, dict[str, dict[str, list[int]]]]:
    """Optimization profiles from the IR's dynamic dims: ``{name: {input: {min, opt, max}}}``.

    One profile ``default``; KV-cache graphs get ``prefill`` and ``decode`` (see the module doc).
    """
    from graphopt.backends.export import dim_label

    examples = {spec.name: tuple(ex.shape) for spec, ex in zip(ir.inputs, ir.example_inputs)}
    ranges: dict[str, list[int]] = {}   # label → [lo, opt, hi]
    for spec in ir.inputs:
        for d, (lo, hi) in sorted(spec.dynamic.items()):
            label = dim_label(spec.name, d, spec.shape[d])
            size = examples.get(spec.name, ())[d] if d < len(examples.get(spec.name, ())) else lo
            opt = min(max(int(size), lo), hi)
            if label in ranges:
                plo, popt, phi = ranges[label]
                lo, hi = max(lo, plo), min(hi, phi)
                opt = min(max(popt, lo), hi)
            ranges[label] = [int(lo), int(opt), int(hi)]
    if not ranges:
        return {}
    gen = ir.meta.get("generation") or {}
    if gen.get("kind") != "kv-cache":
        return {"default": _profile(ir, examples, ranges)}
    specs = {s.name: s for s in ir.inputs}
    ids = specs.get(gen.get("ids", ""))
    seq = dim_label(ids.name, 1, ids.shape[1]) if ids is not None and 1 in ids.dynamic else None
    cache = specs.get((gen.get("cache_inputs") or [""])[0])
    past = dim_label(cache.name, 2, cache.shape[2]) if cache is not None and 2 in cache.dynamic else None
    prefill, decode = dict(ranges), dict(ranges)
    if seq is not None:
        lo, opt, hi = ranges[seq]
        prefill[seq] = [max(lo, 1), max(opt, 1), hi]
        decode[seq] = [1, 1, 1]
    if past is not None:
        lo, _, hi = ranges[past]
        prefill[past] = [lo, lo, lo]
        dlo = max(lo, 1)
        decode[past] = [dlo, max(dlo, hi // 2), hi]
    return {"prefill": _profile(ir, examples, prefill), "decode": _profile(ir, examples, decode)}


def _profile(ir: GraphIR, examples: dict[str, tuple[int, ...]], ranges: dict[str, list[int]]
             ) -> dict[str, dict[str, list[int]]]:
    from graphopt.backends.export import dim_label

    out = {}
    for spec in ir.inputs:
        if not spec.dynamic:
            continue
        mins, opts, maxs = [], [], []
        for d, entry in enumerate(spec.shape):
            if d in spec.dynamic:
                lo, opt, hi = ranges[dim_label(spec.name, d, entry)]
            else:
                lo = opt = hi = int(entry) if isinstance(entry, int) else int(examples[spec.name][d])
            mins.append(lo)
            opts.append(opt)
            maxs.append(hi)
        out[spec.name] = {"min": mins, "opt": opts, "max": maxs}
    return out


def trtexec_command(settings: BuildSettings, onnx_file: str = MODEL_FILE, plan_file: str = PLAN_FILE,
                    timing_cache: str | None = None) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine`.

    ``--stronglyTyped`` is needed on 10.x and a no-op on 11.x (always strongly typed). One
    ``--minShapes/--optShapes/--maxShapes`` triple per optimization profile, in profile order, and
    the whole list once per concurrent context (see :attr:`BuildSettings.contexts`)."""
    args = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={plan_file}", "--stronglyTyped",
            f"--memPoolSize=workspace:{int(settings.workspace_mib)}M",
            f"--builderOptimizationLevel={int(settings.optimization_level)}"]
    for shapes in list(settings.profiles.values()) * settings.contexts:
        for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
            spec = ",".join(f"{name}:{'x'.join(str(d) for d in s[key])}" for name, s in shapes.items())
            args.append(f"{flag}={spec}")
    level = TRTEXEC_HARDWARE[settings.hardware_compatibility]
    if level:
        args.append(f"--hardwareCompatibilityLevel={level}")
    if settings.version_compatible:
        args.append("--versionCompatible")
    if settings.exclude_lean_runtime:
        args.append("--excludeLeanRuntime")
    if settings.sparse_weights:
        args.append("--sparsity=enable")
    if not settings.tf32:
        args.append("--noTF32")
    cache = timing_cache or settings.timing_cache
    if cache:
        args.append(f"--timingCacheFile={cache}")
    return " ".join(shlex.quote(a) for a in args)


# -- engine cache --------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get("GRAPHOPT_TRT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "graphopt" / "tensorrt"


def onnx_digest(onnx_path: Path) -> str:
    """sha256 over the ONNX file and its external data file (if any)."""
    h = hashlib.sha256()
    for p in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
        if p.is_file():
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def cache_key(onnx_sha256: str, settings: BuildSettings, trt_version: str, compute_capability: str) -> str:
    """sha256 of the ONNX bytes' digest + every builder setting + TensorRT version + GPU compute capability."""
    blob = json.dumps({"onnx": onnx_sha256, "settings": settings.cache_fields(), "tensorrt": trt_version,
                       "compute_capability": compute_capability}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def timing_cache_path(settings: BuildSettings, cache_dir: Path, trt_version: str, cc: str) -> Path:
    if settings.timing_cache:
        return Path(settings.timing_cache)
    major_minor = ".".join(str(v) for v in version_tuple(trt_version)[:2])
    return cache_dir / f"timing-trt{major_minor}-sm{cc.replace('.', '')}.cache"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclasses.dataclass
class BuiltEngine:
    plan: bytes
    facts: dict[str, Any]   # what the manifest records: versions, compute capability, header, cache key
    cached: bool


def build_engine(onnx_path: str | Path, settings: BuildSettings, *, trt: Any = None, cache_dir: str | Path | None = None,
                 compute_capability: str | None = None, use_cache: bool = True) -> BuiltEngine:
    """Build (or fetch from the engine cache) the serialized plan of ``onnx_path`` with ``settings``.

    ``trt``: the tensorrt module (default: imported; tests pass a fake). ``compute_capability``:
    the GPU's (default: torch's current device). Raises :class:`BackendError` naming what failed:
    parsing (with the parser's errors per node), or the build itself.
    """
    trt = trt if trt is not None else import_tensorrt(required=True)
    version = str(trt.__version__)
    major = version_tuple(version)[0]
    if major < MIN_MAJOR:
        raise BackendError(f"TensorRT {version} is too old: graphopt builds with TensorRT {MIN_MAJOR}.x or 11.x")
    cc = compute_capability or gpu_compute_capability()
    if cc is None:
        raise BackendError("no CUDA GPU is visible to torch; build the engine on a GPU node "
                           "(`graphopt build-engine DIR` there)")
    onnx_path = Path(onnx_path)
    digest = onnx_digest(onnx_path)
    key = cache_key(digest, settings, version, cc)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_dir / f"{key}.plan"
    facts = {"tensorrt": version, "compute_capability": cc, "cache_key": key, "onnx_sha256": digest,
             "version_compatible": settings.version_compatible,
             "hardware_compatibility": settings.hardware_compatibility,
             "profiles": list(settings.profiles), "contexts": settings.contexts}
    if use_cache and cached.is_file():
        plan = cached.read_bytes()
        if plan[:4] == PLAN_MAGIC:
            log.info("tensorrt: engine cache hit %s", cached)
            return BuiltEngine(plan, {**facts, **plan_header(plan)}, cached=True)
        log.warning("tensorrt: ignoring corrupt cache entry %s", cached)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if creation is not None and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)   # 10.x: opt in; 11.x: accepted and ignored
    elif major < 11:
        raise BackendError(f"TensorRT {version} has no strongly typed networks; use TensorRT 10.x or 11.x")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT {version}'s ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors[:10])
                           + "\nhint: `graphopt check --target tensorrt=" + ".".join(map(str, version_tuple(version)[:2]))
                           + f" {onnx_path}` names unsupported nodes and their fixes")
    config = builder.create_builder_config()
    configure(trt, builder, config, settings)
    timing_path = timing_cache_path(settings, cache_dir, version, cc)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT {version} could not build an engine from {onnx_path} (see the TensorRT log above); "
                           f"`graphopt check --target tensorrt {onnx_path}` lists known incompatibilities. If the log "
                           "reports GPU memory: a smaller --target-option workspace_mib, fewer contexts, or narrower "
                           "--dynamic ranges (smaller batch and sequence maxima)")
    plan = bytes(serialized)
    facts["build_time_s"] = round(time.perf_counter() - t0, 3)
    _atomic_write(timing_path, bytes(config.get_timing_cache().serialize()))
    if plan[:4] != PLAN_MAGIC:
        raise BackendError(f"TensorRT {version} returned a plan that does not start with {PLAN_MAGIC!r}")
    if use_cache:
        _atomic_write(cached, plan)
    return BuiltEngine(plan, {**facts, **plan_header(plan)}, cached=False)


def configure(trt: Any, builder: Any, config: Any, settings: BuildSettings) -> None:
    """Map :class:`BuildSettings` onto an ``IBuilderConfig`` (TensorRT 10.x and 11.x)."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mib) << 20)
    config.builder_optimization_level = int(settings.optimization_level)
    # Profile index = copy * len(profiles) + position: copy c of every profile serves context c.
    for _copy in range(settings.contexts if settings.profiles else 1):
        for name, shapes in settings.profiles.items():
            profile = builder.create_optimization_profile()
            for tensor, s in shapes.items():
                profile.set_shape(tensor, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
            if config.add_optimization_profile(profile) < 0:
                raise BackendError(f"TensorRT refused optimization profile {name!r}: {shapes}")
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                  HARDWARE_LEVELS[settings.hardware_compatibility])
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.exclude_lean_runtime:
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if settings.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if hasattr(trt.BuilderFlag, "TF32"):   # on by default in TensorRT: clear it unless asked for
        (config.set_flag if settings.tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    # No FP16/BF16/INT8 flag, ever: the network is strongly typed (TensorRT 11 removed those flags).


# -- plan header ----------------------------------------------------------------------------------
def plan_header(plan: bytes) -> dict[str, Any]:
    """What the manifest records about a plan's header: its magic and first bytes (which encode the
    serialization format version of the TensorRT release that wrote it)."""
    return {"plan_magic": plan[:4].decode("latin-1"), "plan_header": plan[:HEADER_BYTES].hex()}


def check_plan(plan_path: Path, engine: dict[str, Any], *, trt_version: str | None,
               compute_capability: str | None) -> None:
    """Refuse a plan before deserializing it: wrong magic, a header other than the one recorded at
    build time, a TensorRT version that cannot load it, or a GPU of another compute capability.
    Each error says what to do (rebuild with ``graphopt build-engine``)."""
    with open(plan_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:4] != PLAN_MAGIC:
        raise ArtifactError(f"{plan_path} is not a TensorRT plan (its first bytes are {head[:4]!r}, not {PLAN_MAGIC!r}); "
                            "rebuild it with `graphopt build-engine`")
    recorded = engine.get("plan_header")
    if recorded and head.hex() != recorded[: len(head.hex())]:
        raise ArtifactError(f"the header of {plan_path} differs from the one recorded when it was built "
                            f"(TensorRT {engine.get('tensorrt')}): the plan was replaced by another build; rebuild "
                            "it with `graphopt build-engine`")
    built = engine.get("tensorrt")
    if trt_version is not None and built:
        have, want = version_tuple(trt_version), version_tuple(built)
        if engine.get("version_compatible"):
            ok = have[0] == want[0] and have >= want[: len(have)]
            rule = f"a version-compatible plan loads on TensorRT {want[0]}.x >= {built}"
        else:
            ok = have[:3] == want[:3]
            rule = f"a plan loads only on the TensorRT release that built it ({built})"
        if not ok:
            raise ArtifactError(f"{plan_path} was built with TensorRT {built} but TensorRT {trt_version} is installed: "
                                f"{rule}. Install TensorRT {built} or rebuild the engine here with "
                                f"`graphopt build-engine {plan_path.parent}`")
    built_cc = engine.get("compute_capability")
    if compute_capability is not None and built_cc:
        level = engine.get("hardware_compatibility", "none")
        if level == "ampere_plus":
            ok = version_tuple(compute_capability) >= (8, 0)
            rule = "an ampere_plus plan runs on compute capability >= 8.0"
        else:
            ok = version_tuple(compute_capability)[:2] == version_tuple(built_cc)[:2]
            rule = f"a plan runs only on GPUs of the compute capability it was built for ({built_cc})"
        if not ok:
            raise ArtifactError(f"{plan_path} was built for compute capability {built_cc} but this GPU is "
                                f"{compute_capability}: {rule}. Rebuild it on this GPU with "
                                f"`graphopt build-engine {plan_path.parent}`, or compile with "
                                "target_options hardware_compatibility = \"ampere_plus\"")


# -- the backend -----------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    """TensorRT engine (strongly typed) from the TensorRT-ready ONNX; without TensorRT, the ONNX + build.json.

    Options (``lower``, ``target_options`` of a build config): ``workspace_mib`` (4096),
    ``optimization_level`` (0..5, 3), ``hardware_compatibility`` (``none``, ``ampere_plus``,
    ``same_compute_capability``), ``version_compatible``, ``exclude_lean_runtime``,
    ``sparse_weights`` (``auto``: on when the 2:4 pruning ran), ``timing_cache`` (a path),
    ``cache_dir`` (engine cache; default ``$GRAPHOPT_TRT_CACHE`` or ``~/.cache/graphopt/tensorrt``),
    ``build`` (``auto``: build when TensorRT and a GPU are here), ``check_version`` (TensorRT
    release for the static check), ``opset`` (handed to the onnx backend).
    Options (``load``): ``device`` (``cuda``, ``cuda:1``).
    """

    name = "tensorrt"
    atol = 1e-3
    rtol = 1e-3

    def __init__(self, trt: Any = None):
        self._trt = trt   # an injected module (tests); None → import lazily

    def lower(self, ir: GraphIR, out_dir: Path, options: dict[str, Any]) -> Lowered:
        from graphopt.backends.onnx import OnnxBackend

        out_dir = Path(out_dir)
        known = set(OPTION_KEYS) | {"cache_dir", "build", "check_version", "opset", "external_data"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BackendError(f"unknown tensorrt option(s) {unknown}; valid: {', '.join(sorted(known))}")
        onnx_opts = {k: options[k] for k in ("opset", "external_data") if k in options}
        onnx_opts["bfloat16"] = "keep"  # TensorRT has bf16 kernels: no fp32 upcast (that is for ONNX Runtime CPU)
        onnx_opts["fold_attention"] = False  # TensorRT's Attention takes no past_key/past_value
        onnx_lowered = OnnxBackend().lower(ir, out_dir, onnx_opts)
        settings = settings_for(ir, options)
        onnx_path = out_dir / MODEL_FILE
        notes = list(onnx_lowered.notes)
        stamped = _stamp_parser_ir_version(onnx_path, options.get("check_version"))
        if stamped is not None:
            onnx_lowered.payload["ir_version"] = stamped

        check = run_static_check(onnx_path, settings, options.get("check_version"))
        if check is not None:
            notes += [f"tensorrt check: {line}" for line in check["summary"]]

        digest = onnx_digest(onnx_path)
        build = {"format": BUILD_FORMAT, "version": 1, "onnx": MODEL_FILE, "onnx_sha256": digest,
                 "settings": settings.to_json(), "profiles": settings.profiles,
                 "graph": {"precision": (ir.meta.get("precision") or {}).get("dtype", "as captured"),
                           "sparsity": ir.meta.get("sparsity"), "lowering_check": ir.meta.get("lowering_check")},
                 "trtexec": trtexec_command(settings)}
        (out_dir / BUILD_FILE).write_text(json.dumps(build, indent=2) + "\n")
        files = list(onnx_lowered.files) + [BUILD_FILE]
        payload = {"format": "tensorrt", "file": PLAN_FILE, "onnx": MODEL_FILE, "build": BUILD_FILE,
                   "onnx_payload": onnx_lowered.payload, "engine": None, "check": check}

        want = options.get("build", "auto")
        trt = self._trt if self._trt is not None else (import_tensorrt() if want in ("auto", True) else None)
        can, missing = engine_available(trt) if want in ("auto", True) else (False, "build=false was given")
        if want is True and not can:
            raise BackendError(f"a TensorRT engine was required (--require-engine, or target option build=true) but "
                               f"{missing}, so none can be built here; {INSTALL_HINT}. Without --require-engine the "
                               "compile writes the TensorRT-ready ONNX and build.json for `graphopt build-engine DIR`")
        if can:
            built = build_engine(onnx_path, settings, trt=trt, cache_dir=options.get("cache_dir"))
            _atomic_write(out_dir / PLAN_FILE, built.plan)
            files.append(PLAN_FILE)
            payload["engine"] = built.facts
            notes.append(f"TensorRT {built.facts['tensorrt']} engine for compute capability "
                         f"{built.facts['compute_capability']}" + (" (from the engine cache)" if built.cached else ""))
        else:
            if not _ort_can_run(ir):
                payload["runnable"] = False   # the compiler skips the numeric check of the lowering
                notes.append("the bfloat16 ONNX was not run here: ONNX Runtime has no bfloat16 kernels without its CUDA "
                             "provider; the precision pass verified the graph, build-engine verifies the engine")
            notes.append(f"no TensorRT engine was built: {missing}. The artifact holds the TensorRT-ready {MODEL_FILE} "
                         f"(checked with ONNX Runtime) and {BUILD_FILE}; complete it on a GPU node with "
                         f"`graphopt build-engine DIR`, or build the plan with: {build['trtexec']}")
        return Lowered(files=files, payload=payload, notes=notes)

    def load(self, artifact_dir: Path, manifest: dict[str, Any], device: str | None = None,
             **_: Any) -> TensorRTRunner:
        from graphopt.runtime.tensorrt_runner import TensorRTRunner

        payload = manifest.get("payload") or {}
        engine = payload.get("engine")
        if not engine:
            raise ArtifactError(f"artifact {artifact_dir} has no TensorRT engine yet (it was compiled where TensorRT or a "
                                "GPU was missing); run `graphopt build-engine DIR` on a GPU node with TensorRT, or "
                                "compile for --target onnx to run it with ONNX Runtime")
        file = payload.get("file", PLAN_FILE)
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise ArtifactError(f"manifest names TensorRT plan {file!r}; it must be a file name inside the artifact "
                                "directory")
        return TensorRTRunner(Path(artifact_dir) / file, engine, manifest, device=device, trt=self._trt)

    def load_for_verification(self, artifact_dir: Path, manifest: dict[str, Any]) -> Any:
        """The engine when one was built; else the TensorRT-ready ONNX run by ONNX Runtime, so what
        can be checked without TensorRT is checked for real."""
        payload = manifest.get("payload") or {}
        if payload.get("engine"):
            return self.load(artifact_dir, manifest)
        from graphopt.runtime.onnx_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(Path(artifact_dir) / payload.get("onnx", MODEL_FILE))


def _stamp_parser_ir_version(onnx_path: Path, version: str | None) -> int | None:
    """Stamp the highest ONNX IR version the TensorRT parser of ``version`` (default: the installed
    TensorRT, else the newest recorded release) was built against, when the file carries a newer one
    (the parser warns on newer IR versions). Never below what the file's opset needs. Returns the new
    IR version, or None when the file was left alone."""
    import onnx

    from graphopt.backends.onnx import _default_opset, ir_version_for_opset

    try:
        from graphopt.backends.tensorrt_check import load_data, parse_version
    except ImportError:  # pragma: no cover
        return None
    trt = import_tensorrt()
    asked = version or (".".join(map(str, version_tuple(trt.__version__)[:2])) if trt is not None else None)
    rows = load_data()["releases"]
    if asked is not None:
        want = parse_version(asked)
        rows = [r for r in rows if version_tuple(r["version"]) <= want] or rows[:1]
    cap = int(rows[-1]["max_ir_version"])
    model = onnx.load(str(onnx_path), load_external_data=False)
    target = max(cap, ir_version_for_opset(_default_opset(model)))
    if model.ir_version <= target:
        return None
    model.ir_version = target
    onnx.save_model(model, str(onnx_path))
    return target


def _ort_can_run(ir: GraphIR) -> bool:
    """ONNX Runtime's CPU provider has no bfloat16 kernels; its CUDA provider does."""
    if (ir.meta.get("precision") or {}).get("dtype") != "bfloat16":
        return True
    from graphopt.runtime.onnx_runner import CUDA_PROVIDER, default_providers

    return CUDA_PROVIDER in default_providers()


def run_static_check(onnx_path: Path, settings: BuildSettings, version: str | None) -> dict[str, Any] | None:
    """``tensorrt_check.check_onnx`` on the lowered model with the build's profiles; errors stop the
    compile (the engine build would fail), warnings become notes. None if the checker is missing."""
    try:
        from graphopt.backends.tensorrt_check import check_onnx
    except ImportError as e:  # pragma: no cover - the checker ships with graphopt
        log.warning("tensorrt: static check unavailable (%s)", e)
        return None
    trt = import_tensorrt()
    if version is None and trt is not None:
        version = ".".join(str(v) for v in version_tuple(trt.__version__)[:2])
    report = check_onnx(onnx_path, version=version, profiles=settings.profiles or None,
                        build_config={"settings": settings.to_json(), "profiles": settings.profiles})
    report.raise_if_errors()
    summary = [f"TensorRT {report.version}: {len(report.errors)} errors, {len(report.warnings)} warnings"]
    summary += [f"{f.severity} [{f.rule}] {f.node or ''} {f.message} (fix: {f.fix})".replace("  ", " ")
                for f in report.warnings]
    return {"version": report.version, "ok": report.ok, "errors": len(report.errors),
            "warnings": len(report.warnings), "summary": summary,
            "findings": [f.to_dict() for f in report.findings]}


# -- completing an artifact on a GPU node ---------------------------------------------------------
def build_engine_in_place(artifact_dir: str | Path, *, trt: Any = None, cache_dir: str | Path | None = None,
                          rebuild: bool = False, verify: bool = True, compute_capability: str | None = None
                          ) -> dict[str, Any]:
    """``graphopt build-engine DIR``: build the plan of a ``tensorrt`` artifact from its model.onnx
    and build.json, check it against the stored example outputs, and replace the artifact atomically
    (a failure leaves it as it was). Returns the engine facts written to the manifest."""
    import shutil

    from graphopt.artifact import ArtifactWriter, read_manifest, verify_checksums

    path = Path(artifact_dir)
    manifest = read_manifest(path)
    verify_checksums(path, manifest)
    if manifest["target"] != "tensorrt":
        raise ArtifactError(f"{path} was compiled for target {manifest['target']!r}; build-engine completes artifacts "
                            "compiled with --target tensorrt")
    payload = dict(manifest["payload"])
    if payload.get("engine") and not rebuild:
        return {**payload["engine"], "status": "present"}
    build_file = path / payload.get("build", BUILD_FILE)
    try:
        build = json.loads(build_file.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{build_file} is missing or not JSON ({e}); compile the model again") from None
    if build.get("format") != BUILD_FORMAT:
        raise ArtifactError(f"{build_file} is not a graphopt TensorRT build file; compile the model again")
    settings = BuildSettings.from_json(build["settings"])
    trt = trt if trt is not None else import_tensorrt()
    if trt is None:
        raise BackendError(f"cannot build the engine here: the tensorrt Python module is not installed; {INSTALL_HINT}. "
                           f"Equivalent command, run in {path}: {build.get('trtexec')}")
    cc = compute_capability or gpu_compute_capability()
    if cc is None:
        raise BackendError(f"cannot build the engine here: no CUDA GPU is visible to torch (TensorRT "
                           f"{trt.__version__} is installed); run `graphopt build-engine {path}` on a GPU node")
    built = build_engine(path / payload.get("onnx", MODEL_FILE), settings, trt=trt, cache_dir=cache_dir,
                         compute_capability=cc)
    with ArtifactWriter(path) as w:
        for rel in manifest["files"]:
            if rel != payload.get("file", PLAN_FILE):
                (w.dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path / rel, w.dir / rel)
        _atomic_write(w.dir / PLAN_FILE, built.plan)
        facts = dict(built.facts)
        payload.update(file=PLAN_FILE, engine=facts, runnable=True)
        new = dict(manifest, payload=payload)
        new["versions"] = dict(manifest.get("versions") or {}, tensorrt=str(trt.__version__))
        if verify:
            facts["verification"] = _verify_engine(w.dir, new, build.get("graph") or {}, trt)
        w.commit(new)
    return {**facts, "status": "built" if not built.cached else "from cache"}


def _verify_engine(path: Path, manifest: dict[str, Any], graph: dict[str, Any], trt: Any) -> dict[str, Any]:
    """Run the engine on the stored example inputs and compare with the original module's outputs:
    the precision pass's reference tolerance (RMSE) for low-precision graphs, else allclose(1e-3)."""
    import numpy as np

    from graphopt.errors import VerificationError
    from graphopt.runtime.tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner(path / PLAN_FILE, manifest["payload"]["engine"], manifest, trt=trt)
    try:
        with np.load(path / "example_inputs.npz", allow_pickle=False) as z:
            feeds = [z[s["name"]] for s in manifest["inputs"]]
        with np.load(path / "expected_outputs.npz", allow_pickle=False) as z:
            expected = {k: z[k] for k in z.files}
        outs = runner.run(feeds)
    finally:
        runner.close()
    check = graph.get("lowering_check") or {}
    worst, record = 0.0, {}
    for spec, out in zip(manifest["outputs"], outs):
        got = out.detach().float().cpu().double().numpy()
        want = expected[spec["name"]].astype(np.float64)
        if check.get("policy") == "reference":
            err = float(np.sqrt(np.mean((got - want) ** 2))) if got.size else 0.0
            ok, bound = err <= float(check["tol"]), f"rmse <= {float(check['tol']):.3g}"
        else:
            err = float(np.abs(got - want).max()) if got.size else 0.0
            ok = bool(np.all(np.abs(got - want) <= 1e-3 + 1e-3 * np.abs(want)))
            bound = "allclose(rtol=1e-3, atol=1e-3)"
        record[spec["name"]] = {"error": err, "passed": ok}
        worst = max(worst, err)
        if not ok:
            raise VerificationError(f"the TensorRT engine does not reproduce the original module on the stored example "
                                    f"inputs: output {spec['name']!r} error {err:.3g} exceeds {bound}; the artifact was "
                                    "left unchanged")
    return {"passed": True, "worst_error": worst, "outputs": record}
