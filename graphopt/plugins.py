"""The plugin manager: finds plugins, isolates failures, and keeps the pass/backend tables.

Plugins come from, in order:
1. the ``graphopt`` entry-point group — the built-in plugins are registered there too, exactly
   like a third-party package;
2. ``GRAPHOPT_PLUGINS=module.a,module.b`` (import names), and ``graphopt -p MODULE`` on the CLI;
3. ``register_plugin(obj)`` from Python (tests register a plugin and unregister it after).

``GRAPHOPT_DISABLE_PLUGINS=a,b`` blocks plugins by name. A plugin that fails to import or to
register is skipped and listed with its error by ``graphopt plugins``;
``GRAPHOPT_STRICT_PLUGINS=1`` makes that fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
import threading
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from graphopt import hookspecs
from graphopt.errors import PluginError, UnknownBackendError
from graphopt.passes.registry import PassRegistry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphopt"


@dataclass
class PluginInfo:
    name: str
    source: str  # "entry point (dist x.y)", "GRAPHOPT_PLUGINS", "python"
    module: str = ""
    version: str = ""
    passes: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    onnx_translations: list[str] = field(default_factory=list)
    error: str | None = None
    blocked: bool = False

    @property
    def status(self) -> str:
        return "blocked" if self.blocked else ("failed" if self.error else "ok")


class _Registrar:
    """The ``register`` callback handed to ``graphopt_register_passes`` of one plugin."""

    def __init__(self, manager: PluginManager, plugin: str):
        self._m, self._plugin = manager, plugin

    def __call__(self, cls: type) -> type:
        self._m.passes.add(cls, self._plugin)
        self._m.plugins[self._plugin].passes.append(cls.name)
        return cls

    def alias(self, name: str, pipeline: str) -> None:
        self._m.passes.add_alias(name, pipeline, self._plugin)
        self._m.plugins[self._plugin].aliases.append(name)


class _BackendRegistrar:
    def __init__(self, manager: PluginManager, plugin: str):
        self._m, self._plugin = manager, plugin

    def __call__(self, cls: type) -> type:
        name = getattr(cls, "name", "")
        if not name:
            raise PluginError(f"plugin {self._plugin!r} registered backend {cls!r} without a name")
        if name in self._m.backends and self._m.backends[name][0] is not cls:
            raise PluginError(f"plugin {self._plugin!r} registers backend {name!r}, already registered by "
                              f"{self._m.backends[name][1]!r}")
        self._m.backends[name] = (cls, self._plugin)
        self._m.plugins[self._plugin].backends.append(name)
        return cls


class _TranslationRegistrar:
    """The ``register`` callback of ``graphopt_register_onnx_translations``."""

    def __init__(self, manager: PluginManager, plugin: str):
        self._m, self._plugin = manager, plugin

    def __call__(self, op: Any, function: Any, *, min_opset: int = 18) -> None:
        if not callable(function):
            raise PluginError(f"plugin {self._plugin!r} registered an ONNX translation of {op} that is not a function")
        entries = [e for e in self._m.onnx_translations.get(op, [])
                   if not (e[0] == int(min_opset) and e[2] == self._plugin)]
        entries.append((int(min_opset), function, self._plugin))
        self._m.onnx_translations[op] = sorted(entries, key=lambda e: e[0])
        label = f"{op} (opset {int(min_opset)}+)"
        if label not in self._m.plugins[self._plugin].onnx_translations:
            self._m.plugins[self._plugin].onnx_translations.append(label)


class PluginManager:
    """Owns the pluggy manager plus the pass and backend tables built from the plugins."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("graphopt")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.passes = PassRegistry()
        self.backends: dict[str, tuple[type, str]] = {}
        #: op overload → [(lowest opset, onnxscript function, plugin)], sorted by opset
        self.onnx_translations: dict[Any, list[tuple[int, Any, str]]] = {}
        self.strict = os.environ.get("GRAPHOPT_STRICT_PLUGINS", "") not in ("", "0", "false")
        self.disabled = {x.strip() for x in os.environ.get("GRAPHOPT_DISABLE_PLUGINS", "").split(",") if x.strip()}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # -- loading -------------------------------------------------------------------------
    def load_all(self) -> PluginManager:
        found = False
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            if dist is not None and dist.metadata["Name"] == "graphopt":
                found = True
            source = f"entry point ({dist.metadata['Name']} {dist.version})" if dist else "entry point"
            self._load(ep.name, lambda ep=ep: ep.load(), source, ep.value, dist.version if dist else "")
        if not found:  # the built-in plugins are found like any other: through graphopt's entry points
            log.warning("graphopt's entry points are not installed, so none of its built-in passes and targets "
                        "are; install it: pip install -e . (make setup) in a source tree")
        for module in [m.strip() for m in os.environ.get("GRAPHOPT_PLUGINS", "").split(",") if m.strip()]:
            self.load_module(module, source="GRAPHOPT_PLUGINS")
        return self

    def load_module(self, module: str, *, source: str = "command line") -> PluginInfo:
        """Load a plugin by import name (``-p mypkg.plugin``)."""
        return self._load(module, lambda: importlib.import_module(module), source, module, "")

    def register_plugin(self, plugin: Any, name: str | None = None) -> PluginInfo:
        """Register a module/object with hookimpls from Python (tests, notebooks)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        return self._load(name, lambda: plugin, "python", getattr(plugin, "__name__", name), "")

    def unregister_plugin(self, name: str) -> None:
        info = self.plugins.pop(name, None)
        if info is None:
            return
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop what plugin ``name`` registered: passes, aliases, backends, ONNX translations."""
        self.passes.remove_plugin(name)
        self.backends = {k: v for k, v in self.backends.items() if v[1] != name}
        kept = {op: [e for e in entries if e[2] != name] for op, entries in self.onnx_translations.items()}
        self.onnx_translations = {op: entries for op, entries in kept.items() if entries}

    def _load(self, name: str, loader: Any, source: str, module: str, version: str) -> PluginInfo:
        info = PluginInfo(name=name, source=source, module=module, version=version)
        if name in self.plugins and not self.plugins[name].error:
            return self.plugins[name]
        self.plugins[name] = info
        if name in self.disabled:
            info.blocked = True
            return info
        try:
            obj = loader()
            if not version and isinstance(obj, ModuleType):
                info.version = str(getattr(obj, "__version__", ""))
            self.pm.register(obj, name=name)
            for hook_name, reg in (("graphopt_register_passes", _Registrar),
                                   ("graphopt_register_backends", _BackendRegistrar),
                                   ("graphopt_register_onnx_translations", _TranslationRegistrar)):
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin_name == name:
                        impl.function(register=reg(self, name))
        except Exception as e:
            info.error = f"{type(e).__name__}: {e}"
            log.debug("plugin %s failed:\n%s", name, traceback.format_exc())
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            self._forget(name)
            info.passes, info.aliases, info.backends, info.onnx_translations = [], [], [], []
            if self.strict:
                raise PluginError(f"plugin {name!r} ({source}) failed to load: {info.error} "
                                  "(GRAPHOPT_STRICT_PLUGINS is set)") from e
            log.warning("plugin %s failed to load and is skipped: %s", name, info.error)
        return info

    # -- lookups -------------------------------------------------------------------------
    def backend(self, name: str) -> Any:
        try:
            cls, _ = self.backends[name]
        except KeyError:
            raise UnknownBackendError(f"unknown target {name!r}; valid targets: {', '.join(sorted(self.backends)) or '(none)'}") from None
        return cls()

    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error]


_manager: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager(*, reload: bool = False) -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _manager
    with _lock:
        if _manager is None or reload:
            _manager = PluginManager().load_all()
        return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins (tests that change GRAPHOPT_* environment variables)."""
    global _manager
    with _lock:
        _manager = None
