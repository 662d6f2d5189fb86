"""Router agreement of a whole plan, measured, and held under the guard (EAQuant).

The knapsack holds the plan's *summed* per-unit flips under the guard's share
(`allocation.solve_routed`), but flips do not add: on the demo, a plan whose units flipped
0.33 % of routes one at a time flipped 0.71 % together (a route flips when the perturbations
of every layer below its router, added up, cross its margin), and the proxy's flips, scaled
from one probe per class by output energy, missed a layer-0 expert that alone flips 0.48 %
(its energy is small; the routes it moves sit near their margins). The whole plan's flips on
the probe sequences do track those on eval questions neither saw (0.64-0.71 % against
0.63-0.66 % on 200 eval questions), the per-unit sums do not (docs/QUANTIZATION.md).

So after the knapsack, `hold_routes`:

1. (proxy sensitivities) measures the plan the estimates gave whole (step 2); only when it fails
   does it measure, end to end, the router agreement of every pick that can move a router (a
   unit below the last MoE layer's router) and has only an estimate, put it into the unit's
   choice and solve again, until every such pick is measured. A plan that holds as a whole meets
   the guard however its units' flips were estimated, and at full size one probe per pick was
   the largest part of `quantize` (90 of them: 2.9 h of a projected 5.4 h for a full-size StableLM
   on 2 cores, 2.5 h without them). On the demo (24 budgets × backends × calibration sizes) the
   guard held in the same cases either way, 21 plans were the same and the other 3 had a lower
   held-out KL; at 8 full-size layers the estimates' plan held at once, the same plan as with the
   picks probed (docs/QUANTIZATION.md, "The router check's probes"). Each pick takes one probe
   of its own: measuring them in groups (`measure_picks` with `grouped=True`, each group split
   only while it flips more than `SPLIT_SHARE` of the guard's allowance) took more probes, not
   fewer, on the demo (328 against 314 over 24 cases) and at 8 full-size layers (34 for 27
   picks), since there most picks flip a route on their own; it is kept for that comparison
   (docs/QUANTIZATION.md, "... in groups: measured, not adopted");
2. measures the whole plan on the probe sequences (one pass): its flipped share F and the
   standard error of F across sequences (routes of one sequence flip together);
3. holds F + one standard error ≤ the guard's share, so the bound carries to questions the probe
   never saw: when a plan flips more, the summed-flip target of the knapsack is scaled by
   (allowed / measured), the plan's observed super-additivity, until one holds; then the target
   is bisected between the last plan that failed and the first that held;
4. when the knapsack's own plan failed, also measures its neighbours (one route-moving unit a
   type up or down, the rest solved again): flips are not additive, and on the demo most of them
   are one near-tied route of the system prompt, which every request shares (position 14: one
   route in 212 of each sequence), kept or flipped by the mix of perturbations below it.
   Of the plans that held, the one with the least predicted ΔD is kept (if none held: the one
   that flipped least) — unless its KL on the probe sequences is more than `MAX_KL_COST` times
   the knapsack's own plan's: then the knapsack's plan is kept, marked not held, with that cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from medmoe_edge.allocation import Allocation, Choice, Unit, route_flips, solve_routed
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import InputError
from medmoe_edge.tensor_ids import checkpoint_id
from medmoe_edge.vocab import Component

from .sensitivity import Deferred, Probe, first_layer, swap

ROUNDS = 8  # knapsack solves along the flip target at most; each new plan is measured once (one pass over the probe sequences)
NEIGHBOURS = 24  # plans near the knapsack's own measured at most, when it fails
# Routes are a means (EAQuant), the answer distribution the end: a plan that holds the guard is
# kept only while its KL on the probe sequences is at most this multiple of the knapsack's own
# plan's. On the demo holding it cost 0.9-1.3x; GGUF's coarse units at 3.5 bits, 3x (one near-tied
# route of the system prompt kept at the price of everything else), and there the knapsack's
# plan is kept and the cost reported.
MAX_KL_COST = 1.5
# A group of picks measured together is split (each half measured again) only while it flips more
# than this share of the guard's allowance; below it, its measured flips are shared out among its
# picks in proportion to their estimates (`measure_picks`).
SPLIT_SHARE = 0.125
Dequantize = Callable[[Unit, Choice], dict[str, torch.Tensor | Deferred]]  # a unit's weights at a choice (made now or when their layer runs)


@dataclass(frozen=True)
class PlanCheck:
    """One whole-plan measurement on the probe sequences.

    Attributes:
        delta_kl: mean KL of answer logits against fp32.
        flips: share of (real position, MoE layer) top-1 routes changed.
        stderr: standard error of `flips` across the probe sequences.
    """

    delta_kl: float
    flips: float
    stderr: float

    @property
    def agreement(self) -> float:
        return 1.0 - self.flips

    @property
    def upper(self) -> float:
        """The flipped share the guard is held against: one standard error above the measured."""
        return self.flips + self.stderr


@dataclass(frozen=True)
class RoutedPlan:
    """The allocation `hold_routes` settled on, with what it measured.

    Attributes:
        allocation: the plan.
        units: the units with the router agreements measured for their picks put in.
        check: the plan measured whole on the probe sequences.
        target: the summed-flip target of the solve that made the plan.
        rounds: whole-plan measurements made.
        measured_picks: picks whose estimated agreement was replaced by a measured one.
        held: whether `check.upper` meets the guard.
        pick_probes: end-to-end probes made to measure those picks (`measure_picks`).
        hold_cost: when the plan is the knapsack's own, kept although it fails the guard because
            the best plan that holds it costs more than `MAX_KL_COST`: that plan's KL over this one's.
    """

    allocation: Allocation
    units: tuple[Unit, ...]
    check: PlanCheck
    target: float
    rounds: int
    measured_picks: int
    held: bool
    pick_probes: int = 0
    hold_cost: float | None = None


def moves_routes(unit: Unit, moe_layers: tuple[int, ...]) -> bool:
    """Whether quantizing `unit` can change any router's input: it acts below the last MoE layer's
    router. An FFN, expert or meta expert of layer L feeds layer L+1 on; attention, the embedding
    and the projector feed their own layer's router too; the lm_head none."""
    if not moe_layers:
        return False
    comps = {checkpoint_id(k).component for k in unit.keys}
    if comps == {Component.LM_HEAD}:
        return False
    start = first_layer(unit, max(moe_layers) + 1)
    ffn_like = comps <= {Component.FFN, Component.EXPERT, Component.META}
    return start < max(moe_layers) if ffn_like else start <= max(moe_layers)


