"""Feed-forward blocks of the two backbones (§1.3, §2.3.5).

These are the dense FFNs, the routed experts and the meta expert alike: in Med-MoE
all five FFNs of an MoE layer start as copies of the dense FFN (§2.5).
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import TextSpec, Variant


class PhiMLP(nn.Module):
    """Phi-2 FFN: `fc2(gelu_tanh(fc1·x + b1)) + b2` (HF `gelu_new`)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter, bias=True)
        self.fc2 = nn.Linear(inter, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """StableLM FFN: `down(silu(gate·x) ⊙ up·x)`, no biases."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def make_ffn(text: TextSpec) -> nn.Module:
    """The FFN module of `text.variant` at the spec's sizes."""
    if text.variant is Variant.PHI:
        return PhiMLP(text.hidden_size, text.intermediate_size)
    return SwiGLU(text.hidden_size, text.intermediate_size)
