"""`calibrate` and `quantize` on a full-size checkpoint, on this machine (24 GB, 2 cores): a random
Med-MoE of a released variant's shapes (`--preset`, default stablelm: 24 layers, hidden 2048, 12
MoE layers of 4 experts + meta, the whole 100,352-row vocabulary, the CLIP ViT-L/14-336 tower),
stored in bf16 as the released checkpoints are. Each command runs in its own process (wall time,
peak RSS), as a user would run it:

1. `medmoe-edge calibrate --per-domain N` (statistics over N calibration questions per domain);
2. what `quantize --format onnx --sensitivity proxy` would take, projected from its parts timed
   on this checkpoint in one process (`--quantize` runs it instead, hours on 2 cores at full
   depth; `--quantize --project` both, to check the projection against the run):
   - the probe setup (one reference pass over the kept sequences);
   - one probe's time as a + b × (layers it runs), from probes started at the last layer and at
     the middle one, summed over the probe classes the plan has (one per layer × component,
     each started at its own layer: quadratic in depth);
   - the whole-plan router check: one pass of the plan the estimates gave; only when that plan
     fails the guard whole does it measure each picked unit that can move a router (at or below
     the last MoE layer) end to end, projected at one probe per such unit (a re-solve that picks
     another type for one adds another), and the plan again: both totals are given, and a run's
     manifest (`picks_measured`, `pick_probes`) says which one it was;
   - GPTQ codes at int4 and int8 plus the energies tr(ΔW H ΔWᵀ) of one MoE layer and one dense
     layer, times the layers of each kind, plus the lm_head's and the projector's;
3. with `--quantize`: `medmoe-edge quantize --format onnx --sensitivity proxy --avg-bits B
   --trace-questions 0 --no-verify` (on random weights the check measures nothing, and the trace
   is hours at this size), then `medmoe-edge run` of the bundle in ONNX Runtime (one question, a
   few tokens); what `quantize` prints (the plan's bits, the groups read back from the written
   files against the plan's prediction, the candidate codes held to a cap) goes into the table.

`--reuse` keeps the statistics, the projection's timed parts, the bundle and the step timings
(`WORK/STEP.json`) of an earlier run in `--work` and times again only what is missing. A
`quantize` that finds its proxy sensitivities cached in the statistics (an earlier run that
stopped after them) is said to have, with that run's time where `WORK/sensitivities.json`
records it, and is not compared with the projection.

The weights are random, so sensitivities and answers say nothing about a trained model: this
measures time and memory at full size. `--layers N` keeps the preset's every dimension but the
depth (MoE on the even layers, as released): where a real `quantize` fits in a session, the
projection is checked against it there.

    python benchmarks/full_size_quantize.py [--preset stablelm] [--layers N] [--per-domain 4] [--project] [--quantize] [--avg-bits 5.5] [--work DIR] [--reuse] [--no-doc]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402
from onnx_export_memory import full_size_checkpoint  # noqa: E402
from quantization_proxy import CLI, quantize_phases, run_timed  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"
MARK = "full_size_quantize"
# what `quantize` prints that the table quotes, by the start of the line
QUOTED = ("planned matrices:", "quantized groups read back", "the candidate codes", "whole-plan routing", "delta-from-meta coding")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def timed_step(work: Path, name: str, cmd: list[str], reuse: bool) -> tuple[float, int]:
    """`run_timed(cmd)` with its log in WORK/NAME.log and its (wall, peak RSS) kept in
    WORK/NAME.json; with `reuse`, an earlier run's are read back instead of running it again."""
    record = work / f"{name}.json"
    if reuse and record.is_file():
        wall, rss = json.loads(record.read_text())
        print(f"{name}: reusing the run in {work} ({wall / 60:.1f} min)", flush=True)
        return wall, rss
    print("running", " ".join(cmd[1:]), flush=True)
    wall, rss = run_timed(cmd, work / f"{name}.log")
    record.write_text(json.dumps([wall, rss]))
    return wall, rss


def _router_check(bundle: Path) -> dict:
    """The whole-plan router check `quantize` recorded in the bundle's manifest."""
    return json.loads((bundle / "manifest.json").read_text())["extra"]["quantization"]["router_check"]


def _quoted(log: Path, starts: tuple[str, ...]) -> list[str]:
    return [ln.strip() for ln in log.read_text().splitlines() if ln.strip().startswith(starts)]


