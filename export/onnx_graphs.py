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
straight from the runtime's *preallocated* buffer of C slots, without slicing or
concatenating it (each would copy the whole cache every step; measured 15 % of a decode
step at 650 positions): attention scores are computed against all C buffer slots, where
slots at or after S-T are masked, and separately against the T new keys; one softmax
runs over both parts (`attention_past_and_new`). The runtime writes the T new rows into
its buffer after the pass.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.model.moe import Dispatch, MoEFFN
from medmoe_edge.model.text import Attention, apply_partial_rotary
from medmoe_edge.spec import Variant


class GraphCache:
    """The KV cache seen while tracing: past buffers are graph inputs, new rows are graph outputs.

    `length` and `advance` are the interface `TextModel.forward` uses; attention goes
    through `attention_past_and_new` (installed by `use_buffer_attention`), which reads
    `past` and records this pass's keys/values in `new`.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], past_len: torch.Tensor | int) -> None:
        self.past = past
        self.length = past_len
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def split_bias(self, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's additive mask [B,1,T,S] as (past part padded to the C buffer slots, new part [B,1,T,T]).

        Computed once per pass (every layer shares it); padded slots get the same finite
        minimum the reference uses, so their softmax weight is exactly 0.
        """
        if self._bias is None:
            capacity = self.past[0][0].shape[2]
            past = bias[..., : self.length]
            pad = torch.full_like(bias[..., :1], torch.finfo(torch.float32).min).expand(-1, -1, -1, capacity - self.length)
            self._bias = (torch.cat([past, pad], dim=-1), bias[..., self.length :])
        return self._bias

    def advance(self, n: int) -> None:
        """Nothing to do: the runtime writes the new rows into its buffer."""


def attention_past_and_new(self: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, cache: GraphCache, layer: int) -> torch.Tensor:
    """`Attention.forward` for export: the same math with the past read in place from the buffer.

    softmax([q·K_bufᵀ + mask_past, q·k_newᵀ + mask_new]) · [V_buf; v_new] equals the
    reference's softmax(q·[K_past; k_new]ᵀ + mask) · [V_past; v_new]: buffer slots past the
    filled prefix get weight 0. Grouped-query heads are handled by grouping the queries,
    so K/V are never repeated (copied) either.
    """
    t_ = self.text
    b, t, _ = x.shape
    n, nkv, d = t_.num_heads, t_.num_kv_heads, t_.head_dim
    g = n // nkv
    q = self.q_proj(x).view(b, t, n, d).transpose(1, 2)
    k = self.k_proj(x).view(b, t, nkv, d).transpose(1, 2)
    v = self.v_proj(x).view(b, t, nkv, d).transpose(1, 2)
    q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
    cache.new.append((k, v))
    kb, vb = cache.past[layer]
    bias_past, bias_new = cache.split_bias(bias)
    qg = q.reshape(b, nkv, g * t, d)  # head h uses kv head h // g, as repeat_interleave in the reference

    def scores(keys: torch.Tensor) -> torch.Tensor:
        if t_.variant is Variant.PHI:  # fp32 scores (§1.3, §7.13), as the reference
            s = torch.matmul(qg.float(), keys.float().transpose(2, 3)) / math.sqrt(d)
        else:
            s = (torch.matmul(qg, keys.transpose(2, 3)) / math.sqrt(d)).float()
        return s.reshape(b, n, t, keys.shape[2])

    probs = torch.cat([scores(kb) + bias_past, scores(k) + bias_new], dim=-1).softmax(dim=-1).to(v.dtype)
    capacity = kb.shape[2]
    p_past = probs[..., :capacity].reshape(b, nkv, g * t, capacity)
    p_new = probs[..., capacity:].reshape(b, nkv, g * t, t)
    out = (torch.matmul(p_past, vb) + torch.matmul(p_new, v)).reshape(b, n, t, d)
    return self.out_proj(out.transpose(1, 2).reshape(b, t, n * d))


def use_buffer_attention(model: MedMoE) -> None:
    """Route every decoder layer's attention through `attention_past_and_new` (export only)."""
    for layer in model.lm.model.layers:
        layer.self_attn.forward = types.MethodType(attention_past_and_new, layer.self_attn)


def use_dispatch(model: MedMoE, dispatch: Dispatch) -> None:
    """Switch every MoE block to a traceable dispatch (same results as the eager one)."""
    for layer in model.lm.model.layers:
        if isinstance(layer.mlp, MoEFFN):
            layer.mlp.dispatch = dispatch


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
