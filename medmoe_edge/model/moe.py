"""The Med-MoE FFN block: frozen domain router, top-k routed experts, always-on meta expert (§2).

Module names follow the released state-dict keys (§2.6) so that checkpoints load
with a strict `load_state_dict`:

    mlp.deepspeed_moe.gate.wg.{weight,bias}                       router, [E, H] / [E]
    mlp.deepspeed_moe.experts.deepspeed_experts.{e}.<ffn keys>    routed experts
    mlp.meta_moe.<ffn keys>                                       meta expert (weight 1, no gate)
    mlp.coefficient.{weight,bias}                                 only with use_residual

Execution is expert-sparse: per token only its selected expert(s) and the meta expert
run. Because Med-MoE never drops tokens (§2.4) the block is a pure per-token
function, so grouping tokens by expert is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from ..spec import MoESpec, TextSpec
from .ffn import make_ffn
from .linear import Linear


class Dispatch(str, Enum):
    """How an MoE block sends tokens to their experts; all three give the same sums.

    EAGER: data-dependent loop over the chosen experts (inference). SCATTER: fixed trip count with
    NonZero + Gather + ScatterND (traceable, expert-sparse). MASKED: every expert weighted by its
    per-row routing weight, zero where not chosen (traceable, no NonZero; made expert-sparse by
    the exporter's `If` per expert).
    """

    EAGER = "eager"
    SCATTER = "scatter"
    MASKED = "masked"


@dataclass(frozen=True)
class Routing:
    """Router decision for the tokens of one MoE layer.

    Shapes (N = flattened tokens, E = experts, k = top_k):
        probs:   [N, E] fp32 softmax over all experts
        experts: [N, k] selected expert ids (int64), first is the argmax
        weights: [N, k] fp32 combine weights as applied (raw p for k=1, renormalised for k=2)
    """

    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


class _Gate(nn.Module):
    def __init__(self, hidden: int, n_experts: int) -> None:
        super().__init__()
        # §2.2: the Router's fc1 replaces `wg`, so the key is gate.wg.* and it has a bias.
        self.wg = Linear(hidden, n_experts, bias=True)


class _Experts(nn.Module):
    def __init__(self, text: TextSpec, n_experts: int) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(make_ffn(text) for _ in range(n_experts))


class _MOELayer(nn.Module):
    def __init__(self, text: TextSpec, moe: MoESpec) -> None:
        super().__init__()
        self.gate = _Gate(text.hidden_size, moe.num_experts)
        self.experts = _Experts(text, moe.num_experts)


def route(x: torch.Tensor, wg: nn.Linear, top_k: int) -> Routing:
    """Router math of §2.3 steps 1-4 for flattened tokens `x` [N, H].

    The official top-2 draws Gumbel noise for the second choice on every forward, even
    at inference (§2.3.4, §7.3), so it cannot be reproduced exactly; we take the plain
    second argmax, which is what that noise perturbs. Top-1 (the released setting) is exact.
    """
    # §2.3.1: gate and input in fp32 regardless of the model dtype.
    logits = torch.nn.functional.linear(x.float(), wg.weight.float(), wg.bias.float())
    probs = logits.softmax(dim=-1)  # §2.3.2: over all experts
    e1 = probs.argmax(dim=-1, keepdim=True)  # first index on ties, as torch.argmax in the official code
    p1 = probs.gather(-1, e1)
    if top_k == 1:
        # §2.3.3: weight is the raw softmax probability, NOT renormalised (p1 < 1).
        return Routing(probs, e1, p1)
    masked = probs.scatter(-1, e1, float("-inf"))
    e2 = masked.argmax(dim=-1, keepdim=True)
    p2 = probs.gather(-1, e2)
    denom = (p1 + p2).clamp_min(torch.finfo(torch.float32).eps)  # §2.3.4: renormalised over the pair
    return Routing(probs, torch.cat([e1, e2], -1), torch.cat([p1 / denom, p2 / denom], -1))


class MoEFFN(nn.Module):
    """One MoE FFN: `y = Σ_k w_k·Expert_{e_k}(x) + Meta(x)` (§2.3.6, use_residual=False)."""

    def __init__(self, text: TextSpec, moe: MoESpec) -> None:
        super().__init__()
        self.top_k = moe.top_k
        self.use_residual = moe.use_residual
        self.deepspeed_moe = _MOELayer(text, moe)
        self.meta_moe = make_ffn(text)
        if moe.use_residual:
            self.coefficient = Linear(text.hidden_size, 2, bias=True)
        # Graph exporters trace Python, so they need a loop with a fixed shape (see
        # `_dispatch_static` and `_dispatch_masked`); eager inference keeps the data-dependent loop.
        self.dispatch = Dispatch.EAGER
        # Routed experts whose input projections hold W_e - W_meta (and b_e - b_meta): they add the
        # meta expert's pre-activation of their rows, computed once for every token anyway
        # (`quantization-study` §7, `calibration.delta`). Empty: the released layout.
        self.delta_experts: frozenset[int] = frozenset()

    @property
    def experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def _expert(self, e: int, x: torch.Tensor, base: tuple[torch.Tensor, ...] | None, rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Expert `e` on its rows `x`; a delta-coded expert also gets those `rows` of the meta expert's pre-activations."""
        if base is None or e not in self.delta_experts:
            return self.experts[e](x)
        return self.experts[e](x, tuple(rows(b) for b in base))

    def _dispatch_eager(self, xf: torch.Tensor, r: Routing, base: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Σ_k w_k·Expert_{e_k}(x): each expert that was chosen runs only on the tokens that chose it.

        Slot by slot (k = 0, then 1 for top-2), like `_dispatch_static`: an expert then sees the
        same rows in both, and a matmul's result for a row can depend on how many rows it is
        computed with (BLAS blocking), so this keeps the two bit-identical.
        """
        routed = torch.zeros_like(xf)
        for k in range(r.experts.shape[1]):
            for e in r.experts[:, k].unique().tolist():
                tok = (r.experts[:, k] == e).nonzero().squeeze(-1)
                # The official combine casts the fp32 weight to the activation dtype before scaling.
                w = r.weights[tok, k].to(xf.dtype).unsqueeze(-1)
                routed.index_add_(0, tok, self._expert(e, xf[tok], base, lambda b: b[tok]) * w)
        return routed

    def _dispatch_static(self, xf: torch.Tensor, r: Routing, base: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The same sum with a loop of fixed trip count, for tracing into ONNX.

        For every slot k and expert e the tokens whose k-th choice is e are gathered
        (NonZero + Gather), run through expert e, and scattered back (ScatterND). An expert
        nobody chose runs on zero rows, so per token only its selected expert(s) do work:
        the graph stays expert-sparse. Within one slot every token has exactly one
        expert, so the scatters of a slot never overlap and need no reduction (TensorRT's
        ScatterND has none); the k slots are summed afterwards, in slot order as `index_add_`.
        """
        routed: torch.Tensor | None = None
        for k in range(r.experts.shape[1]):
            out = torch.zeros_like(xf)
            for e in range(len(self.experts)):
                tok = (r.experts[:, k] == e).nonzero().squeeze(-1)
                w = r.weights[:, k].index_select(0, tok).to(xf.dtype).unsqueeze(-1)
                out = out.index_put((tok,), self._expert(e, xf.index_select(0, tok), base, lambda b: b.index_select(0, tok)) * w)
            routed = out if routed is None else routed + out
        assert routed is not None
        return routed

    def _dispatch_masked(self, xf: torch.Tensor, r: Routing, base: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The same sum without data-dependent shapes: Σ_e Expert_e(x)·w_e over all rows.

        w_e[n] = Σ_k weights[n, k]·[experts[n, k] = e] is 0 for a row that did not choose e, so
        every row keeps exactly its own terms (adding exact zeros changes no bit). Traced as is,
        every expert runs on every row (dense); the ONNX exporter then wraps each expert in an
        `If` that runs it only when some row's weight for it is non-zero
        (`export/onnx_moe_cond.py`), which for one decoded token is exactly its selected
        expert(s). This is the formulation TensorRT can build (no NonZero).
        """
        routed = torch.zeros_like(xf)
        for e in range(len(self.experts)):
            w = (r.weights * (r.experts == e)).sum(dim=-1, keepdim=True)
            routed = routed + self._expert(e, xf, base, lambda b: b) * w.to(xf.dtype)
        return routed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Args: x [B, T, H] (the layer's FFN input). Returns (y [B, T, H], routing of the B·T tokens)."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        r = route(xf, self.deepspeed_moe.gate.wg, self.top_k)
        meta, base = self.meta_moe(xf, keep_pre=True) if self.delta_experts else (None, None)
        if self.dispatch is Dispatch.SCATTER:
            routed = self._dispatch_static(xf, r, base)
        elif self.dispatch is Dispatch.MASKED:
            routed = self._dispatch_masked(xf, r, base)
        else:
            routed = self._dispatch_eager(xf, r, base)
        if meta is None:
            meta = self.meta_moe(xf)
        if self.use_residual:
            # §2.3.6: y = c0·routed + c1·Meta(x) + Meta(x); the residual MLP *is* the meta module.
            c = self.coefficient(xf).softmax(dim=-1)
            y = routed * c[:, 0:1] + meta * c[:, 1:2] + meta
        else:
            y = routed + meta  # meta expert weight is exactly 1 (§3.5)
        return y.reshape(shape), r
