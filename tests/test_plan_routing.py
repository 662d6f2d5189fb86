"""The whole plan's routes, measured and held (calibration/routing.py) on the demo model."""

from __future__ import annotations

import pytest
import torch

from medmoe_edge.calibration.routing import hold_routes, measure_picks, measure_plan, moves_routes, plan_weights
from medmoe_edge.calibration.sensitivity import CodeBook, Probe, SensitivityMode, probe_one, units_for
from medmoe_edge.allocation import BACKENDS, route_flips
from medmoe_edge.checkpoint import load_model, resolve_model_dir
from medmoe_edge.quant_plan import QuantMethod
from medmoe_edge.quantization import load_stats, make_plan
from medmoe_edge.quantizer import QuantizerConfig, quantize


@pytest.fixture(scope="module")
def demo(stats_dir):
    loaded = load_model(resolve_model_dir("demo"))
    stats = load_stats(stats_dir, resolve_model_dir("demo"), "demo")
    probe = Probe.from_stats(loaded, stats)
    return loaded, stats, probe


def test_routes_move_only_below_the_last_routers_input(demo):
    loaded, _stats, _probe = demo
    assert tuple(loaded.spec.moe.layers) == (0, 2)  # the demo's MoE layers, of 4
    moves = {u.name: moves_routes(u, (0, 2)) for u in units_for(loaded, BACKENDS["torch"])}
    assert moves["projector"] and moves["embed"] and moves["layers.0.attn"] and moves["layers.0.expert.3"] and moves["layers.1.ffn"]
    assert moves["layers.2.attn"]  # attention feeds its own layer's router
    assert not moves["layers.2.expert.0"] and not moves["layers.2.meta"]  # the last router reads their input, not their output
    assert not moves["layers.3.attn"] and not moves["layers.3.ffn"] and not moves["lm_head"]


def test_a_plan_is_measured_whole_per_sequence(demo):
    loaded, _stats, probe = demo
    state = loaded.model.lm.state_dict()
    assert measure_plan(loaded, probe, {}).flips == 0.0
    key = "model.layers.0.self_attn.q_proj.weight" if "model.layers.0.self_attn.q_proj.weight" in state else next(k for k in state if k.startswith("model.layers.0.self_attn") and k.endswith("weight"))
    w = {key: quantize(state[key], QuantizerConfig(2, 32, QuantMethod.RTN)).dequantize()}
    check = measure_plan(loaded, probe, w)
    kl, agreement = _probe_from_zero(loaded, probe, w)
    assert check.flips == pytest.approx(1.0 - agreement, abs=1e-12)  # the pooled share is the probe's own agreement
    assert check.delta_kl == pytest.approx(kl, rel=1e-9)
    assert check.stderr >= 0.0 and check.upper == pytest.approx(check.flips + check.stderr)
    assert torch.equal(loaded.model.lm.state_dict()[key], state[key])  # the model is restored


def _probe_from_zero(loaded, probe, weights):
    from medmoe_edge.calibration.sensitivity import swap

    old = swap(loaded, weights)
    try:
        return probe.measure(0)
    finally:
        swap(loaded, old)


@pytest.mark.parametrize("mode", [SensitivityMode.MEASURED, SensitivityMode.PROXY])
def test_the_plan_holds_the_guard_as_a_whole_or_is_the_least_flipping_found(demo, stats_dir, mode):
    loaded, stats, probe = demo
    guard = 0.995
    res = make_plan(loaded, stats, "torch", method=QuantMethod.GPTQ, avg_bits=4.0, router_guard=guard, sensitivity=mode, cache_dir=stats_dir)
    r = res.routing
    assert r is not None and r.allocation is res.allocation
    state = loaded.model.lm.state_dict()
    again = measure_plan(loaded, probe, {k: q.dequantize() for k, q in res.codes.items()})
    assert again.flips == pytest.approx(r.check.flips) and again.delta_kl == pytest.approx(r.check.delta_kl, rel=1e-6)
    assert r.held == (r.check.upper <= 1.0 - guard + 1e-12)
    assert res.allocation.nbytes <= res.allocation.budget
    if mode is SensitivityMode.PROXY and r.measured_picks:  # the estimated plan failed: every pick that can move a router carries its measured agreement
        book = CodeBook(stats, QuantMethod.GPTQ, 32)
        moving = [(u, c) for u, c in zip(res.allocation.units, res.allocation.picks) if not c.precision.is_float and moves_routes(u, (0, 2))]
        assert moving and r.measured_picks >= len(moving) and r.pick_probes == r.measured_picks  # one probe each
        for u, c in moving:
            _kl, agree = probe_one(loaded, probe, u, {k: book.codes_for(k, state[k], c.precision).dequantize() for k in u.keys})
            assert c.router_agreement == pytest.approx(agree)
    elif mode is SensitivityMode.PROXY:  # the plan the estimates gave held whole, at the first measurement
        assert r.held and r.rounds == 1


