"""FAKE ``tensorrt`` module for tests only: it records every builder call and builds nothing.

TensorRT cannot be installed on the machines these tests run on, so the mapping from graphopt's
builder settings onto the TensorRT Python API is checked against this recording fake, which
mirrors the names and signatures of the real TensorRT 10.x / 11.x API that graphopt uses
(``Builder``, ``NetworkDefinitionCreationFlag``, ``OnnxParser``, ``IBuilderConfig``, ...). Version
behaviour it reproduces:

- 10.x: ``BuilderFlag`` still has the weak-typing precision flags (FP16, BF16, INT8, ...); the
  ``STRONGLY_TYPED`` creation flag must be passed to get a strongly typed network;
- 11.x: those precision flags do not exist (``AttributeError``, as in the real 11.x bindings);
  ``STRONGLY_TYPED`` is accepted and ignored (always strongly typed).

The "plan" it returns is ``b"ftrt"`` + a header derived from the version + the recorded calls: not
an engine. Nothing here may be used outside tests; it is never registered as ``tensorrt``.
"""

from __future__ import annotations

import enum
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PRECISION_FLAGS_10 = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                      "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")
COMMON_FLAGS = ("TF32", "SPARSE_WEIGHTS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "REFIT", "DEBUG")


class FakeTensorRT(SimpleNamespace):
    """``FakeTensorRT("10.13.0.35")`` or ``FakeTensorRT("11.0.0.5")``: a recording stand-in for ``tensorrt``.

    ``calls`` lists ``(object, method, args)`` tuples in call order; ``parse_errors`` (set before a
    build) makes the parser fail with those messages; ``build_fails`` makes the build return None."""

    def __init__(self, version: str = "10.13.0.35"):
        super().__init__()
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.calls: list[tuple[str, str, tuple]] = []
        self.parse_errors: list[str] = []
        self.build_fails = False
        self.builds = 0
        flags = COMMON_FLAGS + (PRECISION_FLAGS_10 if self.major < 11 else ())
        self.BuilderFlag = enum.IntEnum("BuilderFlag", {name: i for i, name in enumerate(flags)})
        creation = {"STRONGLY_TYPED": 1} if self.major < 11 else {"STRONGLY_TYPED": 0}
        if self.major < 11:
            creation["EXPLICIT_BATCH"] = 0
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
        self.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})
        self.HardwareCompatibilityLevel = enum.IntEnum(
            "HardwareCompatibilityLevel", {"NONE": 0, "AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2})
        self.Logger = _Logger
        fake = self

        class Builder:
            def __init__(self, logger: Any):
                fake.calls.append(("builder", "__init__", ()))

            def create_network(self, flags: int = 0) -> _Network:
                fake.calls.append(("builder", "create_network", (flags,)))
                return _Network(flags)

            def create_builder_config(self) -> _Config:
                fake.calls.append(("builder", "create_builder_config", ()))
                return _Config(fake)

            def create_optimization_profile(self) -> _Profile:
                return _Profile(fake)

            def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
                fake.calls.append(("builder", "build_serialized_network", ()))
                if fake.build_fails:
                    return None
                fake.builds += 1
                header = hashlib.sha256(fake.__version__.encode()).digest()[:28]
                body = hashlib.sha256(repr(fake.calls).encode()).digest()
                return b"ftrt" + header + body

        class OnnxParser:
            def __init__(self, network: _Network, logger: Any):
                self.errors: list[str] = []

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parser", "parse_from_file", (path,)))
                if not Path(path).is_file():
                    self.errors = [f"cannot open {path}"]
                self.errors = self.errors or list(fake.parse_errors)
                return not self.errors

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> str:
                return self.errors[i]

        self.Builder, self.OnnxParser = Builder, OnnxParser

    def recorded(self, obj: str, method: str) -> list[tuple]:
        return [args for o, m, args in self.calls if (o, m) == (obj, method)]


class _Logger:
    WARNING, ERROR, INFO, VERBOSE = 2, 1, 3, 4

    def __init__(self, severity: int = 2):
        self.severity = severity


class _Network:
    def __init__(self, flags: int):
        self.flags = flags


class _Profile:
    def __init__(self, fake: FakeTensorRT):
        self.fake, self.shapes = fake, {}

    def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:  # noqa: A002 - TensorRT's names
        if not (len(min) == len(opt) == len(max)) or any(not a <= b <= c for a, b, c in zip(min, opt, max)):
            raise ValueError(f"fake tensorrt: invalid profile shapes for {name}: {min} {opt} {max}")
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))
        self.fake.calls.append(("profile", "set_shape", (name, tuple(min), tuple(opt), tuple(max))))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timing"


class _Config:
    def __init__(self, fake: FakeTensorRT):
        self.fake = fake
        self.flags: set = {fake.BuilderFlag.TF32}   # TensorRT enables TF32 by default
        self.profiles: list[_Profile] = []
        self._opt_level = 3
        self._hw = fake.HardwareCompatibilityLevel.NONE
        self.timing_cache: _TimingCache | None = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.fake.calls.append(("config", "set_memory_pool_limit", (pool, size)))

    @property
    def builder_optimization_level(self) -> int:
        return self._opt_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        self.fake.calls.append(("config", "builder_optimization_level", (level,)))
        self._opt_level = level

    @property
    def hardware_compatibility_level(self) -> Any:
        return self._hw

    @hardware_compatibility_level.setter
    def hardware_compatibility_level(self, level: Any) -> None:
        self.fake.calls.append(("config", "hardware_compatibility_level", (level,)))
        self._hw = level

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        self.fake.calls.append(("config", "add_optimization_profile", (dict(profile.shapes),)))
        return len(self.profiles) - 1

    def set_flag(self, flag: Any) -> None:
        self.fake.calls.append(("config", "set_flag", (flag.name,)))
        self.flags.add(flag)

    def clear_flag(self, flag: Any) -> None:
        self.fake.calls.append(("config", "clear_flag", (flag.name,)))
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        self.fake.calls.append(("config", "create_timing_cache", (bytes(data),)))
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        return self.timing_cache
