"""A minimal third-party exporter, installed only by tests/test_exporter_plugins.py through the
`medmoe_edge.exporters` entry-point group: `--format echo` writes the model's tensors, in the
requested float precision, into one safetensors file under their released names."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.exporter import ExportParts, Exporter, ExportRequest, stored_groups
from medmoe_edge.tensor_ids import checkpoint_map, released_state_dict
from medmoe_edge.vocab import FLOAT_PRECISIONS, ArtifactKind, Precision

WEIGHTS = "tensors.safetensors"


class EchoExporter(Exporter):
    name = "echo"
    artifact_kind = ArtifactKind.CHECKPOINT
    description = "test plugin: the checkpoint's tensors in one safetensors file"
    precisions = FLOAT_PRECISIONS
    default_precision = Precision.FP32

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, "safetensors"

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        state = {k: v.contiguous() for k, v in released_state_dict(loaded.model).items()}
        save_file(state, str(out / WEIGHTS))
        tmap = checkpoint_map(state, loaded.spec)
        sizes = {k: v.numel() for k, v in state.items()}
        stored = [(tmap.ids(k), request.precision, n) for k, n in sizes.items()]
        return ExportParts(roles={WEIGHTS: "weights"}, graphs={}, tensor_groups=stored_groups(self.name, stored, tmap.group_sizes(sizes)))
