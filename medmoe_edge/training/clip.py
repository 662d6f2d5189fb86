"""CLIP-style contrastive pretraining of the demo's small vision tower.

The released models use OpenAI's CLIP ViT-L/14-336 unchanged (§1.1). The demo trains
its own small ViT the same way CLIP was trained: image and caption embeddings pulled
together by a symmetric InfoNCE loss. The text side is a deliberately tiny encoder
(mean of word embeddings + MLP), which is all template captions need; it is thrown
away afterwards. Captions repeat across images (same findings), so the targets are
soft: every image in the batch with the same caption is a positive.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from medmoe_edge.model.vision import VisionTower
from medmoe_edge.spec import VisionSpec


@dataclass(frozen=True)
class ClipConfig:
    steps: int = 600
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 30
    embed_dim: int = 128


class _CaptionEncoder(nn.Module):
    def __init__(self, vocab: dict[str, int], dim: int, out: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.EmbeddingBag(len(vocab) + 1, dim, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))

    def ids(self, text: str) -> list[int]:
        return [self.vocab.get(w, len(self.vocab)) for w in re.findall(r"[a-z0-9-]+", text.lower())]

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [self.ids(t) for t in texts]
        flat = torch.tensor([i for x in ids for i in x])
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        return self.mlp(self.emb(flat, offsets))


class ClipTrainer(nn.Module):
    """Full tower (every layer + post_layernorm + projection) and the caption encoder."""

    def __init__(self, vision: VisionSpec, captions: list[str], cfg: ClipConfig) -> None:
        super().__init__()
        self.tower = VisionTower(replace(vision, select_layer=vision.num_layers))  # all layers
        self.post_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.visual_projection = nn.Linear(vision.hidden_size, cfg.embed_dim, bias=False)
        words = sorted({w for c in captions for w in re.findall(r"[a-z0-9-]+", c.lower())})
        self.text = _CaptionEncoder({w: i for i, w in enumerate(words)}, 128, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        vm = self.tower.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        for layer in vm.encoder.layers:
            h = layer(h)
        return self.visual_projection(self.post_layernorm(h[:, 0]))  # CLS, as CLIP

    def loss(self, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        img = nn.functional.normalize(self.image_embed(pixels), dim=-1)
        txt = nn.functional.normalize(self.text(captions), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(-1, keepdim=True)
        return 0.5 * (torch.sum(-target * logits.log_softmax(-1), -1).mean() + torch.sum(-target * logits.T.log_softmax(-1), -1).mean())

    def tower_state(self) -> dict[str, torch.Tensor]:
        """Weights as an HF CLIPVisionModel state dict (`vision_model.*`, incl. post_layernorm)."""
        sd = {k: v.detach().clone() for k, v in self.tower.state_dict().items()}
        sd.update({f"vision_model.post_layernorm.{k}": v.detach().clone() for k, v in self.post_layernorm.state_dict().items()})
        return sd


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_clip(vision: VisionSpec, pixels: torch.Tensor, captions: list[str], cfg: ClipConfig, gen: torch.Generator, log) -> tuple[dict[str, torch.Tensor], float]:
    """Train the tower; returns (HF CLIPVisionModel state dict, final loss)."""
    model = ClipTrainer(vision, captions, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    n = pixels.shape[0]
    loss_ema = None
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr)
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        x = pixels[idx]
        # Light augmentation: small intensity jitter (no flips: left/right is a label).
        x = x * (1 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5))
        loss = model.loss(x, [captions[i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"clip step {step:4d}/{cfg.steps} loss {loss_ema:.3f}")
    return model.tower_state(), float(loss_ema or 0.0)
