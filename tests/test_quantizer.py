"""The quantizer core (RTN, imatrix-weighted RTN, GPTQ → codes + scales) and the knapsack allocator."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from medmoe_edge.allocation import Choice, Unit, budget_from, guard, route_flips, solve, solve_routed
from medmoe_edge.errors import InputError
from medmoe_edge.quant_plan import QuantMethod
from medmoe_edge.quantizer import GptqFactors, QuantizerConfig, gptq, packed_bytes, quantize, relative_error, rtn
from medmoe_edge.vocab import Precision


def _data(seed=0, n=128, k=256, rows=3000):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    # correlated inputs with uneven scales, as activations are
    x = torch.randn(rows, 32, generator=g) @ torch.randn(32, k, generator=g) + 0.1 * torch.randn(rows, k, generator=g)
    return w, x, x.T @ x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_reproduce_within_a_step(bits):
    w, _, _ = _data()
    q = rtn(w, QuantizerConfig(bits, block=32))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == (128, 8) and q.zeros.shape == (128, 8)
    assert torch.equal(q.scales, q.scales.half().float())  # fp16-exact, for formats that store fp16 scales
    step = q.scales.repeat_interleave(32, dim=1)
    err = (w - q.dequantize()).abs() / step
    # the integer zero point shifts the grid by up to half a step, so the ends of a block can be
    # off by up to one step; rounding keeps the mean at a quarter step
    assert float(err.max()) <= 1.0 + 1e-4
    assert float(err.mean()) == pytest.approx(0.25, abs=0.03)


def test_symmetric_codes_have_the_fixed_zero_point():
    w, _, _ = _data()
    q = rtn(w, QuantizerConfig(4, symmetric=True))
    assert torch.all(q.zeros == 8)
    s = q.signed_codes()
    assert int(s.min()) >= -8 and int(s.max()) <= 7
    assert torch.allclose(s.float().view(128, 8, 32) * q.scales.unsqueeze(-1), q.dequantize().view(128, 8, 32))


def test_gptq_on_the_matrix_own_inputs_beats_rtn():
    w, x, h = _data()
    for bits, most in ((2, 0.6), (4, 0.6)):
        r = rtn(w, QuantizerConfig(bits))
        g = gptq(w, h, QuantizerConfig(bits, method=QuantMethod.GPTQ))
        out_err = lambda q: float((x @ (w - q.dequantize()).T).norm() / (x @ w.T).norm())  # noqa: E731
        assert out_err(g) < most * out_err(r), (bits, out_err(g), out_err(r))
        assert relative_error(w, g, h) == pytest.approx(out_err(g), rel=1e-3)


def test_a_reused_factorisation_gives_the_same_codes():
    """`GptqFactors` factors a Hessian once for every width and every matrix that shares it."""
    w, _, h = _data()
    factors = GptqFactors()
    for bits in (2, 4, 8):
        cfg = QuantizerConfig(bits, method=QuantMethod.GPTQ)
        fresh, reused = gptq(w, h, cfg), gptq(w, h, cfg, factors)
        assert torch.equal(fresh.codes, reused.codes) and torch.equal(fresh.scales, reused.scales)
    assert len(factors._entries) == 1 and factors.get(h) is factors._entries[0][1]
    assert factors.get(h.clone()) is not factors._entries[1][1]  # by identity: an equal copy is a new entry


def test_imatrix_rtn_lowers_the_importance_weighted_error():
    w, _, h = _data(seed=1)
    plain = rtn(w, QuantizerConfig(3))
    weighted = quantize(w, QuantizerConfig(3, method=QuantMethod.IMATRIX_RTN), h, 3000)
    imp = torch.diag(h)
    err = lambda q: float((((w - q.dequantize()) ** 2) * imp).sum())  # noqa: E731
    assert err(weighted) < err(plain)


def test_bad_inputs_are_named():
    w, _, h = _data()
    with pytest.raises(InputError, match="does not split into blocks of 48"):
        rtn(w, QuantizerConfig(4, block=48))
    with pytest.raises(InputError, match="9-bit codes are not supported: use 2 to 8 bits"):
        QuantizerConfig(9)
    with pytest.raises(InputError, match="gptq needs calibration statistics of this matrix: run medmoe-edge calibrate, or use --method rtn"):
        quantize(w, QuantizerConfig(4, method=QuantMethod.GPTQ))
    with pytest.raises(InputError, match="the statistics are of another model"):
        gptq(w, h[:128, :128], QuantizerConfig(4, method=QuantMethod.GPTQ))


def test_packed_bytes_count_codes_scales_and_zero_points():
    n = 512 * 256
    assert packed_bytes(n, 4, 32, scale_bytes=2, zero_point=False) == n // 2 + n // 32 * 2  # 4.5 bits
    assert packed_bytes(n, 4, 32, scale_bytes=4, zero_point=True) == n // 2 + n // 32 * 4 + n // 32 // 2
    assert packed_bytes(n, 2, 32, scale_bytes=2, zero_point=True) * 8 / n == pytest.approx(2 + 0.5 + 2 / 32)


def _random_units(seed: int, n_units: int = 6):
    rnd = random.Random(seed)
    units = []
    for u in range(n_units):
        p = rnd.choice([1000, 4000, 9000])
        choices = tuple(Choice(prec, QuantMethod.RTN, int(p * b / 8) + rnd.randint(0, 50), d) for prec, b, d in ((Precision.INT2, 2.6, rnd.uniform(1e-3, 1e-1)), (Precision.INT4, 4.6, rnd.uniform(1e-4, 1e-3)), (Precision.INT8, 8.6, rnd.uniform(0, 1e-5))))
        units.append(Unit(f"u{u}", (f"k{u}",), p, choices))
    return units


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_is_the_brute_force_optimum(seed):
    units = _random_units(seed)
    budget = int(sum(u.params for u in units) * 4.0 / 8)
    a = solve(units, budget)
    assert a.nbytes <= budget
    feasible = [combo for combo in itertools.product(*(u.choices for u in units)) if sum(c.nbytes for c in combo) <= budget]
    best = min(sum(c.delta for c in combo) for combo in feasible)
    # exact up to the bucket rounding (bytes rounded up to budget/4096)
    assert a.predicted_delta <= best * (1 + 1e-9) or a.predicted_delta == pytest.approx(best, rel=0.05)


def test_budget_below_the_smallest_types_names_the_least_budget():
    units = _random_units(0)
    least = sum(min(c.nbytes for c in u.choices) for u in units)
    with pytest.raises(InputError, match=r"below what the smallest types allow .* raise --budget-mb to at least .* or --avg-bits to at least"):
        solve(units, least - 1)
    assert solve(units, least).nbytes == least


def test_budget_flags_and_router_guard():
    units = _random_units(1)
    params = sum(u.params for u in units)
    assert budget_from(units, avg_bits=3.0) == int(3.0 * params / 8)
    assert budget_from(units, budget_mb=0.5) == 500_000
    with pytest.raises(InputError, match="give exactly one of --budget-mb and --avg-bits"):
        budget_from(units, budget_mb=1.0, avg_bits=3.0)
    cs = (Choice(Precision.INT2, QuantMethod.RTN, 10, 1e-3, 0.90), Choice(Precision.INT4, QuantMethod.RTN, 20, 1e-4, 0.999))
    assert [c.precision for c in guard(cs, 0.995)] == [Precision.INT4]
    assert [c.precision for c in guard(cs[:1], 0.995)] == [Precision.INT2]  # never none


@pytest.mark.parametrize("seed", range(4))
def test_routed_knapsack_holds_the_plans_summed_flips_when_a_plan_can(seed):
    """Each choice passes the per-unit guard, but the flips of the ΔD-optimal plan add up beyond
    the cap: the routed solve finds the least-ΔD plan within the budget that meets it (brute force)."""
    rnd = random.Random(seed)
    units = [
        Unit(f"u{u}", (f"k{u}",), 4000, tuple(Choice(p, QuantMethod.RTN, int(4000 * b / 8), d, 1 - f) for p, b, d, f in (
            (Precision.INT2, 2.6, rnd.uniform(1e-4, 1e-3), rnd.uniform(2e-3, 4.9e-3)),
            (Precision.INT4, 4.6, rnd.uniform(1e-5, 1e-4), rnd.uniform(0, 2e-3)),
            (Precision.INT8, 8.6, 0.0, 0.0),
        )))
        for u in range(6)
    ]
    budget = int(6 * 4000 * 3.6 / 8) + 60  # not an exact fit: the byte buckets round up (solve's docstring)
    plain = solve(units, budget)
    least = min(sum(1 - x.router_agreement for x in c) for c in itertools.product(*(u.choices for u in units)) if sum(x.nbytes for x in c) <= budget)
    cap = (least + route_flips(plain)) / 2
    assert route_flips(plain) > cap  # the case the routed solve exists for
    a = solve_routed(units, budget, cap)
    assert a.nbytes <= budget and route_flips(a) <= cap
    feasible = [c for c in itertools.product(*(u.choices for u in units)) if sum(x.nbytes for x in c) <= budget and sum(1 - x.router_agreement for x in c) <= cap]
    best = min(sum(x.delta for x in c) for c in feasible)
    assert a.predicted_delta <= best * 1.05  # a Lagrangian optimum: exact where the multiplier reaches it, near otherwise
    # a cap no plan within the budget meets: the fewest flips the budget allows
    fewest = solve_routed(units, budget, least / 2)
    assert route_flips(fewest) == pytest.approx(least)
