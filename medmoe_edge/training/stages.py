"""The language-side training stages of the Med-MoE recipe, in miniature (§2.5, §3.4, §3.6).

* stage 0 (ours): base-LM pretraining on the training text, standing in for phi-2's
  pretraining, which a model trained from scratch does not have;
* stage 1: alignment, projector only (LLM and tower frozen), on image → caption;
* stage 2: dense instruction tuning, projector + LLM, on the VQA conversations;
* router: a linear domain classifier on the dense model's layer- and token-averaged
  hidden states (§3.4), which becomes every MoE layer's frozen gate;
* stage 3: MoE tuning: experts and meta expert copied from the dense FFN (§2.5), gate
  from the router and frozen, experts + meta + projector trained (§3.6.4).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.model.moe import MoEFFN
from medmoe_edge.model.text import attention_bias, rotary_cos_sin
from medmoe_edge.spec import MoESpec

from .clip import cosine_lr
from .data import IGNORE, Batch, ConversationEncoder, Encoded, collate


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one stage."""

    steps: int
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20
    max_turns: int = 6  # QA turns per conversation
    max_len: int = 192  # suffix tokens after the image


def multimodal_loss(m: MedMoE, feats: torch.Tensor, batch: Batch, prefix: torch.Tensor) -> torch.Tensor:
    """Next-token loss on the suffix of `[prefix | image rows | suffix]` (labels only on answers)."""
    lm = m.lm.model
    b = batch.suffix.shape[0]
    pre = lm.embed_tokens(prefix)[None].expand(b, -1, -1)
    img = lm.mm_projector(feats[batch.image_index])
    suf = lm.embed_tokens(batch.suffix)
    embeds = torch.cat([pre, img, suf], dim=1)
    start = pre.shape[1] + img.shape[1]
    mask = torch.cat([torch.ones(b, start, dtype=torch.int64), batch.suffix_mask], dim=1)
    positions = torch.arange(embeds.shape[1]).expand(b, -1)
    h, _ = lm(embeds, positions, mask, None)
    t = batch.suffix.shape[1]
    logits = m.lm.lm_head(h[:, start - 1 : start - 1 + t])  # position j predicts token j+1
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE)


