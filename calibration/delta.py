"""Delta-from-meta coding of routed experts, chosen per expert where it adds less output error.

Med-MoE's routed experts are upcycled from the same FFN as the always-on meta expert (spec §2.5),
and the meta expert's input projections are computed for every token anyway. A routed expert's
input projections (Phi: fc1; StableLM: gate and up) can then be stored as codes of

    D = W_e − Ŵ_meta,     computed as   x·Ŵ_metaᵀ (the meta expert's, reused) + x·D̂ᵀ,

where Ŵ_meta is the meta expert's projection *as the bundle stores it* (its dequantized codes,
or its floating-point weights), so the expert's effective weight is Ŵ_meta + D̂ and its error is
D̂ − D alone. D̂ has W_e's shape, width and blocks: the same bytes as direct codes.

It wins when the expert sits close to its meta expert (the demo's experts are 8–12 % away: a
2-bit delta reconstructs as well as direct 4-bit codes, docs/QUANTIZATION.md) and loses when it
does not (random experts are ~√2 as far from the meta expert as from zero). So after the
allocation, `choose` codes each quantized expert's input projections both ways, at the width the
plan gave them, with GPTQ (or the plan's method) on the expert's own routed-token Hessian, and
keeps the delta where its output energy Σ tr(ΔW H ΔWᵀ) over those tokens is lower. Bytes, and
so the budget, are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medmoe_edge.calib_stats import CalibStats
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.delta_coding import expert_inputs
from medmoe_edge.quantizer import DeltaQTensor, GptqFactors, QTensor, QuantizerConfig, quantize

from .sensitivity import output_energy

@dataclass(frozen=True)
class DeltaChoice:
    """One quantized routed expert's input projections, coded both ways.

    Attributes:
        layer, expert: where it is.
        direct: output energy of its direct codes over its routed calibration tokens.
        delta: the same for codes of the delta from the meta expert.
        chosen: whether the delta was kept.
    """

    layer: int
    expert: int
    direct: float
    delta: float
    chosen: bool


def choose(loaded: LoadedModel, stats: CalibStats, codes: dict[str, QTensor], factors: GptqFactors | None = None) -> tuple[dict[str, QTensor], list[DeltaChoice]]:
    """`codes` (checkpoint key → the plan's codes) with each quantized expert's input projections
    replaced by `DeltaQTensor`s where the delta adds less output energy (module docstring);
    returns the codes and what was compared. Experts the plan leaves in floating point, or whose
    projections have no Hessian, are left as they are."""
    state = loaded.model.lm.state_dict()
    factors = factors if factors is not None else GptqFactors()
    out = dict(codes)
    report = []
    for layer, e, pairs in expert_inputs(loaded):
        if not all(k in codes and k in stats.hessians and not isinstance(codes[k], DeltaQTensor) for k, _m in pairs):
            continue
        direct = sum(output_energy(stats, k, state[k], codes[k].dequantize()) or 0.0 for k, _m in pairs)
        deltas: dict[str, DeltaQTensor] = {}
        for k, m in pairs:
            q = codes[k]
            base = codes[m].dequantize() if m in codes else state[m].to(torch.float32)
            d = quantize(state[k].to(torch.float32) - base, QuantizerConfig(q.bits, q.block, q.method, q.symmetric), stats.hessians[k], stats.tokens.get(k, 0), factors)
            deltas[k] = DeltaQTensor(d.codes, d.scales, d.zeros, d.bits, d.block, d.symmetric, d.method, base=base, base_key=m)
        energy = sum(output_energy(stats, k, state[k], deltas[k].dequantize()) or 0.0 for k, _m in pairs)
        chosen = energy < direct
        if chosen:
            out.update(deltas)
        report.append(DeltaChoice(layer, e, direct, energy, chosen))
    return out, report


__all__ = ["DeltaChoice", "choose"]