@pytest.fixture(scope="module")
def estimated(demo, stats_dir):
    """The demo's units with proxy (estimated) sensitivities at 4 bits per weight, and their dequantizer."""
    from medmoe_edge.allocation import budget_from
    from medmoe_edge.calibration.sensitivity import estimate

    loaded, stats, probe = demo
    book = CodeBook(stats, QuantMethod.GPTQ, 32)
    units = tuple(estimate(loaded, stats, BACKENDS["torch"], book, cache_dir=stats_dir, probe=probe))
    state = loaded.model.lm.state_dict()
    deq = lambda u, c: {k: book.codes_for(k, state[k], c.precision).dequantize() for k in u.keys}  # noqa: E731
    return units, budget_from(units, avg_bits=4.0), deq


def test_estimated_picks_are_measured_only_once_the_plan_they_gave_fails_whole(demo, estimated):
    """With estimated agreements the plan is measured whole first: where it holds, no pick is probed
    (at full size those probes were the largest part of `quantize`); where it fails, the route-moving
    picks are measured end to end and the search starts again from the knapsack's plan, as when
    they are measured first."""
    loaded, _stats, probe = demo
    units, budget, deq = estimated
    moving = lambda r: [u.name for u, c in zip(r.allocation.units, r.allocation.picks) if not c.precision.is_float and moves_routes(u, (0, 2))]  # noqa: E731
    loose = hold_routes(loaded, probe, units, budget, 0.2, deq, estimated=True)
    assert loose.held and loose.rounds == 1 and loose.measured_picks == 0 and moving(loose)
    eager = hold_routes(loaded, probe, units, budget, 0.2, deq, estimated=True, measure_picks_first=True)
    assert eager.measured_picks >= len(moving(eager)) > 0
    tight = hold_routes(loaded, probe, units, budget, 1e-4, deq, estimated=True, max_cost=float("inf"))
    assert tight.measured_picks >= len(moving(tight)) > 0  # failed whole (only then are picks probed), then measured
    assert tight.pick_probes == tight.measured_picks  # one probe each
    grouped = hold_routes(loaded, probe, units, budget, 1e-4, deq, estimated=True, max_cost=float("inf"), grouped=True)  # the benchmark's other way
    assert grouped.measured_picks >= len(moving(grouped)) > 0 and grouped.pick_probes > 0
    for u, c in zip(tight.allocation.units, tight.allocation.picks):  # the measured agreements replaced the estimates
        if u.name in moving(tight):
            assert c.router_agreement == pytest.approx(probe_one(loaded, probe, u, deq(u, c))[1])


@pytest.fixture(scope="module")
def superadditive(demo, stats_dir):
    """The demo fixture's measured units at 4 bits per weight, the knapsack's plan without a flip
    bound, and a flip share its units' sum meets and the whole plan does not."""
    loaded, stats, probe = demo
    from medmoe_edge.allocation import budget_from, solve_routed
    from medmoe_edge.calibration.sensitivity import measure

    book = CodeBook(stats, QuantMethod.GPTQ, 32)
    measured = tuple(measure(loaded, stats, BACKENDS["torch"], book, cache_dir=stats_dir))
    budget = budget_from(measured, avg_bits=4.0)
    state = loaded.model.lm.state_dict()
    deq = lambda u, c: {k: book.codes_for(k, state[k], c.precision).dequantize() for k in u.keys}  # noqa: E731
    plain = solve_routed(measured, budget, 1.0)
    summed, whole = route_flips(plain), measure_plan(loaded, probe, plan_weights(plain, deq))
    assert whole.upper > summed, f"the fixture's plan flips {whole.upper:.4f} whole and {summed:.4f} by its units: no super-additivity to test"
    return measured, budget, deq, plain, max(summed, whole.upper * 0.6)