def plan_weights(allocation: Allocation, dequantize: Dequantize) -> dict[str, torch.Tensor]:
    """Every quantized matrix of a plan, dequantized (checkpoint key → weight)."""
    out: dict[str, torch.Tensor] = {}
    for u, c in zip(allocation.units, allocation.picks):
        if not c.precision.is_float:
            out.update(dequantize(u, c))
    return out


def measure_plan(loaded: LoadedModel, probe: Probe, weights: dict[str, torch.Tensor]) -> PlanCheck:
    """The model with every weight of a plan swapped in, measured on the probe sequences."""
    old = swap(loaded, weights)
    try:
        logp, routes = probe.run(0)
    finally:
        swap(loaded, old)
    lengths = probe.batch.lengths  # right-padded rows: each sequence's routes are consecutive
    flipped = torch.zeros(len(lengths), dtype=torch.float64)  # flipped routes per sequence, over the MoE layers
    for k in routes:
        flipped += torch.tensor([float(s.sum()) for s in (routes[k] != probe.ref_routes[k]).split(lengths)], dtype=torch.float64)
    n = torch.tensor(lengths, dtype=torch.float64) * len(routes)
    share = float(flipped.sum() / n.sum())
    m = len(lengths)
    # ratio estimator's standard error over sequences (a sequence's routes flip together, not independently)
    se = float(((flipped - share * n) ** 2).sum().sqrt() / n.sum() * (m / (m - 1)) ** 0.5) if m > 1 else 0.0
    return PlanCheck(probe.kl(logp), share, se)


