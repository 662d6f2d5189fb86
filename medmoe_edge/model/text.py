"""The language decoder of both variants (§1.3, §1.4) with MoE FFNs on `moe.layers` (§2.1).

Shapes use B = batch, T = new tokens, S = cached + new slots, H = hidden, D = head dim.

Module and parameter names are the released state-dict keys (§2.6), so a checkpoint
loads with a strict `load_state_dict` after stripping the `model.` prefix rules in
`medmoe_edge.checkpoint`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..spec import MoESpec, TextSpec, Variant
from .ffn import make_ffn
from .kvcache import KVCache
from .linear import Linear
from .moe import MoEFFN, Routing


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, rotary_dim] in fp32 for NeoX rotate-half RoPE (HF Phi / StableLM-epoch)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=position_ids.device) / rotary_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of each head (pairs i, i+rot/2); pass the rest through (§1.3)."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    # HF casts the cached cos/sin to the activation dtype before multiplying.
    xr = xr * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat([xr, xp], dim=-1)


def attention_bias(attention_mask: torch.Tensor, start: int, t: int) -> torch.Tensor:
    """Additive fp32 bias [B, 1, T, S]: causal over cache slots and zero-weight on padding.

    A finite minimum instead of -inf keeps fully masked rows (padding queries) finite:
    NaN there would leak into real tokens through 0·NaN in the value product.
    """
    s = attention_mask.shape[1]
    q_idx = torch.arange(start, start + t, device=attention_mask.device)[:, None]
    k_idx = torch.arange(s, device=attention_mask.device)[None, :]
    allowed = (k_idx <= q_idx)[None] & attention_mask[:, None, :].bool()  # [B, T, S]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


class Attention(nn.Module):
    """Multi-head causal self-attention with partial RoPE and q/k/v biases (both variants)."""

    def __init__(self, text: TextSpec) -> None:
        super().__init__()
        self.text = text
        h, d = text.hidden_size, text.head_dim
        self.q_proj = Linear(h, text.num_heads * d, bias=True)
        self.k_proj = Linear(h, text.num_kv_heads * d, bias=True)
        self.v_proj = Linear(h, text.num_kv_heads * d, bias=True)
        # Phi: `dense` with bias; StableLM: `o_proj` without bias (§2.6).
        out = Linear(text.num_heads * d, h, bias=text.variant is Variant.PHI)
        setattr(self, "dense" if text.variant is Variant.PHI else "o_proj", out)

    @property
    def out_proj(self) -> nn.Linear:
        return self.dense if self.text.variant is Variant.PHI else self.o_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        n, nkv, d = self.text.num_heads, self.text.num_kv_heads, self.text.head_dim
        q = self.q_proj(x).view(b, t, n, d).transpose(1, 2)  # [B, n, T, D]
        k = self.k_proj(x).view(b, t, nkv, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, nkv, d).transpose(1, 2)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, nkv, S, D]
        if nkv != n:
            k, v = k.repeat_interleave(n // nkv, dim=1), v.repeat_interleave(n // nkv, dim=1)
        if self.text.variant is Variant.PHI:
            # Phi upcasts q and k to fp32 for the scores (phi-2 overflows in fp16), §1.3 / §7.13.
            scores = torch.matmul(q.float(), k.float().transpose(2, 3)) / math.sqrt(d)
        else:
            scores = (torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)).float()
        probs = (scores + bias).softmax(dim=-1).to(v.dtype)  # softmax in fp32 for both
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, n * d)
        return self.out_proj(out)


class DecoderLayer(nn.Module):
    """One decoder layer; the FFN (`mlp`) is dense or an `MoEFFN`."""

    def __init__(self, text: TextSpec, moe: MoESpec | None) -> None:
        super().__init__()
        self.variant = text.variant
        self.input_layernorm = nn.LayerNorm(text.hidden_size, eps=text.norm_eps)
        if text.variant is Variant.STABLELM:
            self.post_attention_layernorm = nn.LayerNorm(text.hidden_size, eps=text.norm_eps)
        self.self_attn = Attention(text)
        self.mlp = MoEFFN(text, moe) if moe is not None else make_ffn(text)

    def _ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        if isinstance(self.mlp, MoEFFN):
            return self.mlp(x)
        return self.mlp(x), None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, cache: KVCache | None, layer: int) -> tuple[torch.Tensor, Routing | None]:
        if self.variant is Variant.PHI:
            # Parallel block: one LayerNorm feeds attention and FFN, h' = h + Attn(LN h) + FFN(LN h).
            x = self.input_layernorm(h)
            ffn, r = self._ffn(x)
            return h + self.self_attn(x, cos, sin, bias, cache, layer) + ffn, r
        # Sequential block: h1 = h + Attn(LN1 h); h' = h1 + FFN(LN2 h1).
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, bias, cache, layer)
        ffn, r = self._ffn(self.post_attention_layernorm(h))
        return h + ffn, r


class TextModel(nn.Module):
    """`model.*` of the checkpoint minus the projector: embeddings, layers, final norm."""

    def __init__(self, text: TextSpec, moe: MoESpec) -> None:
        super().__init__()
        self.text = text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        moe_layers = set(moe.layers)
        self.layers = nn.ModuleList(DecoderLayer(text, moe if i in moe_layers else None) for i in range(text.num_layers))
        norm = nn.LayerNorm(text.hidden_size, eps=text.norm_eps)
        setattr(self, "final_layernorm" if text.variant is Variant.PHI else "norm", norm)

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.final_layernorm if self.text.variant is Variant.PHI else self.norm

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
        *,
        from_layer: int = 0,
        to_layer: int | None = None,
        layer_inputs: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[int, Routing]]:
        """Run the decoder on new rows.

        Args:
            inputs_embeds: [B, T, H] embeddings of the new tokens (text and spliced image rows),
                or with `from_layer` > 0 the hidden states entering that layer.
            position_ids: [B, T] RoPE positions (contiguous over the spliced sequence, §5.3).
            attention_mask: [B, S] 1 for real slots, 0 for padding, covering cached + new slots.
            cache: KV cache to read and extend, or None for a single full pass.
            from_layer: the first layer to run (sensitivity probes of a layer reuse the unchanged
                layers below it; `num_layers` runs only the final norm). Needs cache None.
            to_layer: stop before this layer (`num_layers`: after the last) and return the
                hidden states entering it, without the final norm (calibration passes that hold a
                few layers' statistics at a time resume there). None: run to the end and the final
                norm. Needs cache None.
            layer_inputs: filled with the hidden states entering each layer that runs, then with
                the last layer's output (what the final norm reads: `from_layer=num_layers`).
        Returns:
            (final hidden states [B, T, H], {layer index: Routing} for the MoE layers that ran);
            with `to_layer`, the hidden states entering that layer instead of the final ones.
        """
        if (from_layer or to_layer is not None) and cache is not None:
            raise ValueError("from_layer and to_layer need a full pass without a KV cache")
        start = cache.length if cache is not None else 0
        t = inputs_embeds.shape[1]
        if attention_mask.shape[1] != start + t:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} slots, expected {start + t}")
        cos, sin = rotary_cos_sin(position_ids, self.text.rotary_dim, self.text.rope_theta)
        bias = attention_bias(attention_mask, start, t)
        h = inputs_embeds
        routing: dict[int, Routing] = {}
        stop = len(self.layers) if to_layer is None else to_layer
        for i in range(from_layer, stop):
            if layer_inputs is not None:
                layer_inputs.append(h)
            h, r = self.layers[i](h, cos, sin, bias, cache, i)
            if r is not None:
                routing[i] = r
        if to_layer is not None:
            return h, routing
        if layer_inputs is not None:
            layer_inputs.append(h)
        if cache is not None:
            cache.advance(t)
        return self.final_norm(h), routing
