"""The whole reference model: vision tower → projector → `<image>` splicing → decoder → lm_head (§1, §5.3).

`MedMoE` holds two parameter trees that come from two places, as in the official
loader (§4.2.7): `lm` (the checkpoint: `model.*`, `lm_head.*`) and `vision` (the
separate HF CLIP directory named by `mm_image_tower`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..spec import ModelSpec
from .kvcache import KVCache
from .linear import Linear
from .moe import Routing
from .text import TextModel
from .vision import VisionTower

IMAGE_TOKEN_INDEX = -200  # placeholder id in tokenised prompts (§5.3, constants.py L9)


class Projector(nn.Module):
    """`mlp2x_gelu`: Linear(C→H) → exact erf GELU → Linear(H→H) (§1.2); keys `image_spatial_proj.{0,2}`."""

    def __init__(self, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        self.image_spatial_proj = nn.Sequential(Linear(mm_hidden, hidden), nn.GELU(), Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_spatial_proj(x)


class LlavaTextModel(TextModel):
    """`model.*`: the decoder plus `mm_projector`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.text, spec.moe)
        self.mm_projector = Projector(spec.mm_hidden_size, spec.text.hidden_size)


class MedMoELM(nn.Module):
    """The checkpoint's parameter tree: `model.*` and `lm_head.weight` (no bias, §1.3)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.model = LlavaTextModel(spec)
        self.lm_head = Linear(spec.text.hidden_size, spec.text.vocab_size, bias=False)


@dataclass
class Batch:
    """Right-padded multimodal prompts ready for prefill (§5.3).

    Attributes:
        embeds: [B, L, H] spliced text+image embeddings, zero rows on padding.
        mask: [B, L] int64, 1 on real rows.
        positions: [B, L] int64, contiguous 0..len-1 per row over the spliced sequence.
        lengths: real length of each row.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    lengths: list[int]


def pad_batch(rows: Sequence[torch.Tensor], hidden: int, *, dtype: torch.dtype, device: torch.device | str) -> Batch:
    """Right-pad spliced rows [L_b, H] into a `Batch` (shared by every runtime that splices itself)."""
    lengths = [r.shape[0] for r in rows]
    b, L = len(rows), max(lengths)
    embeds = torch.zeros(b, L, hidden, dtype=dtype, device=device)
    mask = torch.zeros(b, L, dtype=torch.int64, device=device)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return Batch(embeds, mask, positions, lengths)


class MedMoE(nn.Module):
    """Reference Med-MoE for inference. Build with `medmoe_edge.checkpoint.load_model`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.lm = MedMoELM(spec)
        self.vision = VisionTower(spec.vision)
        self.n_vocab = spec.text.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the decoder computes in: its norms'. Matrices may be stored narrower
        (`checkpoint.load_model(keep_stored=True)`, `linear.Linear`)."""
        return self.lm.model.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.model.final_norm.weight.device  # never quantized (the lm_head's may be a deferred weight)

    def truncate_vocab(self, n: int) -> None:
        """Keep the first `n` embedding / lm_head rows, as the official loader's
        `resize_token_embeddings(len(tokenizer))` does (§4.2.6)."""
        if n > self.n_vocab:
            raise ValueError(f"cannot grow the vocabulary from {self.n_vocab} to {n}")
        emb, head = self.lm.model.embed_tokens, self.lm.lm_head
        emb.weight = nn.Parameter(emb.weight.data[:n].clone(), requires_grad=False)
        emb.num_embeddings = n
        head.weight = nn.Parameter(head.weight.data[:n].clone(), requires_grad=False)
        head.out_features = n
        self.n_vocab = n

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, S, S] → projected image rows [N, P, H] in the model dtype."""
        feats = self.vision(pixels.to(self.device, self.vision.vision_model.pre_layrnorm.weight.dtype))
        return self.lm.model.mm_projector(feats.to(self.dtype))

    @torch.inference_mode()
    def splice(self, ids: Sequence[int], image_rows: torch.Tensor) -> torch.Tensor:
        """Embed `ids` and replace each IMAGE_TOKEN_INDEX by the next image's rows.

        Args:
            ids: prompt token ids with IMAGE_TOKEN_INDEX placeholders, inside the vocabulary.
            image_rows: [N_images, P, H], one entry per placeholder in order.
        Returns:
            [L, H] with L = text tokens + N_images·P.

        The inputs are the runtime contract's to check (`Runtime.check_requests`), before this runs.
        """
        embed = self.lm.model.embed_tokens
        parts, text, img = [], [], 0
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                if text:
                    parts.append(embed(torch.tensor(text, device=self.device)).to(self.dtype))
                    text = []
                parts.append(image_rows[img].to(self.dtype))
                img += 1
            else:
                text.append(i)
        if text:
            parts.append(embed(torch.tensor(text, device=self.device)).to(self.dtype))
        return torch.cat(parts, dim=0)

    def make_batch(self, rows: Sequence[torch.Tensor]) -> Batch:
        """Right-pad spliced rows [L_b, H] into a `Batch`."""
        return pad_batch(rows, self.spec.text.hidden_size, dtype=self.dtype, device=self.device)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.spec.text
        return KVCache(t.num_layers, batch, t.num_kv_heads, max_len, t.head_dim, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward_embeds(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, dict[int, Routing]]:
        """Decoder + lm_head on new rows. Returns (fp32 logits [B, T, V], routing per MoE layer)."""
        h, routing = self.lm.model(embeds, positions, mask, cache)
        return self.lm.lm_head(h).float(), routing

    @torch.inference_mode()
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(token_ids.to(self.device)).to(self.dtype)
