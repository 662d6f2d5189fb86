"""Runtime discovery through the `medmoe_edge.runtimes` entry-point group.

The built-in runtimes are registered in this project's pyproject.toml exactly as a
third-party package registers its own:

    [project.entry-points."medmoe_edge.runtimes"]
    myruntime = "my_package.module:MyRuntime"
"""

from __future__ import annotations

from dataclasses import dataclass

from medmoe_edge.errors import RuntimeUnavailable
from medmoe_edge.plugins import PluginGroup
from medmoe_edge.runtime_contract import Availability, Runtime
from medmoe_edge.vocab import ArtifactKind

ENTRY_POINT_GROUP = "medmoe_edge.runtimes"

_group: PluginGroup[Runtime] = PluginGroup(ENTRY_POINT_GROUP, Runtime)


@dataclass(frozen=True)
class RuntimeEntry:
    """A discovered runtime: its class, or why it could not be imported."""

    name: str
    target: str  # "module:Class"
    cls: type[Runtime] | None
    error: str | None

    def availability(self) -> Availability:
        if self.cls is None:
            return Availability(False, f"plugin failed to import: {self.error}")
        try:
            return self.cls.availability()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break `medmoe-edge runtimes`
            return Availability(False, f"availability check failed: {type(e).__name__}: {e}")


def register(cls: type[Runtime]) -> None:
    """Register a runtime class programmatically (e.g. in tests); entry points are the normal path."""
    _group.register(cls.name, cls)


def unregister(name: str) -> None:
    _group.unregister(name)


def discover() -> dict[str, RuntimeEntry]:
    """All runtimes: entry points of the group, then programmatic registrations, by name."""
    return {name: RuntimeEntry(e.name, e.target, e.cls, e.error) for name, e in _group.discover().items()}


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class called `name`.

    Raises:
        RuntimeUnavailable: unknown name (the message lists the known ones), a plugin that
            fails to import, or one that is not available here (with its reason).
    """
    entries = discover()
    if name not in entries:
        known = ", ".join(entries) or "none (is medmoe-edge installed with pip?)"
        raise RuntimeUnavailable(f"unknown runtime {name!r}; installed runtimes: {known}")
    entry = entries[name]
    av = entry.availability()
    if not av.available or entry.cls is None:
        raise RuntimeUnavailable(f"runtime {name!r} is not available: {av.reason}")
    return entry.cls


def runtime_for(kind: ArtifactKind) -> str:
    """Name of the first registered runtime (by name) that loads artifacts of `kind`.

    Raises:
        RuntimeUnavailable: no installed runtime loads that kind.
    """
    for name, entry in sorted(discover().items()):
        if entry.cls is not None and entry.cls.artifact_kind is kind:
            return name
    raise RuntimeUnavailable(f"no installed runtime loads {kind.value} artifacts: see `medmoe-edge runtimes`")
