"""The runtime plugin interface, as plugins import it (`medmoe_edge.runtimes.base`).

The contract itself lives in the core (`medmoe_edge.runtime_contract`, the vocabulary in
`medmoe_edge.vocab`) so that the core never imports this package; this module re-exports it
for runtime implementations and third-party plugins.
"""

from medmoe_edge.generation import StepOutput
from medmoe_edge.runtime_contract import (
    DTYPE,
    KV_TYPE,
    PROVIDER,
    THREADS,
    VISION_TOWER,
    Availability,
    Capabilities,
    ModelInfo,
    PreparedRequest,
    ResolvedOptions,
    Runtime,
    RuntimeOptions,
    default_threads,
    greedy_tokens,
    prompt_routing_counts,
    token_kinds,
)
from medmoe_edge.vocab import ArtifactKind, Device, DeviceKind, KvType, Precision

__all__ = [
    "DTYPE",
    "KV_TYPE",
    "PROVIDER",
    "THREADS",
    "VISION_TOWER",
    "ArtifactKind",
    "Availability",
    "Capabilities",
    "Device",
    "DeviceKind",
    "KvType",
    "ModelInfo",
    "Precision",
    "PreparedRequest",
    "ResolvedOptions",
    "Runtime",
    "RuntimeOptions",
    "StepOutput",
    "default_threads",
    "greedy_tokens",
    "prompt_routing_counts",
    "token_kinds",
]
