"""Plugin discovery through entry-point groups, shared by runtimes and exporters.

Built-in runtimes and exporters register in this project's pyproject.toml exactly as a
third-party package registers its own (llm's `DEFAULT_PLUGINS` idea):

    [project.entry-points."medmoe_edge.runtimes"]
    myruntime = "my_package.module:MyRuntime"

    [project.entry-points."medmoe_edge.exporters"]
    myformat = "my_package.module:MyExporter"

Plugins are imported only when discovered, and a plugin that fails to import is reported
with its error instead of breaking the tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PluginEntry(Generic[T]):
    """A discovered plugin: its class, or why it could not be imported."""

    name: str
    target: str  # "module:Class"
    cls: type[T] | None
    error: str | None


class PluginGroup(Generic[T]):
    """One entry-point group of plugin classes that subclass `base`, plus programmatic registrations."""

    def __init__(self, group: str, base: type[T]) -> None:
        self.group = group
        self.base = base
        self._extra: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T]) -> None:
        """Register a class by code (tests, notebooks); entry points are the normal path."""
        self._extra[name] = cls

    def unregister(self, name: str) -> None:
        self._extra.pop(name, None)

    def discover(self) -> dict[str, PluginEntry[T]]:
        """Every plugin of the group: entry points (by name), then programmatic registrations."""
        found: dict[str, PluginEntry[T]] = {}
        for ep in sorted(entry_points(group=self.group), key=lambda e: e.name):
            try:
                cls = ep.load()
                if not (isinstance(cls, type) and issubclass(cls, self.base)):
                    raise TypeError(f"{ep.value} is not a medmoe_edge {self.base.__name__} subclass")
                found[ep.name] = PluginEntry(ep.name, ep.value, cls, None)
            except Exception as e:  # noqa: BLE001 - report, don't crash, on a broken plugin
                found[ep.name] = PluginEntry(ep.name, ep.value, None, f"{type(e).__name__}: {e}")
        for name, cls in self._extra.items():
            found[name] = PluginEntry(name, f"{cls.__module__}:{cls.__qualname__}", cls, None)
        return found


__all__ = ["PluginEntry", "PluginGroup"]
