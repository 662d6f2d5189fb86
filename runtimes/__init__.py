"""Runtime plugins (installed as `medmoe_edge.runtimes`): see `base.Runtime` and `registry`."""

from .base import ArtifactKind, Availability, Capabilities, ModelInfo, Precision, PreparedRequest, Runtime, RuntimeOptions
from .registry import discover, get_runtime, register, unregister

__all__ = [
    "ArtifactKind",
    "Availability",
    "Capabilities",
    "ModelInfo",
    "Precision",
    "PreparedRequest",
    "Runtime",
    "RuntimeOptions",
    "discover",
    "get_runtime",
    "register",
    "unregister",
]
