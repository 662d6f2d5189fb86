"""Bit allocation: an exact multiple-choice knapsack over measured sensitivities, per backend.

Each *unit* is a set of weight matrices that must share one type in the target format (an ONNX
or TensorRT expert: its fc1 and fc2; a GGUF layer×projection stack: that projection of every
expert of the layer, since llama.cpp stores them as one tensor of one type). A unit offers
*choices* (precision → bytes as the format stores them, measured ΔD = mean ΔKL of answer
logits, router agreement). The allocation minimises Σ ΔD under Σ bytes ≤ budget, assuming
additivity D(plan) ≈ Σ ΔD_g (quantization-study §2: within ±20 % for RTN on the demo).

Solver: dynamic programming over byte buckets (MxMoE's ILP and MC-MoE's LP solve the same
problem). Bytes are rounded *up* to buckets of budget/`RESOLUTION`, so a returned plan never
exceeds the budget; within that rounding the optimum is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError
from .quant_plan import QuantMethod
from .vocab import Component, OnnxOps, Precision, PrecisionKind

RESOLUTION = 4096  # byte buckets of the DP


@dataclass(frozen=True)
class Backend:
    """What one target format can store, and how it counts bytes.

    Attributes:
        name: the --format value.
        candidates: the precisions the allocator may choose (fp32: leave the unit in floating point).
        scale_bytes: bytes of one block scale as the format writes it.
        zero_point: asymmetric codes with a packed zero point per block.
        stacked_experts: one type per layer × projection for the routed experts (GGUF).
        quantize_embed: the embedding table can be stored quantized (it is a Gather, not a MatMul, in ONNX).
        float_precision: what the format stores a floating-point group as (the plan's default).
    """

    name: str
    candidates: tuple[Precision, ...]
    scale_bytes: int
    zero_point: bool
    stacked_experts: bool = False
    quantize_embed: bool = True
    float_precision: Precision = Precision.FP32

    def offers(self, precision: Precision, unit: Unit) -> bool:
        """Whether `unit` may take `precision` here: floating point and integer types always, ggml
        types only when every matrix's rows are whole blocks (llama.cpp would store another type
        otherwise)."""
        if precision.is_float:
            return True
        if precision.kind is PrecisionKind.GGML:
            from .ggml_codes import block_size

            return all(r % block_size(precision) == 0 for r in unit.rows)
        return True


def unit_name(tensor_id, stacked_experts: bool) -> str:
    """The allocation unit a TensorId belongs to: its group, or for a routed expert of a
    stacked-experts format that projection of every expert of its layer (a glob the plan rule uses)."""
    if stacked_experts and tensor_id.component is Component.EXPERT:
        return f"layers.{tensor_id.layer}.expert.*.{tensor_id.proj}"
    return str(tensor_id.group)


INT_BITS = {Precision.INT2: 2, Precision.INT3: 3, Precision.INT4: 4, Precision.INT8: 8}
# GGUF: ggml's own block types (ggml_codes.CODE_BITS), rounded by ggml itself (q4_0/q8_0 also hold GPTQ codes as they are)
GGML_CANDIDATES = (Precision.Q2_K, Precision.Q3_K, Precision.Q4_0, Precision.Q4_K, Precision.Q5_K, Precision.Q6_K, Precision.Q8_0)

BACKENDS: dict[str, Backend] = {
    # the PyTorch fake-quant oracle: the quantizer core's widths (3 bits too, which no format's
    # integer codes have: the oracle's plans bound what a format with them could reach), fp16 scales
    "torch": Backend("torch", (Precision.INT2, Precision.INT3, Precision.INT4, Precision.INT8, Precision.FP32), 2, True),
    # DequantizeLinear (opset 21) → MatMul: int4/int8 only (no 2- or 3-bit DQ that ORT fuses); the
    # fp32 graph needs fp32 scales (DQ's output type is its scale's type)
    "onnx": Backend("onnx", (Precision.INT4, Precision.INT8, Precision.FP32), 4, True, quantize_embed=False),
    # ONNX with com.microsoft.MatMulNBits written directly (quantize --ops matmulnbits): ONNX Runtime
    # only, and 2-bit codes too (MatMulNBits takes 2, 4 and 8 bits; fp32 scales in the fp32 graph)
    OnnxOps.MATMULNBITS.backend: Backend(OnnxOps.MATMULNBITS.backend, (Precision.INT2, Precision.INT4, Precision.INT8, Precision.FP32), 4, True, quantize_embed=False),
    # TensorRT: symmetric blocked int4 weight-only Q/DQ in an fp16 network with fp16 scales
    # (quantization-study §3c). No int8: measured with TensorRT-RTX 1.7.1 on the demo's decoder
    # (docs/TENSORRT.md), weight-only int8 is folded into fp16 weights (the engine grows) and int8
    # q/k/v projections make the builder fail
    "tensorrt": Backend("tensorrt", (Precision.INT4, Precision.FP16), 2, False, quantize_embed=False, float_precision=Precision.FP16),
    # GGUF: ggml block types (scales and mins inside the blocks: scale_bytes/zero_point unused), one
    # type per layer × projection for the stacked experts, the embedding quantizable (get_rows
    # reads every type), the projector too (mtmd's projector matmuls take any ggml type; its codes
    # go into the mmproj file, the vision tower stays f32/f16 there)
    "gguf": Backend("gguf", (*GGML_CANDIDATES, Precision.FP16, Precision.FP32), 0, False, stacked_experts=True),
}


@dataclass(frozen=True)
class Choice:
    """One precision for one unit, with what it costs and what it was measured to do.

    Attributes:
        delta: measured ΔD (mean KL of answer logits vs fp32) with only this unit quantized.
        router_agreement: share of (position, MoE layer) top-1 choices unchanged.
    """

    precision: Precision
    method: QuantMethod
    nbytes: int
    delta: float
    router_agreement: float = 1.0


@dataclass(frozen=True)
class Unit:
    """Matrices that share one type (see the module docstring).

    Attributes:
        name: the TensorId group (or glob, for a GGUF stack) the plan rule is written for.
        keys: checkpoint weight keys of the matrices.
        params: their parameters.
        choices: what the allocator may pick.
        rows: the input size of each matrix (a row of weights as ggml blocks them).
        component: what part of the model the matrices are.
    """

    name: str
    keys: tuple[str, ...]
    params: int
    choices: tuple[Choice, ...] = field(default=())
    rows: tuple[int, ...] = ()
    component: Component | None = None


@dataclass(frozen=True)
class Allocation:
    """The chosen precision per unit, with the predicted totals."""

    units: tuple[Unit, ...]
    picks: tuple[Choice, ...]
    budget: int

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.picks)

    @property
    def predicted_delta(self) -> float:
        return sum(c.delta for c in self.picks)

    @property
    def params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.params, 1)


def restrict(units: Sequence[Unit], types: Sequence[Precision] | None) -> list[Unit]:
    """`units` offering only the quantized `types` (floating point, the plan's default, always
    stays); None: every choice. Sensitivities are measured for every type of the backend first, so
    one cache serves every restriction."""
    if types is None:
        return list(units)
    return [replace(u, choices=tuple(c for c in u.choices if c.precision.is_float or c.precision in types)) for u in units]


def guard(choices: Sequence[Choice], min_agreement: float) -> tuple[Choice, ...]:
    """Drop choices whose router agreement is below `min_agreement` (EAQuant: keep routing), but
    never all of them: the most agreeing one stays."""
    kept = tuple(c for c in choices if c.router_agreement >= min_agreement)
    return kept or (max(choices, key=lambda c: (c.router_agreement, c.nbytes)),)


def budget_from(units: Sequence[Unit], *, budget_mb: float | None = None, avg_bits: float | None = None) -> int:
    """Bytes available to `units`: --budget-mb (10^6 bytes) or --avg-bits over their parameters.

    Raises:
        InputError: neither or both given, or a non-positive value.
    """
    if (budget_mb is None) == (avg_bits is None):
        raise InputError("give exactly one of --budget-mb and --avg-bits")
    value = budget_mb if budget_mb is not None else avg_bits
    if value is None or value <= 0:
        raise InputError(f"the budget must be positive, got {value}")
    if budget_mb is not None:
        return int(budget_mb * 1e6)
    return int(avg_bits * sum(u.params for u in units) / 8)


def check_budget(units: Sequence[Unit], budget: int, also: str = "") -> None:
    """Refuse a budget below the smallest plan (every unit at its smallest choice); only the
    choices' bytes are read, so it runs before any sensitivity is measured. `also`: another fix
    the caller can name, appended to the message.

    Raises:
        InputError: a unit without choices, or a budget below the smallest plan (naming the least budget).
    """
    for u in units:
        if not u.choices:
            raise InputError(f"{u.name} has no precision to choose from: check the backend's candidates")
    smallest = sum(min(c.nbytes for c in u.choices) for u in units)
    if smallest > budget:
        params = max(sum(u.params for u in units), 1)
        raise InputError(
            f"the budget {budget / 1e6:.3f} MB is below what the smallest types allow ({smallest / 1e6:.3f} MB, {8 * smallest / params:.2f} bits per weight): "
            f"raise --budget-mb to at least {math.ceil(smallest / 1e3) / 1e3:.3f} or --avg-bits to at least {math.ceil(800 * smallest / params) / 100:.2f}{also}"
        )


def solve(units: Sequence[Unit], budget: int, *, resolution: int = RESOLUTION, penalty: float = 0.0) -> Allocation:
    """Minimise Σ (ΔD + `penalty`·(1 − router agreement)) over one choice per unit with Σ bytes ≤
    `budget` (exact over byte buckets).

    Raises:
        InputError: a unit without choices, or a budget below the smallest plan (naming the least budget).
    """
    units = tuple(units)
    check_budget(units, budget)
    bucket = max(1, math.ceil(budget / resolution))
    cap = budget // bucket
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    back = np.zeros((len(units), cap + 1), dtype=np.int16)
    for ui, u in enumerate(units):
        nxt = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for ci, c in enumerate(u.choices):
            w = math.ceil(c.nbytes / bucket)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + c.delta + penalty * (1.0 - c.router_agreement)
            better = cand < nxt
            nxt = np.where(better, cand, nxt)
            arg = np.where(better, ci, arg)
        best, back[ui] = nxt, arg
    if not np.isfinite(best).any():
        # bucket rounding made the smallest plan not fit although it does in bytes: take it
        return Allocation(units, tuple(min(u.choices, key=lambda c: c.nbytes) for u in units), budget)
    end = int(np.nanargmin(best))
    picks: list[Choice] = []
    for ui in range(len(units) - 1, -1, -1):
        c = units[ui].choices[int(back[ui, end])]
        picks.append(c)
        end -= math.ceil(c.nbytes / bucket)
    return Allocation(units, tuple(reversed(picks)), budget)


def route_flips(alloc: Allocation) -> float:
    """The plan's predicted router disagreement: Σ over units of (1 − agreement), additive as ΔD is."""
    return sum(1.0 - c.router_agreement for c in alloc.picks)