def text_loss(m: MedMoE, batch: Batch) -> torch.Tensor:
    """Plain language-model loss on text-only rows (stage 0)."""
    lm = m.lm.model
    ids, mask = batch.suffix, batch.suffix_mask
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    h, _ = lm(lm.embed_tokens(ids), positions, mask, None)
    logits = m.lm.lm_head(h[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def run_stage(name: str, params: list[nn.Parameter], cfg: StageConfig, step_loss: Callable[[int], torch.Tensor], log: Callable[[str], None]) -> float:
    """AdamW with warmup + cosine decay; returns the smoothed final loss."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # Table 11: wd 0
    ema = None
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr)
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"{name} step {step:4d}/{cfg.steps} loss {ema:.3f}")
    return float(ema or 0.0)


def set_trainable(m: MedMoE, predicate: Callable[[str], bool]) -> list[nn.Parameter]:
    params = []
    for name, p in m.lm.named_parameters():
        p.requires_grad_(predicate(name))
        if p.requires_grad:
            params.append(p)
    m.vision.requires_grad_(False)  # the tower is frozen in every stage (§1.1)
    return params


def conversation_batches(enc: ConversationEncoder, qa: list[list[tuple[str, str]]], cfg: StageConfig, rng: np.random.Generator, pad_id: int, *, describe: list[str] | None = None) -> Callable[[int], Batch]:
    """A step → Batch function drawing random images; `describe` switches to caption turns (stage 1)."""

    def make(_: int) -> Batch:
        idx = rng.integers(0, len(qa), cfg.batch).tolist()
        if describe is not None:
            encoded = [enc.encode([("describe the image.", describe[i])]) for i in idx]
        else:
            encoded = [enc.encode([qa[i][j] for j in rng.permutation(len(qa[i]))[: cfg.max_turns]]) for i in idx]
        return collate(encoded, idx, pad_id, cfg.max_len)

    return make


def text_batches(enc: ConversationEncoder, qa: list[list[tuple[str, str]]], captions: list[str], cfg: StageConfig, rng: np.random.Generator, pad_id: int) -> Callable[[int], Batch]:
    def make(_: int) -> Batch:
        idx = rng.integers(0, len(qa), cfg.batch).tolist()
        encoded: list[Encoded] = []
        for i in idx:
            turns = [qa[i][j] for j in rng.permutation(len(qa[i]))[: cfg.max_turns]] + [("describe the image.", captions[i])]
            encoded.append(enc.encode_text_only(turns))
        return collate(encoded, idx, pad_id, cfg.max_len)

    return make


@torch.no_grad()
def averaged_hidden_states(m: MedMoE, feats: torch.Tensor, batch: Batch, prefix: torch.Tensor) -> torch.Tensor:
    """§3.4: mean over all N+1 hidden-state tensors (embeddings … final-norm output), then over positions."""
    lm = m.lm.model
    b = batch.suffix.shape[0]
    embeds = torch.cat([lm.embed_tokens(prefix)[None].expand(b, -1, -1), lm.mm_projector(feats[batch.image_index]), lm.embed_tokens(batch.suffix)], dim=1)
    mask = torch.cat([torch.ones(b, embeds.shape[1] - batch.suffix.shape[1], dtype=torch.int64), batch.suffix_mask], dim=1)
    positions = torch.arange(embeds.shape[1]).expand(b, -1)
    cos, sin = rotary_cos_sin(positions, lm.text.rotary_dim, lm.text.rope_theta)
    bias = attention_bias(mask, 0, embeds.shape[1])
    h = embeds
    states = [h]  # HF hidden_states: the input of each layer, then the final-norm output
    for i, layer in enumerate(lm.layers):
        h, _ = layer(h, cos, sin, bias, None, i)
        states.append(h)
    states[-1] = lm.final_norm(h)
    avg = torch.stack(states).mean(0)  # [B, L, H]
    w = mask.unsqueeze(-1).to(avg.dtype)
    return (avg * w).sum(1) / w.sum(1)


def train_router(x: torch.Tensor, y: torch.Tensor, n_classes: int, gen: torch.Generator, epochs: int = 10, lr: float = 1e-3, batch: int = 32) -> tuple[nn.Linear, float]:
    """Linear(H, n_classes) with cross-entropy, Adam lr 1e-3, 10 epochs (the notebook's recipe, §3.4).

    Returns the classifier and its training accuracy.
    """
    router = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], batch):
            idx = perm[s : s + batch]
            loss = nn.functional.cross_entropy(router(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (router(x).argmax(-1) == y).float().mean().item()
    return router, acc


def to_moe(dense: MedMoE, moe: MoESpec, router: nn.Linear) -> MedMoE:
    """§2.5: every MoE layer gets E experts and a meta expert copied from its dense FFN, and the router as gate."""
    m = MedMoE(replace(dense.spec, moe=moe))
    sd = dense.lm.state_dict()
    for layer in moe.layers:
        prefix = f"model.layers.{layer}.mlp."
        ffn = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        for k in list(sd):
            if k.startswith(prefix):
                del sd[k]
        for name, v in ffn.items():
            sd[f"{prefix}meta_moe.{name}"] = v.clone()
            for e in range(moe.num_experts):
                sd[f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}.{name}"] = v.clone()
        sd[f"{prefix}deepspeed_moe.gate.wg.weight"] = router.weight.detach().clone()
        sd[f"{prefix}deepspeed_moe.gate.wg.bias"] = router.bias.detach().clone()
    m.lm.load_state_dict(sd, strict=True)
    m.vision.load_state_dict(copy.deepcopy(dense.vision.state_dict()))
    assert all(isinstance(m.lm.model.layers[i].mlp, MoEFFN) for i in moe.layers)
    return m
