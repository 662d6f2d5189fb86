"""A third-party exporter plugin in one file, for tests: a `plugin` bundle that carries the
checkpoint's own weight files (the shared builder adds config, tower config and tokenizer), loaded
back by checkpoint_bundle_runtime.py.

Installed by the tests through the `medmoe_edge.exporters` entry-point group, exactly as a
separate package would be, and uses only the public exporter interface.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from medmoe_edge.bundle import GraphSpec, TensorGroup
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.ckpt_writer import TOWER_DIRNAME
from medmoe_edge.exporter import Exporter, ExportParts, ExportRequest
from medmoe_edge.tensor_ids import checkpoint_map, released_state_dict
from medmoe_edge.verify import Tolerances
from medmoe_edge.vocab import ArtifactKind, Precision
from medmoe_edge.weights import weight_files


class CheckpointBundleExporter(Exporter):
    name = "ckpt-bundle"
    artifact_kind = ArtifactKind.PLUGIN
    description = "test plugin: the checkpoint's weight files in a verified bundle"
    precisions = (Precision.FP32,)
    default_precision = Precision.FP32
    runtime = "ckpt-bundle"
    tolerances = Tolerances(logits_max_abs=0.0, logits_cosine_min=1.0, token_agreement_min=1.0, routing_agreement_min=1.0, answer_agreement_min=1.0)  # the same weights, the same code

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, "copies files"

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        roles = {}
        (out / TOWER_DIRNAME).mkdir(exist_ok=True)
        for src, dest in [(f, f.name) for f in weight_files(loaded.checkpoint_dir)] + [(f, f"{TOWER_DIRNAME}/{f.name}") for f in weight_files(loaded.tower_dir)]:
            shutil.copyfile(src, out / dest)
            roles[dest] = "weights"
        index = loaded.checkpoint_dir / "model.safetensors.index.json"
        if index.is_file():
            shutil.copyfile(index, out / index.name)
            roles[index.name] = "weights"
        state = released_state_dict(loaded.model)
        sizes = checkpoint_map(state, loaded.spec).group_sizes({k: v.numel() for k, v in state.items()})
        groups = tuple(TensorGroup(str(g), Precision.FP32, n) for g, n in sizes.items())
        return ExportParts(roles=roles, graphs={"checkpoint": GraphSpec("config.json", (), ())}, tensor_groups=groups)