def project(ckpt: Path, stats_dir: Path, out: Path) -> None:
    """Time the parts of `quantize --format onnx --sensitivity proxy` (module docstring, 2) and
    write them to `out` as JSON; run in a child process (its peak RSS is the loaded model's)."""
    from medmoe_edge.allocation import BACKENDS
    from medmoe_edge.calib_stats import CalibStats
    from medmoe_edge.calibration.routing import moves_routes
    from medmoe_edge.calibration.sensitivity import CodeBook, Probe, first_layer, offered_types, output_energy, probe_class, units_for
    from medmoe_edge.checkpoint import load_model
    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.vocab import Precision

    t = time.perf_counter()
    loaded = load_model(ckpt, keep_stored=True)
    stats = CalibStats.load(stats_dir)
    load_s = time.perf_counter() - t
    backend, layers = BACKENDS["onnx"], loaded.spec.text.num_layers
    units = units_for(loaded, backend)
    offered = offered_types(units, stats, backend)
    starts = {}  # probe class -> the layer its probe starts at
    for u in units:
        if offered[u.name]:
            starts.setdefault(probe_class(u), first_layer(u, layers))
    t = time.perf_counter()
    probe = Probe.from_stats(loaded, stats)
    setup_s = time.perf_counter() - t
    timed = {}
    for start in (layers, layers // 2):
        t = time.perf_counter()
        probe.measure(start)
        timed[start] = time.perf_counter() - t
    per_layer = (timed[layers // 2] - timed[layers]) / (layers - layers // 2)
    probes_s = sum(timed[layers] + per_layer * (layers - s) for s in starts.values())
    moving = [first_layer(u, layers) for u in units if offered[u.name] and moves_routes(u, tuple(loaded.spec.moe.layers))]
    route_s = sum(timed[layers] + per_layer * (layers - s) for s in moving)
    # codes + energies, by the layers' kinds: one MoE layer and one dense layer timed
    state = loaded.model.lm.state_dict()
    moe = set(loaded.spec.moe.layers)
    groups = {"moe": min(moe), "dense": min(set(range(layers)) - moe), "other": None}
    codes_s = {}
    for kind, layer in groups.items():
        book = CodeBook(stats, QuantMethod.GPTQ, 32, symmetric=not backend.zero_point)  # a layer's GPTQ factorisations shared as in quantize
        keys = [k for u in units for k in u.keys if offered[u.name] and (f".layers.{layer}." in k if layer is not None else ".layers." not in k)]
        t = time.perf_counter()
        for k in keys:
            for p in (Precision.INT4, Precision.INT8):
                output_energy(stats, k, state[k], book.codes_for(k, state[k], p).dequantize())
        codes_s[kind] = time.perf_counter() - t
    n_moe, n_dense = len(moe), layers - len(moe)
    codes_total = codes_s["moe"] * n_moe + codes_s["dense"] * n_dense + codes_s["other"]
    out.write_text(json.dumps({
        "load_s": load_s, "setup_s": setup_s, "probe_classes": len(starts), "sequences": len(probe.sequences),
        "probe_last_s": timed[layers], "probe_middle_s": timed[layers // 2], "per_layer_s": per_layer, "probes_s": probes_s,
        "route_moving_units": len(moving), "route_probes_s": route_s,
        "codes_moe_layer_s": codes_s["moe"], "codes_dense_layer_s": codes_s["dense"], "codes_other_s": codes_s["other"], "codes_s": codes_total,
        "moe_layers": n_moe, "dense_layers": n_dense, "full_pass_s": timed[layers] + per_layer * layers,
    }, indent=1))


# the projection's child process: `project(ckpt, stats, out)`
PROJECT = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from pathlib import Path; from full_size_quantize import project; project(*map(Path, sys.argv[1:4]))"


def checkpoint(work: Path, preset: str, layers: int | None) -> Path:
    """The random bf16 checkpoint: the preset's own (`onnx_export_memory.full_size_checkpoint`), or
    with `layers` decoder layers and every other dimension the preset's."""
    if layers is None:
        return full_size_checkpoint(work, preset)
    ckpt = work / f"{preset}-{layers}l-bf16"
    if not (ckpt / "config.json").is_file():
        make = (
            "import dataclasses; from pathlib import Path; from medmoe_edge.presets import PRESETS, Preset; from medmoe_edge.random_init import write_random_checkpoint; "
            f"s = PRESETS[Preset({preset!r})]; s = dataclasses.replace(s, text=dataclasses.replace(s.text, num_layers={layers}), moe=dataclasses.replace(s.moe, layers=tuple(range({layers}))[::2])); "
            f"write_random_checkpoint(s, Path({str(ckpt)!r}), dtype='bfloat16', full_vocab=True)"
        )
        print("making", ckpt, flush=True)
        run_timed([sys.executable, "-c", make], work / f"{ckpt.name}.log")
    return ckpt


def quantize_rows(work: Path, ckpt: Path, stats: Path, avg_bits: float, reuse: bool) -> tuple[list[str], float | None]:
    """`quantize` run for real, then `run` of its bundle in ONNX Runtime: table rows and quoted
    lines, and the seconds of its planning step (codes, sensitivities, allocation; None where the
    sensitivities came from the cache of an earlier run, `WORK/sensitivities.json` its time)."""
    from medmoe_edge.calibration.sets import resolve_set

    bundle = work / "bundle-onnx"
    inputs = work / "quantize-inputs.json"  # what the run found in place: its sensitivities cached by an earlier run, or not
    if not (reuse and (work / "quantize.json").is_file()):
        shutil.rmtree(bundle, ignore_errors=True)
        inputs.write_text(json.dumps({"sensitivities_cached": any(stats.glob("sensitivity-*.json"))}))
    cached = inputs.is_file() and json.loads(inputs.read_text())["sensitivities_cached"]
    quantize = [CLI, "quantize", "--model", str(ckpt), "--format", "onnx", "--stats", str(stats), "--sensitivity", "proxy", "--avg-bits", f"{avg_bits:g}", "--trace-questions", "0", "--no-verify", "--out", str(bundle)]
    wall, rss = timed_step(work, "quantize", quantize, reuse)
    phases = quantize_phases((work / "quantize.log").read_text())
    samples, root = resolve_set("eval")
    run = [CLI, "run", "--model", str(bundle), "--runtime", "onnxruntime", "--image", str(root / samples[0].image), "--question", samples[0].question, "--max-new-tokens", "8"]
    run_wall, run_rss = timed_step(work, "run", run, reuse)
    written = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    planning = sum(secs for what, secs in phases.items() if what.startswith(("gptq codes", "rtn codes")))
    check = _router_check(bundle)
    earlier = work / "sensitivities.json"  # (wall, peak RSS) of the earlier run that cached them, where recorded
    if cached:
        took = f", which stopped after them: {json.loads(earlier.read_text())[0] / 60:.1f} min, not counted above" if earlier.is_file() else ""
        planning = None  # not the planning step the projection projects
    return [
        f"| `quantize --format onnx --sensitivity proxy --avg-bits {avg_bits:g} --trace-questions 0 --no-verify` | {wall / 60:.1f} min | **{_gib(rss)}** |",
        *(f"| `quantize`: {what} | {secs / 60:.1f} min | |" for what, secs in phases.items()),
        f"| `run --runtime onnxruntime --max-new-tokens 8` on the bundle ({written / 1e9:.2f} GB) | {run_wall / 60:.1f} min | {_gib(run_rss)} |",
        "",
        *(f"- quantize printed: {ln}" for ln in _quoted(work / "quantize.log", QUOTED)),
        f"- the bundle's manifest: the router check measured {check['plans_measured']} plan(s) whole and {check['picks_measured']} estimated picks end to end"
        + (f" in {check['pick_probes']} probes" if "pick_probes" in check else ""),
        *([f"- the proxy sensitivities were read from the statistics folder's cache, written by an earlier run{took}"] if cached else []),
    ], planning


def projection_rows(work: Path, ckpt: Path, stats: Path, reuse: bool) -> tuple[list[str], dict[bool, float]]:
    """The parts of `quantize` timed in a child process, and the totals they project (not run);
    and the seconds projected for its planning step (all but the load), by whether the plan the
    estimates gave held whole (True: no pick probed) or not."""
    out = work / "projection-parts.json"
    wall, rss = timed_step(work, "projection", [sys.executable, "-c", PROJECT, str(ckpt), str(stats), str(out)], reuse and out.is_file())
    j = json.loads(out.read_text())
    held = j["setup_s"] + j["probes_s"] + j["codes_s"] + j["full_pass_s"]
    planning = {True: held, False: held + j["route_probes_s"] + j["full_pass_s"]}  # failed whole: its picks probed, the plan measured again
    m = lambda s: f"{s / 60:.1f} min"  # noqa: E731
    return [
        f"| `quantize`'s parts, timed in one process (below) | {m(wall)} | {_gib(rss)} |",
        "",
        f"What `quantize --format onnx --sensitivity proxy` would take, **projected from those parts, not run**:",
        "",
        "| part | measured | projected |",
        "|---|---|---|",
        f"| load the checkpoint (matrices kept) and the statistics | {m(j['load_s'])} | {m(j['load_s'])} |",
        f"| probe setup: the reference over the {j['sequences']} kept sequences | {m(j['setup_s'])} | {m(j['setup_s'])} |",
        f"| one probe from the last layer / from the middle layer | {j['probe_last_s']:.0f} s / {j['probe_middle_s']:.0f} s ({j['per_layer_s']:.1f} s per layer) | |",
        f"| {j['probe_classes']} probes (one per layer × component, each from its own layer on) | | {m(j['probes_s'])} |",
        f"| GPTQ codes at int4 and int8 + energies: one MoE layer / one dense layer / lm_head and projector | {j['codes_moe_layer_s']:.0f} s / {j['codes_dense_layer_s']:.0f} s / {j['codes_other_s']:.0f} s | {m(j['codes_s'])} ({j['moe_layers']} MoE + {j['dense_layers']} dense layers) |",
        f"| the whole-plan router check: one full pass of the plan the estimates gave | | {m(j['full_pass_s'])} |",
        f"| **in all, when that plan holds the guard whole** (not counted: delta-from-meta's second codes for the quantized experts' input projections, and writing the ONNX files) | | **{m(j['load_s'] + planning[True])}** |",
        f"| only when it fails: a probe of each pick that can move a router ({j['route_moving_units']}), and the plan measured again | | {m(j['route_probes_s'] + j['full_pass_s'])} |",
        f"| in all, when it fails (more if the plans after it fail too) | | {m(j['load_s'] + planning[False])} |",
    ], planning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="stablelm", help="full-size preset (stablelm, phi)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers [default: the preset's]")
    ap.add_argument("--per-domain", type=int, default=4, help="calibration questions per domain")
    ap.add_argument("--project", action="store_true", help="project quantize from its timed parts (the default without --quantize)")
    ap.add_argument("--quantize", action="store_true", help="run quantize (hours on 2 cores at full depth)")
    ap.add_argument("--avg-bits", type=float, default=5.5, help="quantize's --avg-bits (with --quantize)")
    ap.add_argument("--work", type=Path, default=None, help="reuses the full-size checkpoint there (PRESET-bf16)")
    ap.add_argument("--reuse", action="store_true", help="keep the statistics, bundle and step timings of an earlier run in --work")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="full-size-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    project = args.project or not args.quantize
    ckpt = checkpoint(work, args.preset, args.layers)
    stored = sum(f.stat().st_size for f in ckpt.rglob("*.safetensors"))  # the CLIP tower's folder included
    stats = work / "stats"
    if not (args.reuse and (work / "calibrate.json").is_file()):
        shutil.rmtree(stats, ignore_errors=True)
    calibrate = [CLI, "calibrate", "--model", str(ckpt), "--per-domain", str(args.per_domain), "--sensitivity-per-domain", "2", "--out", str(stats)]
    wall, rss = timed_step(work, "calibrate", calibrate, args.reuse)
    print(f"calibrate: {wall / 60:.1f} min, {_gib(rss)}", flush=True)
    rows, planned, ran = [], None, None
    if project:
        part, planned = projection_rows(work, ckpt, stats, args.reuse)
        rows += part
    if args.quantize:
        part, ran = quantize_rows(work, ckpt, stats, args.avg_bits, args.reuse)
        rows += ["", "| step | wall | peak RSS |", "|---|---|---|", *part] if project else part
    if planned is not None and ran:
        held = _router_check(work / "bundle-onnx")["picks_measured"] == 0  # the run's own router check: did the estimates' plan hold whole?
        case = "the plan the estimates gave held whole, as the run's manifest records" if held else "the plan the estimates gave failed whole and its picks were probed, as the run's manifest records"
        rows += ["", f"**The projection against the run:** `quantize`'s planning step (codes, sensitivities, allocation) projected {planned[held] / 60:.1f} min ({case}), ran {ran / 60:.1f} min ({planned[held] / ran:.2f}x)."]
    depth = f" --layers {args.layers}" if args.layers else ""
    flags = (" --project" if project and args.quantize else "") + (f" --quantize --avg-bits {args.avg_bits:g}" if args.quantize else "")
    shape = f"{args.preset}'s dimensions at {args.layers} decoder layers" if args.layers else f"a full-size {args.preset}"
    lines = [
        f"`python benchmarks/full_size_quantize.py --preset {args.preset}{depth} --per-domain {args.per_domain}{flags}` "
        f"({shape} Med-MoE with random weights, stored in bf16: {_gib(stored)} with its CLIP tower; {4 * args.per_domain} calibration questions; each step alone, in its own process, on the 2-core 24 GB machine):",
        "",
        "| step | wall | peak RSS |",
        "|---|---|---|",
        f"| `calibrate --per-domain {args.per_domain}` | {wall / 60:.1f} min | **{_gib(rss)}** |",
        *rows,
        "",
        *(f"- calibrate printed: {ln}" for ln in _quoted(work / "calibrate.log", ("computed statistics", "the Hessians", "every linear", "router margin"))),
    ]
    few = sum(ln.startswith("few tokens:") for ln in (work / "calibrate.log").read_text().splitlines())
    if few:
        lines.append(f"- calibrate printed {few} 'few tokens' lines (matrices whose routed tokens are below 4 × d_in: the fallback it names)")
    mark = f"{MARK}-{args.layers}l" if args.layers else MARK
    publish_block(DOC, f"<!-- {mark}:begin -->", f"<!-- {mark}:end -->", lines, "Per-expert quantization", publish=not args.no_doc)


if __name__ == "__main__":
    main()
