"""Seeded tiny reference models built directly from presets (no files)."""

from __future__ import annotations

from dataclasses import replace

import torch

from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.presets import PRESETS, Preset
from medmoe_edge.spec import MoESpec


def tiny_model(preset: Preset, moe: MoESpec | None = None, seed: int = 0) -> MedMoE:
    spec = PRESETS[preset] if moe is None else replace(PRESETS[preset], moe=moe)
    torch.manual_seed(seed)
    m = MedMoE(spec).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "gate.wg" in name:  # spread routing over all experts
                p.normal_(0, spec.text.hidden_size**-0.5 if name.endswith("weight") else 0.5)
            elif "norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
    return m
