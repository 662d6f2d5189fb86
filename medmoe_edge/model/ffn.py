"""Feed-forward blocks of the two backbones (§1.3, §2.3.5).

These are the dense FFNs, the routed experts and the meta expert alike: in Med-MoE
all five FFNs of an MoE layer start as copies of the dense FFN (§2.5).

Each FFN is `post(pre(x))`: `pre` is the projections that read x (`INPUT_PROJECTIONS`), `post`
the rest. A routed expert stored as a delta from its meta expert (`MoEFFN.delta_experts`) adds
the meta expert's `pre(x)`, computed for every token anyway, to its own (quantization-study §7).
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import TextSpec, Variant
from .linear import Linear


class PhiMLP(nn.Module):
    """Phi-2 FFN: `fc2(gelu_tanh(fc1·x + b1)) + b2` (HF `gelu_new`)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.fc1 = Linear(hidden, inter, bias=True)
        self.fc2 = Linear(inter, hidden, bias=True)

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.fc1(x),)

    def post(self, h: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(h[0], approximate="tanh"))

    def forward(self, x: torch.Tensor, base: tuple[torch.Tensor, ...] | None = None, keep_pre: bool = False):
        return _forward(self, x, base, keep_pre)


class SwiGLU(nn.Module):
    """StableLM FFN: `down(silu(gate·x) ⊙ up·x)`, no biases."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.gate_proj(x), self.up_proj(x))

    def post(self, h: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(h[0]) * h[1])

    def forward(self, x: torch.Tensor, base: tuple[torch.Tensor, ...] | None = None, keep_pre: bool = False):
        return _forward(self, x, base, keep_pre)


def _forward(ffn, x: torch.Tensor, base: tuple[torch.Tensor, ...] | None, keep_pre: bool):
    """`post(pre(x))`; with `base` (the meta expert's `pre` of the same rows) the input projections
    hold deltas from the meta expert's and `base` is added to them; with `keep_pre` the result is
    (output, pre), so a meta expert hands its `pre` to the delta-coded experts. Both run inside the
    module's call, so an exported graph keeps the Add in the expert's scope (an `If` branch)."""
    h = ffn.pre(x)
    if base is not None:
        h = tuple(b + d for b, d in zip(base, h))
    y = ffn.post(h)
    return (y, h) if keep_pre else y


# the projections that read the FFN's input, in `pre`'s order
INPUT_PROJECTIONS: dict[Variant, tuple[str, ...]] = {Variant.PHI: ("fc1",), Variant.STABLELM: ("gate_proj", "up_proj")}


def make_ffn(text: TextSpec) -> nn.Module:
    """The FFN module of `text.variant` at the spec's sizes."""
    if text.variant is Variant.PHI:
        return PhiMLP(text.hidden_size, text.intermediate_size)
    return SwiGLU(text.hidden_size, text.intermediate_size)