def measure_picks(
    loaded: LoadedModel,
    probe: Probe,
    picks: list[tuple[Unit, Choice]],
    dequantize: Dequantize,
    split_above: float | None,
    together: float | None = None,
) -> tuple[list[float], int]:
    """Router agreements of `picks` (units at their picked choices, with estimated agreements)
    measured end to end, and the number of probes that took.

    `split_above` None: one probe per pick, each from its own layer on. Otherwise by group testing:
    the picks, in order of the layer they start at, are measured together (one probe from the
    lowest of their layers on); a group that flips more than `split_above` of the routes is halved
    and each half measured again, down to single picks, measured exactly (a group that flips more
    than `split_above` per pick is measured pick by pick at once); a group that flips less
    has its measured flips shared out among its picks in proportion to their estimated flips
    (evenly where those are all 0). A probe from a low layer costs about a full pass, and a plan
    that failed at full size had ~90 route-moving picks: where few of them flip many routes this
    would take far fewer probes than one per pick; where most of them do, as on the demo and at 8
    full-size layers, it takes more, so `hold_routes` does not use it by default
    (docs/QUANTIZATION.md, "... in groups"). Every group that flips a noticeable share is resolved
    to its picks, and a group's total is measured, never estimated.
    Flips do not add (module docstring), so a group's share is that of its picks together.
    `together`: the flipped share of all `picks` together where it was measured already (the whole
    plan they are the route-moving picks of); that first probe is then not made again."""
    num_layers = loaded.spec.text.num_layers
    starts = [first_layer(u, num_layers) for u, _c in picks]
    out = [0.0] * len(picks)
    probes = 0

    def flips_of(group: list[int]) -> float:
        nonlocal probes
        weights: dict[str, torch.Tensor | Deferred] = {}
        for i in group:
            weights.update(dequantize(*picks[i]))
        old = swap(loaded, weights)
        try:
            probes += 1
            return 1.0 - probe.measure(min(starts[i] for i in group))[1]
        finally:
            swap(loaded, old)

    order = sorted(range(len(picks)), key=lambda i: (starts[i], picks[i][0].name))
    todo = [[i] for i in order] if split_above is None or len(order) == 1 else [order]
    while todo:
        group = todo.pop()
        flips = together if together is not None and len(group) == len(picks) else flips_of(group)
        if len(group) > 1 and split_above is not None and flips > split_above:
            # halving pays where few of the group's picks flip much; where its flips are more than
            # its picks' count of shares, most of them do (the demo's near-tied routes), and
            # halving would spend up to 2n - 1 probes on what n probes of its picks resolve
            dense = flips > len(group) * split_above
            half = len(group) // 2
            todo += [[i] for i in group] if dense else [group[half:], group[:half]]
            continue
        est = [1.0 - picks[i][1].router_agreement for i in group]
        total = sum(est)
        for i, e in zip(group, est):
            out[i] = 1.0 - flips * (e / total if total > 0 else 1.0 / len(group))
    return out, probes


def _with_agreement(unit: Unit, precision, agreement: float) -> Unit:
    return replace(unit, choices=tuple(replace(c, router_agreement=agreement) if c.precision is precision else c for c in unit.choices))


