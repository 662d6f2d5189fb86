"""Runtime discovery through the `medmoe_edge.runtimes` entry-point group.

The built-in PyTorch runtime is registered in this project's pyproject.toml exactly as
a third-party package registers its own:

    [project.entry-points."medmoe_edge.runtimes"]
    myruntime = "my_package.module:MyRuntime"
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from medmoe_edge.errors import RuntimeUnavailable

from .base import ArtifactKind, Availability, Runtime

ENTRY_POINT_GROUP = "medmoe_edge.runtimes"

# Runtimes registered by code (tests, notebooks) in addition to entry points.
_extra: dict[str, type[Runtime]] = {}


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
    _extra[cls.name] = cls


def unregister(name: str) -> None:
    _extra.pop(name, None)


def discover() -> dict[str, RuntimeEntry]:
    """All runtimes: entry points of the group, then programmatic registrations, by name."""
    found: dict[str, RuntimeEntry] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Runtime)):
                raise TypeError(f"{ep.value} is not a medmoe_edge Runtime subclass")
            found[ep.name] = RuntimeEntry(ep.name, ep.value, cls, None)
        except Exception as e:  # noqa: BLE001 - report, don't crash, on a broken plugin
            found[ep.name] = RuntimeEntry(ep.name, ep.value, None, f"{type(e).__name__}: {e}")
    for name, cls in _extra.items():
        found[name] = RuntimeEntry(name, f"{cls.__module__}:{cls.__qualname__}", cls, None)
    return found


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
