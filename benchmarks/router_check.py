"""The router check's per-pick probes: measured first or only when needed, one by one or in groups (`calibration.routing`).

With estimated (`--sensitivity proxy`) sensitivities, `quantize` used to measure, end to end, the
router agreement of every picked unit that can move a router before it measured the plan whole;
at full size those probes are most of its time (docs/QUANTIZATION.md, "Full size"). Now the plan
the estimates gave is measured whole first and the picks are probed only when it fails. This
script makes both kinds of plan from the same statistics and estimates, on the demo model, at
several budgets and for two backends (torch: int2/3/4/8 per group; gguf: ggml types, the stacked
experts per layer × projection), and judges them on held-out teacher-forced eval sequences that
neither the statistics nor the probes saw (KL of answer logits, router agreement), with what the
router check measured and how long the planning took (the estimates cached beforehand, so the
time is the codes, the solves and the router check's measurements).

`--compare grouped` compares, the same way, the picks measured one probe each (as after the first
comparison) against measured in groups that are split only while they flip many routes
(`calibration.routing.measure_picks`): at full size a probe of a low layer's pick is a full pass.
The groups took more probes here, so `quantize` kept one probe per pick.

    python benchmarks/router_check.py [--compare first|grouped] [--calib-per-domain 16 64] [--held-out 16] [--work DIR] [--no-doc]

Writes docs/QUANTIZATION.md (the block between its markers: `router_check`, `router_check-grouped`) and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"
BUDGETS = (("uniform int3 GPTQ bytes", "int3", None), ("3.0 bits", None, 3.0), ("3.25 bits", None, 3.25), ("3.5 bits", None, 3.5), ("4.0 bits", None, 4.0), ("4.5 bits", None, 4.5))
# per comparison: (hold_routes' keyword arguments, label) before and now
WAYS = {
    "first": (({"measure_picks_first": True, "grouped": False}, "picks first (before)"), ({"grouped": False}, "picks on failure (now)")),
    "grouped": (({"grouped": False}, "one probe per pick (kept)"), ({"grouped": True}, "in groups (not adopted)")),
}


def rows_for(work: Path, per_domain: int, held_out_per_domain: int, backends: list[str], ways: tuple) -> list[str]:
    import torch

    import medmoe_edge.quantization as quantization
    from medmoe_edge.allocation import BACKENDS, Allocation
    from medmoe_edge.calibration import routing
    from medmoe_edge.calibration.collect import select
    from medmoe_edge.calibration.sensitivity import CodeBook, GgmlCodeBook, Probe, SensitivityMode, estimate, units_for
    from medmoe_edge.calibration.sets import resolve_set
    from medmoe_edge.calibration.teacher import prepare
    from medmoe_edge.checkpoint import load_model, resolve_model_dir
    from medmoe_edge.errors import InputError
    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.quantizer import packed_bytes

    torch.set_num_threads(2)
    stats_dir = work / f"demo-stats-{per_domain}"
    stats, _ = quantization.calibrate("demo", stats_dir, per_domain=per_domain)
    loaded = load_model(resolve_model_dir("demo"))
    samples, root = resolve_set("eval")
    held_out = Probe(loaded, prepare(loaded, select(samples, None, held_out_per_domain)[0], root))
    torch_b = BACKENDS["torch"]
    int3 = sum(packed_bytes(u.params, 3, 32, scale_bytes=torch_b.scale_bytes, zero_point=torch_b.zero_point) for u in units_for(loaded, torch_b))
    hold = routing.hold_routes
    rows = []
    for backend in backends:
        method = QuantMethod.GPTQ if backend == "torch" else quantization.parse_method(None, "gguf")
        b = BACKENDS[backend]
        book = GgmlCodeBook(stats, method) if b.name == "gguf" else CodeBook(stats, method, 32, symmetric=not b.zero_point)
        estimate(loaded, stats, b, book, cache_dir=stats_dir)  # as make_plan builds its book: the estimates cached once, outside the times below
        for label, bytes_of, avg in BUDGETS:
            got: dict[int, tuple] = {}
            for n, (kwargs, _way) in enumerate(ways):
                quantization.hold_routes = functools.partial(hold, **kwargs)  # make_plan's own call, both ways
                try:
                    t = time.perf_counter()
                    res = quantization.make_plan(loaded, stats, backend, method=method, budget_mb=int3 / 1e6 if bytes_of else None, avg_bits=avg, sensitivity=SensitivityMode.PROXY, cache_dir=stats_dir)
                    took = time.perf_counter() - t
                except InputError as e:  # a budget the backend's smallest types (or the router guard) cannot meet
                    got[n] = (str(e).split(":")[0],)
                    continue
                finally:
                    quantization.hold_routes = hold
                old = quantization.fake_quantize(loaded, res.codes)
                try:
                    kl, agree = held_out.measure()
                finally:
                    quantization.restore(loaded, old)
                got[n] = (res, kl, agree, took)
            if any(len(v) == 1 for v in got.values()):
                rows.append(f"| {per_domain} | {backend} | {label} | refused: {next(v for v in got.values() if len(v) == 1)[0]} | | | | | | | |")
                continue
            same = [c.precision for c in got[0][0].allocation.picks] == [c.precision for c in got[1][0].allocation.picks]  # the types (agreements differ: measured or estimated)
            for n, (_kwargs, way) in enumerate(ways):
                res, kl, agree, took = got[n]
                r = res.routing
                a: Allocation = res.allocation
                rows.append(
                    f"| {per_domain} | {backend} | {label} | {way} | {a.bits_per_weight:.2f} | {'same plan' if same else 'another plan'} | {kl:.3e} | {agree:.2%} "
                    f"| {r.check.flips:.2%} ± {r.check.stderr:.2%}, {'held' if r.held else 'not held'} | {r.rounds} / {r.measured_picks} / {r.pick_probes} | {took:.1f} s |"
                )
            print("\n".join(rows[-2:]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=sorted(WAYS), default="first", help="first: picks probed before the plan is measured whole or only when it fails; grouped: one probe per pick or in groups")
    ap.add_argument("--calib-per-domain", type=int, nargs="+", default=[16, 64], help="calibration questions per domain, one statistics set each")
    ap.add_argument("--held-out", type=int, default=16, help="held-out eval sequences per domain judging the plans")
    ap.add_argument("--backends", nargs="+", default=["torch", "gguf"])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    import torch

    t0 = time.time()
    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-router-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ways = WAYS[a.compare]
    rows = [r for n in a.calib_per_domain for r in rows_for(work, n, a.held_out, a.backends, ways)]
    lines = [
        f"Command: `python benchmarks/router_check.py{' --compare grouped' if a.compare == 'grouped' else ''} --calib-per-domain {' '.join(map(str, a.calib_per_domain))} --held-out {a.held_out} --backends {' '.join(a.backends)}` "
        f"(torch {torch.__version__}; demo model; proxy sensitivities, GPTQ (torch) and the gguf backend's default method; router guard 99.5 %; "
        f"plans judged on {4 * a.held_out} held-out teacher-forced eval sequences; {(time.time() - t0) / 60:.0f} min). "
        "Router check: the plan's flipped routes on the calibration probe sequences, plus one standard error, held at ≤ 0.5 %; "
        "measured: plans measured whole / estimated picks measured end to end / probes that took; time: `make_plan` (codes at every candidate type, the estimates read from their cache, the router check).",
        "",
        "| calibration questions per domain | backend | budget | the picks probed | bits/weight | plans | held-out KL | held-out routing | router check | measured | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    tag = "router_check" if a.compare == "first" else "router_check-grouped"
    publish_block(DOC, f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->", lines, "Per-expert quantization", publish=not a.no_doc)


if __name__ == "__main__":
    main()
