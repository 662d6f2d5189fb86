"""A third-party runtime plugin in one file, for tests: runs a `plugin` bundle whose files are a
checkpoint (see checkpoint_bundle_exporter.py) with the PyTorch reference model.

It is installed by the tests through the `medmoe_edge.runtimes` entry-point group, exactly as a
separate package would be, and uses only the public plugin interface.
"""

from __future__ import annotations

from pathlib import Path

from medmoe_edge.bundle import open_bundle
from medmoe_edge.runtimes.base import ArtifactKind, Availability, ResolvedOptions
from medmoe_edge.runtimes.torch_runtime import TorchRuntime


class CheckpointBundleRuntime(TorchRuntime):
    name = "ckpt-bundle"
    artifact_kind = ArtifactKind.PLUGIN
    description = "test plugin: a checkpoint inside a bundle, run by the reference model"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, "pure PyTorch")

    def _load(self, model: str | Path, options: ResolvedOptions) -> None:
        open_bundle(model, ArtifactKind.PLUGIN)  # every file checked against the manifest first
        self._load_checkpoint(Path(model), options)