def hold_routes(
    loaded: LoadedModel,
    probe: Probe,
    units: tuple[Unit, ...],
    budget: int,
    max_flips: float,
    dequantize: Dequantize,
    *,
    estimated: bool,
    rounds: int = ROUNDS,
    max_cost: float = MAX_KL_COST,
    measure_picks_first: bool = False,
    grouped: bool = False,
) -> RoutedPlan:
    """Solve the knapsack with the whole plan's measured flips, plus one standard error, held at
    ≤ `max_flips` where a plan within the budget can (module docstring). `estimated`: the units'
    agreements are proxy estimates, so the picks that can move a router are measured end to end
    once a plan made from the estimates fails the whole-plan check (`measure_picks_first`: before
    the first plan is measured, as `quantize` did until the comparison in benchmarks/router_check.py);
    `grouped`: in groups (`measure_picks`), else one probe per pick (the default: groups took more
    probes where measured, module docstring)."""
    moe_layers = tuple(loaded.spec.moe.layers)
    units = tuple(units)
    measured: set[tuple[str, str]] = set()
    pick_probes = 0  # end-to-end probes made to measure picks (one each, unless grouped)
    checks: dict[tuple, PlanCheck] = {}  # plans measured whole, by picks: different targets often give one plan
    measuring = estimated and measure_picks_first  # else estimated picks are measured once a plan made from them fails whole

    def solve_measured(target: float, pin: tuple[int, Choice] | None = None) -> Allocation:
        """The knapsack at `target` (with unit `pin[0]` held to choice `pin[1]`), its route-moving
        estimated picks measured first."""
        nonlocal units, pick_probes
        while True:
            solving = units if pin is None else tuple(replace(u, choices=(pin[1],)) if i == pin[0] else u for i, u in enumerate(units))
            alloc = solve_routed(solving, budget, target)
            todo = [
                i
                for i, (u, c) in enumerate(zip(units, alloc.picks))
                if measuring and not c.precision.is_float and (u.name, c.precision.value) not in measured and moves_routes(u, moe_layers)
            ]
            if not todo:
                return Allocation(units, alloc.picks, budget)
            together = None
            if grouped:  # a plan already measured whole, all of whose route-moving picks are to be measured: their
                # flips together are the plan's (no other unit moves a route), so that probe is not made again
                whole = checks.get(tuple(c.precision for c in alloc.picks))
                moving = [i for i, (u, c) in enumerate(zip(units, alloc.picks)) if not c.precision.is_float and moves_routes(u, moe_layers)]
                together = whole.flips if whole is not None and todo == moving else None
            now = list(units)
            picks = [(units[i], alloc.picks[i]) for i in todo]
            agreements, probes = measure_picks(loaded, probe, picks, dequantize, split_above=SPLIT_SHARE * max_flips if grouped else None, together=together)
            pick_probes += probes
            for i, agree in zip(todo, agreements):
                u, c = units[i], alloc.picks[i]  # ΔD stays the estimate the other choices are ranked by
                measured.add((u.name, c.precision.value))
                now[i] = _with_agreement(u, c.precision, agree)
                if pin is not None and i == pin[0]:
                    pin = (i, replace(pin[1], router_agreement=agree))
            units = tuple(now)

    best: RoutedPlan | None = None

    def consider(alloc: Allocation, target: float) -> RoutedPlan:
        """Measure a plan whole (once) and keep the best so far: a plan that holds over one that
        does not; of those that hold, the least predicted ΔD (the knapsack's own objective, not the
        probe's KL, which a search over many plans would overfit); of those that do not, the fewest flips."""
        nonlocal best
        picks = tuple(c.precision for c in alloc.picks)
        if picks not in checks:
            checks[picks] = measure_plan(loaded, probe, plan_weights(alloc, dequantize))
        check = checks[picks]
        this = RoutedPlan(alloc, units, check, target, len(checks), len(measured), check.upper <= max_flips + 1e-12, pick_probes=pick_probes)
        if best is None or (this.held, -alloc.predicted_delta if this.held else -check.upper) > (best.held, -best.allocation.predicted_delta if best.held else -best.check.upper):
            best = this
        return this

    # 1. the knapsack's plan; while one fails, ask its units' summed flips for (allowed / measured)
    #    as much, then bisect between the last target that failed and the first that held
    first = consider(solve_measured(max_flips), max_flips)
    if not first.held and estimated and not measuring:  # the estimates misled: measure the picks and start again from the knapsack's plan
        measuring = True
        first = consider(solve_measured(max_flips), max_flips)
    failed, held_at = (None, max_flips) if first.held else (max_flips, None)
    last = first
    for _ in range(rounds - 1):
        if failed is None:
            break
        target = route_flips(last.allocation) * max_flips / last.check.upper if held_at is None else (failed + held_at) / 2
        last = consider(solve_measured(target), target)
        failed, held_at = (failed, target) if last.held else (target, held_at)
    # 2. neighbours of the knapsack's own plan: one route-moving unit a type up or down, the rest
    #    solved again. Which routes flip is not additive (a near-tie flips under one mix of
    #    perturbations and not under another), so plans near the optimum that hold are looked for
    #    where the Lagrangian path above only finds ones further away.
    if not first.held:
        for i, (u, c) in enumerate(zip(units, first.allocation.picks)):
            if len(checks) >= rounds + NEIGHBOURS or not moves_routes(u, moe_layers):
                continue
            by_size = sorted(units[i].choices, key=lambda x: x.nbytes)
            at = next(j for j, x in enumerate(by_size) if x.precision is c.precision)
            for alt in by_size[max(at - 1, 0) : at] + by_size[at + 1 : at + 2]:
                try:
                    consider(solve_measured(max_flips, (i, alt)), max_flips)
                except InputError:  # that type leaves the rest too few bytes
                    continue
    assert best is not None
    if best.held and not first.held and best.check.delta_kl > max_cost * first.check.delta_kl:
        # holding the routes would cost more of the answer distribution than it keeps: the knapsack's plan, and what holding cost
        return replace(first, rounds=len(checks), measured_picks=len(measured), pick_probes=pick_probes, hold_cost=best.check.delta_kl / max(first.check.delta_kl, 1e-30))
    return replace(best, rounds=len(checks), measured_picks=len(measured), pick_probes=pick_probes)


__all__ = ["MAX_KL_COST", "NEIGHBOURS", "ROUNDS", "SPLIT_SHARE", "PlanCheck", "RoutedPlan", "hold_routes", "measure_picks", "measure_plan", "moves_routes", "plan_weights"]
