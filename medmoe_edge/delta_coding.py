"""Routed experts stored as deltas from their meta expert, in the model the exporters trace.

A routed expert's input projections (Phi: fc1; StableLM: gate and up) may be stored as codes of
D = W_e − Ŵ_meta, computed as the meta expert's pre-activation (computed for every token anyway)
plus x·D̂ᵀ (`MoEFFN.delta_experts`, `model.ffn`). Which experts, and their codes
(`quantizer.DeltaQTensor`), are chosen by `calibration.delta`; this module only lays them into a
model, so both the exporters and the chooser use one definition of the keys.
"""

from __future__ import annotations

import torch

from .checkpoint import LoadedModel
from .model.ffn import INPUT_PROJECTIONS
from .model.moe import MoEFFN
from .quantizer import DeltaQTensor, QTensor

EXPERT_KEY = "model.layers.{l}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{p}.weight"
META_KEY = "model.layers.{l}.mlp.meta_moe.{p}.weight"


def expert_inputs(loaded: LoadedModel) -> list[tuple[int, int, list[tuple[str, str]]]]:
    """(layer, expert, [(expert projection key, meta projection key)]) of every routed expert."""
    projs = INPUT_PROJECTIONS[loaded.spec.text.variant]
    out = []
    for layer, block in enumerate(loaded.model.lm.model.layers):
        if isinstance(block.mlp, MoEFFN):
            for e in range(len(block.mlp.experts)):
                out.append((layer, e, [(EXPERT_KEY.format(l=layer, e=e, p=p), META_KEY.format(l=layer, p=p)) for p in projs]))
    return out


def to_delta_model(loaded: LoadedModel, codes: dict[str, QTensor]) -> set[tuple[int, int]]:
    """Put the delta-coded experts of `codes` into the model as the exporters trace it: each such
    projection's weight becomes W_e − base (bit for bit the D its codes were made from) and its
    bias b_e − b_meta, and the layer's `MoEFFN.delta_experts` names the expert, so the expert adds
    the meta expert's pre-activation (`model.ffn`). Returns the (layer, expert) converted.

    The model then computes what it computed before (up to float rounding) with other weights:
    use it for export, not as the reference."""
    done: set[tuple[int, int]] = set()
    layers = loaded.model.lm.model.layers
    params = dict(loaded.model.lm.named_parameters())
    with torch.no_grad():
        for layer, e, pairs in expert_inputs(loaded):
            if not any(isinstance(codes.get(k), DeltaQTensor) for k, _m in pairs):
                continue
            if not all(isinstance(codes.get(k), DeltaQTensor) for k, _m in pairs):
                raise ValueError(f"layer {layer} expert {e}: every input projection or none is a delta")
            for k, m in pairs:
                q = codes[k]
                assert isinstance(q, DeltaQTensor)
                w = params[k]
                d = w.to(torch.float32) - q.base
                if w.dtype == loaded.model.dtype:
                    w.copy_(d.to(w.dtype))
                else:  # a matrix kept as stored (bf16) in an fp32 model: D itself, not D rounded to bf16
                    owner, _, attr = k.rpartition(".")
                    setattr(loaded.model.lm.get_submodule(owner), attr, torch.nn.Parameter(d.to(loaded.model.dtype), requires_grad=False))
                bias_key, meta_bias = k.replace(".weight", ".bias"), m.replace(".weight", ".bias")
                if bias_key in params:  # Phi's fc1 has one, StableLM's gate/up do not
                    params[bias_key].copy_(params[bias_key] - params[meta_bias])
            mlp = layers[layer].mlp
            mlp.delta_experts = mlp.delta_experts | {e}
            done.add((layer, e))
    return done


__all__ = ["EXPERT_KEY", "META_KEY", "expert_inputs", "to_delta_model"]