def solve_routed(units: Sequence[Unit], budget: int, max_flips: float, *, resolution: int = RESOLUTION, steps: int = 30) -> Allocation:
    """`solve`, with the plan's predicted router disagreement held at or under `max_flips` where
    some plan within the budget can: the per-unit guard keeps each unit's choice above the router
    guard, but their flips add up (EAQuant; on the demo a plan of units each ≥ 99.5 % routed 99.4 %).
    A Lagrange multiplier λ on Σ(1 − agreement) is found by bisection: the least λ whose plan meets
    `max_flips`, so ΔD is given up only as far as routing needs. Where no λ meets it, the plan with
    the fewest flips the budget allows.

    Raises:
        InputError: as `solve`.
    """
    plan = solve(units, budget, resolution=resolution)
    if route_flips(plan) <= max_flips:
        return plan
    lo, hi = 0.0, 1e-3
    best = solve(units, budget, resolution=resolution, penalty=hi)  # the plan at hi, which meets max_flips once the loop ends
    while route_flips(best) > max_flips:
        lo, hi = hi, hi * 4
        best = solve(units, budget, resolution=resolution, penalty=hi)
        if hi > 1e6:  # ΔD no longer matters: the fewest flips the budget allows
            return best
    for _ in range(steps):
        mid = (lo + hi) / 2
        plan = solve(units, budget, resolution=resolution, penalty=mid)
        if route_flips(plan) <= max_flips:
            hi, best = mid, plan
        else:
            lo = mid
    return best


__all__ = ["route_flips", "solve_routed", "unit_name", "BACKENDS", "GGML_CANDIDATES", "INT_BITS", "RESOLUTION", "Allocation", "Backend", "Choice", "Unit", "budget_from", "check_budget", "guard", "restrict", "solve"]
