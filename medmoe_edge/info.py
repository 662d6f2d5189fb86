"""`medmoe-edge info`: what a checkpoint is, counted from tensor headers without loading weights (§6)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import canonical_tower_name, detect_generation, read_json, resolve_model_dir, resolve_tower_dir, tower_tensor_used
from .errors import CheckpointError
from .hfconfig import moe_spec_from_config, text_spec_from_config, vision_spec_from_config
from .spec import MoESpec, TextSpec
from .weights import TensorInfo, tensor_infos, weight_files

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts in the §6 accounting.

    Attributes:
        llm_total: every language-model tensor (embeddings, layers with all experts, meta, gates, lm_head).
        llm_activated: per token: llm_total minus the routed experts a token does not use (E - k per MoE layer).
        projector: mm_projector parameters.
        vision_total / vision_used: CLIP tower, all of it / the layers up to the selected one.
    """

    llm_total: int
    llm_activated: int
    projector: int
    vision_total: int | None
    vision_used: int | None


@dataclass(frozen=True)
class CheckpointInfo:
    directory: Path
    config: dict
    text: TextSpec
    moe: MoESpec
    generation: str
    counts: ParamCounts
    dtypes: dict[str, int]  # dtype → tensor count
    files: list[tuple[str, int]]  # (relative name, bytes)
    tower_dir: Path | None
    tower_error: str | None
    ignored_vision_tensors: int

    def to_json(self) -> dict:
        t, m, c = self.text, self.moe, self.counts
        return {
            "directory": str(self.directory),
            "variant": t.variant.value,
            "model_type": self.config.get("model_type"),
            "generation": self.generation,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "layers": t.num_layers,
            "heads": t.num_heads,
            "head_dim": t.head_dim,
            "rotary_dim": t.rotary_dim,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "moe": {"layers": list(m.layers), "experts": m.num_experts, "top_k": m.top_k, "meta_expert": True, "use_residual": m.use_residual},
            "parameters": {
                "llm_total": c.llm_total,
                "llm_activated_per_token": c.llm_activated,
                "projector": c.projector,
                "vision_total": c.vision_total,
                "vision_used": c.vision_used,
            },
            "dtypes": self.dtypes,
            "files": [{"name": n, "bytes": b} for n, b in self.files],
            "vision_tower": str(self.tower_dir) if self.tower_dir else None,
            "vision_tower_error": self.tower_error,
            "ignored_vision_tensors_in_checkpoint": self.ignored_vision_tensors,
        }


def count_params(infos: list[TensorInfo], moe: MoESpec) -> tuple[int, int, int]:
    """(llm_total, llm_activated, projector) from tensor shapes.

    Activated = total minus, in each MoE layer, the (E - k) routed experts a token skips;
    the meta expert and the gate always run (§6). Expert sizes are measured from the tensors.
    """
    total = projector = 0
    expert_params: Counter[tuple[int, int]] = Counter()
    for t in infos:
        if t.name.startswith(("model.image_tower.", "model.vision_tower.")):
            continue
        if t.name.startswith("model.mm_projector."):
            projector += t.numel
            continue
        total += t.numel
        m = _EXPERT.match(t.name)
        if m:
            expert_params[(int(m.group(1)), int(m.group(2)))] += t.numel
    skipped = 0
    for layer in moe.layers:
        sizes = sorted((n for (li, _), n in expert_params.items() if li == layer), reverse=True)
        skipped += sum(sizes[moe.top_k :])
    return total, total - skipped, projector


def checkpoint_info(model: str | Path, vision_tower: str | Path | None = None) -> CheckpointInfo:
    """Describe a checkpoint from config.json and tensor headers (no weights are loaded for safetensors).

    Raises:
        CheckpointError: unreadable config or weights.
    """
    directory = resolve_model_dir(model)
    cfg = read_json(directory / "config.json", "a Med-MoE checkpoint directory needs config.json")
    try:
        text, moe = text_spec_from_config(cfg), moe_spec_from_config(cfg)
    except Exception as e:  # ConfigError → CheckpointError with the directory
        raise CheckpointError(f"{directory}: {e}") from None
    files = weight_files(directory)
    infos = tensor_infos(files)
    generation = detect_generation([t.name for t in infos]).value
    total, activated, projector = count_params(infos, moe)
    tower_dir: Path | None = None
    tower_error = None
    v_total = v_used = None
    try:
        tower_dir = resolve_tower_dir(str(cfg.get("mm_image_tower") or ""), directory, vision_tower)
        vspec = vision_spec_from_config(read_json(tower_dir / "config.json", "HF CLIP config"), select_layer=int(cfg.get("mm_vision_select_layer", -2)))
        vinfos = [(canon, t.numel) for t in tensor_infos(weight_files(tower_dir)) if (canon := canonical_tower_name(t.name))]
        v_total = sum(n for _, n in vinfos)
        v_used = sum(n for canon, n in vinfos if tower_tensor_used(canon, vspec.layers_used))
    except CheckpointError as e:
        tower_error = str(e)
    names = {f.name for f in files}
    extra = [p for p in sorted(directory.iterdir()) if p.is_file() and p.name not in names]
    listed = [(f.name, f.stat().st_size) for f in files] + [(p.name, p.stat().st_size) for p in extra]
    return CheckpointInfo(
        directory=directory,
        config=cfg,
        text=text,
        moe=moe,
        generation=generation,
        counts=ParamCounts(total, activated, projector, v_total, v_used),
        dtypes=dict(Counter(t.dtype for t in infos)),
        files=listed,
        tower_dir=tower_dir,
        tower_error=tower_error,
        ignored_vision_tensors=sum(1 for t in infos if t.name.startswith(("model.image_tower.", "model.vision_tower."))),
    )
