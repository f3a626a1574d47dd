"""The pass registry: names → pass classes (and the plugin that registered each), plus aliases."""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.errors import PluginError, UnknownPassError
from graphopt.passes.base import NAME_RE, Pass


@dataclass
class PassInfo:
    cls: type[Pass]
    plugin: str


class PassRegistry:
    def __init__(self) -> None:
        self.passes: dict[str, PassInfo] = {}
        self.aliases: dict[str, tuple[str, str]] = {}  # name -> (pipeline text, plugin)

    def add(self, cls: type[Pass], plugin: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a graphopt.Pass subclass")
        name = getattr(cls, "name", "")
        if not name or not NAME_RE.match(name):
            raise PluginError(f"plugin {plugin!r}: pass {cls.__name__} has name {name!r}; "
                              "set name to a kebab-case string like 'fuse-attention'")
        if cls.run is Pass.run:
            raise PluginError(f"plugin {plugin!r}: pass {name!r} ({cls.__name__}) does not implement run()")
        if name in self.passes and self.passes[name].cls is not cls:
            raise PluginError(f"plugin {plugin!r} registers pass {name!r}, already registered by plugin "
                              f"{self.passes[name].plugin!r}; rename one of them")
        if name in self.aliases:
            raise PluginError(f"plugin {plugin!r}: pass name {name!r} is already a pipeline alias")
        self.passes.setdefault(name, PassInfo(cls, plugin))

    def add_alias(self, name: str, pipeline: str, plugin: str) -> None:
        if not NAME_RE.match(name):
            raise PluginError(f"plugin {plugin!r}: alias {name!r} is not kebab-case")
        if name in self.passes or (name in self.aliases and self.aliases[name][0] != pipeline):
            raise PluginError(f"plugin {plugin!r}: alias {name!r} is already taken")
        self.aliases[name] = (pipeline, plugin)

    def remove_plugin(self, plugin: str) -> None:
        self.passes = {k: v for k, v in self.passes.items() if v.plugin != plugin}
        self.aliases = {k: v for k, v in self.aliases.items() if v[1] != plugin}

    def get(self, name: str) -> PassInfo:
        try:
            return self.passes[name]
        except KeyError:
            raise UnknownPassError(f"unknown pass {name!r}; valid names: {', '.join(self.valid_names()) or '(none)'}"
                                   + _did_you_mean(name, self.valid_names())) from None

    def valid_names(self) -> list[str]:
        return sorted(set(self.passes) | set(self.aliases))


def _did_you_mean(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
