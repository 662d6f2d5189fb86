"""Traceable wrappers around the reference model: the three graphs of an ONNX bundle.

The wrappers *reuse the reference modules* (same weights, same code paths) so the
exported math is the reference math; only the KV cache is swapped for one whose
state is graph inputs and outputs, and the MoE uses its fixed-trip-count dispatch
(`MoEFFN._dispatch_static`: NonZero + Gather + ScatterND per expert, expert-sparse).

Graphs (B = batch, T = new positions, S = past + new positions, C = KV capacity):

    vision   pixel_values [N,3,size,size] f32 → image_embeds [N,P,H]
    embed    input_ids [N] i64 → embeds [N,H]
    decoder  inputs_embeds [B,T,H], attention_mask [B,S] i64, position_ids [B,T] i64,
             last_index [B] i64, past_key_{l}/past_value_{l} [B,kv,C,D] (C ≥ S-T)
           → logits [B,V] f32 (row `last_index` of each sequence),
             experts_{m} [B,T,k] i64 and router_probs_{m} [B,T,E] f32 per MoE layer m,
             new_key_{l}/new_value_{l} [B,kv,T,D] (this pass's keys/values)

One decoder graph serves prefill (T = prompt) and decode (T = 1). The past is read
from a *preallocated* buffer: the graph slices the first S-T slots, so the runtime
keeps one buffer per layer for the whole generation and only writes the T new rows.
"""

from __future__ import annotations

import torch
from torch import nn

from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.model.moe import MoEFFN


class GraphCache:
    """The KV cache seen while tracing: past buffers are graph inputs, new rows are graph outputs.

    It implements the interface `medmoe_edge.model.text` uses (`length`, `update`, `advance`).
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], past_len: torch.Tensor | int) -> None:
        self.past = past
        self.length = past_len
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.past[layer]
        self.new.append((k, v))
        return torch.cat([pk[:, :, : self.length], k], dim=2), torch.cat([pv[:, :, : self.length], v], dim=2)

    def advance(self, n: int) -> None:
        """Nothing to do: the runtime writes the new rows into its buffer."""


def use_static_dispatch(model: MedMoE) -> None:
    """Switch every MoE block to the traceable dispatch (same results as the eager one)."""
    for layer in model.lm.model.layers:
        if isinstance(layer.mlp, MoEFFN):
            layer.mlp.static_dispatch = True


class VisionGraph(nn.Module):
    """Pixels → projected image rows (CLIP tower, select layer, CLS dropped, `mlp2x_gelu`)."""

    def __init__(self, model: MedMoE) -> None:
        super().__init__()
        self.vision = model.vision
        self.projector = model.lm.model.mm_projector
        self.dtype = model.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vision(pixel_values.to(self.dtype))
        return self.projector(feats.to(self.dtype))


class EmbedGraph(nn.Module):
    """Token ids → embedding rows."""

    def __init__(self, model: MedMoE) -> None:
        super().__init__()
        self.embed_tokens = model.lm.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderGraph(nn.Module):
    """Decoder + lm_head on new rows with an external KV cache (see the module docstring)."""

    def __init__(self, model: MedMoE) -> None:
        super().__init__()
        self.text = model.lm.model
        self.lm_head = model.lm.lm_head
        self.n_layers = model.spec.text.num_layers
        self.moe_layers = tuple(sorted(model.spec.moe.layers))

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, last_index: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, t = inputs_embeds.shape[0], inputs_embeds.shape[1]
        cache = GraphCache([(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)], attention_mask.shape[1] - t)
        h, routing = self.text(inputs_embeds, position_ids, attention_mask, cache)
        rows = torch.arange(b, device=h.device)
        logits = self.lm_head(h[rows, last_index]).float()
        outs: list[torch.Tensor] = [logits]
        for m in self.moe_layers:
            r = routing[m]
            outs += [r.experts.reshape(b, t, r.experts.shape[-1]), r.probs.reshape(b, t, r.probs.shape[-1])]
        for k, v in cache.new:
            outs += [k, v]
        return tuple(outs)


def decoder_io_names(n_layers: int, moe_layers: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph, in argument / output order."""
    inputs = ["inputs_embeds", "attention_mask", "position_ids", "last_index"]
    for i in range(n_layers):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
    outputs = ["logits"]
    for m in moe_layers:
        outputs += [f"experts_{m}", f"router_probs_{m}"]
    for i in range(n_layers):
        outputs += [f"new_key_{i}", f"new_value_{i}"]
    return inputs, outputs