def test_a_plan_whose_units_sum_under_the_guard_but_flip_over_it_whole_is_searched_past(demo, superadditive):
    """Flips do not add: the knapsack's plan meets the guard by its units' summed flips and fails it
    measured whole; `hold_routes` must measure it, fail it, and end on a plan that holds."""
    loaded, _stats, probe = demo
    measured, budget, deq, plain, allowed = superadditive
    r = hold_routes(loaded, probe, measured, budget, allowed, deq, estimated=False, max_cost=float("inf"))
    assert r.rounds >= 2  # the knapsack's own plan was measured and failed
    assert r.held and r.check.upper <= allowed
    assert route_flips(r.allocation) <= r.target + 1e-12  # a knapsack plan at the target it reports
    assert r.allocation.nbytes <= budget
    assert r.allocation.picks != plain.picks


def test_a_guard_that_costs_more_kl_than_allowed_keeps_the_knapsacks_plan_and_says_so(demo, superadditive):
    from medmoe_edge.allocation import solve_routed

    loaded, _stats, probe = demo
    measured, budget, deq, _plain, allowed = superadditive
    held = hold_routes(loaded, probe, measured, budget, allowed, deq, estimated=False, max_cost=float("inf"))
    assert held.held and held.rounds >= 2
    first = measure_plan(loaded, probe, plan_weights(solve_routed(measured, budget, allowed), deq))
    cost = held.check.delta_kl / first.delta_kl
    kept = hold_routes(loaded, probe, measured, budget, allowed, deq, estimated=False, max_cost=cost * 0.5)
    assert not kept.held and kept.hold_cost == pytest.approx(cost) and kept.check.upper > allowed
    assert kept.check.delta_kl == pytest.approx(first.delta_kl)  # the knapsack's own plan


def test_picks_are_measured_in_groups_split_only_while_they_flip_many_routes(demo, estimated):
    """Group testing (`measure_picks`): a group's flips are measured together, never summed from
    estimates; it is split down to single picks only while it flips more than the share given, and
    a single pick's agreement is its own probe's."""
    from medmoe_edge.allocation import solve_routed

    loaded, _stats, probe = demo
    units, budget, deq = estimated
    plan = solve_routed(units, budget, 1.0)  # no flip bound: its low-bit picks flip routes
    picks = [(u, c) for u, c in zip(units, plan.picks) if not c.precision.is_float and moves_routes(u, (0, 2))]
    assert len(picks) >= 4
    key = picks[0][0].keys[0]
    before = loaded.model.lm.state_dict()[key].clone()
    alone, n = measure_picks(loaded, probe, picks, deq, None)
    assert n == len(picks)
    assert alone == [pytest.approx(probe_one(loaded, probe, u, deq(u, c))[1]) for u, c in picks]
    together, n = measure_picks(loaded, probe, picks, deq, 1.0)  # never split: one probe, from layer 0 (the projector's)
    assert n == 1
    weights = {k: v for u, c in picks for k, v in deq(u, c).items()}
    flips = 1.0 - _probe_from_zero(loaded, probe, weights)[1]
    assert flips > 0 and sum(1.0 - a for a in together) == pytest.approx(flips)  # the group's measured flips, shared out
    est = [1.0 - c.router_agreement for _u, c in picks]
    assert [1.0 - a for a in together] == pytest.approx([flips * e / sum(est) for e in est])  # in proportion to the estimates
    assert measure_picks(loaded, probe, picks, deq, 1.0, together=flips) == (together, 0)  # measured already (the whole plan): not again
    split, n = measure_picks(loaded, probe, picks, deq, 0.0)  # any group that flips a route is split, down to its picks
    assert n == 1 + len(picks)  # the group flips more than 0 per pick: measured pick by pick at once, not halved
    assert split == pytest.approx(alone)
    halved, n = measure_picks(loaded, probe, picks, deq, flips / len(picks))  # more than its share per pick only together: halved
    assert 1 < n < 2 * len(picks)
    for a, b in zip(halved, alone):  # a pick is measured alone, or shares the few flips of a group of its
        assert a == pytest.approx(b) or 1.0 - a <= flips / len(picks) + 1e-12
    assert torch.equal(loaded.model.lm.state_dict()[key], before)  # the model is restored
