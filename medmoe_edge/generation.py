"""Runtime-agnostic generation: sampling functions and the prefill/decode loop.

Sampling is a small pure function of the logits (gpt-fast style). The one loop that drives
a runtime's prefill and decode with them is `Runtime.generate` (`medmoe_edge.runtime_contract`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from .errors import InputError


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings.

    Attributes:
        max_new_tokens: upper bound of generated tokens (EOS stops earlier).
        temperature: 0 means greedy (the official eval setting, §5.4); > 0 samples.
        top_p: nucleus mass kept when sampling (1.0 keeps all).
        seed: seed of the sampling generator (ignored when greedy).
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InputError(f"--temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability mass reaches `top_p`.

    Same rule as transformers' `TopPLogitsWarper`: sort ascending, drop tokens whose
    cumulative mass is ≤ 1 - top_p, always keep the most likely token.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from fp32 logits [B, V]: argmax when greedy, else temperature + top-p sampling."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits / cfg.temperature, cfg.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class FinishReason(str, Enum):
    EOS = "eos"
    LENGTH = "length"


@dataclass
class StepOutput:
    """What a runtime returns for one forward pass.

    Attributes:
        logits: [B, V] fp32 next-token logits of each row.
        experts: {MoE layer: [B, k]} experts that processed the token whose logits these are
            (the last prompt token after prefill); empty when the runtime cannot report routing.
        prompt_routing: after prefill only: per row, {MoE layer: {"image": [E counts], "text": [E counts]}}.
        prompt_experts: after prefill only: {MoE layer: [B, L, k]} experts of every spliced prompt
            position (padding included), for fidelity checks.
    """

    logits: torch.Tensor
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    prompt_routing: list[dict[int, dict[str, list[int]]]] | None = None
    prompt_experts: dict[int, torch.Tensor] | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row."""

    row: int
    step: int
    token_id: int
    experts: dict[int, list[int]]  # MoE layer → experts of the forward pass that produced this token


@dataclass
class RowResult:
    """Everything generated for one request."""

    token_ids: list[int]
    finish_reason: FinishReason
    routing: list[dict[int, list[int]]]
    prompt_routing: dict[int, dict[str, list[int]]]


@dataclass
class LoopTimings:
    prefill_s: float = 0.0  # time to first token (prefill + first sample)
    decode_s: float = 0.0
    decode_steps: int = 0
