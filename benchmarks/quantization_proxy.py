"""Sensitivity proxy and the real-dimension StableLM proxy: `quantize --sensitivity proxy` against
measured sensitivities on the demo model, then calibrate + quantize of a real-dimension model
timed on this machine, and its ONNX Runtime decode speed against fp32.

Part 1, the demo model (in process): the measured mode probes every unit × candidate end to end;
the proxy estimates both numbers from tr(ΔW H ΔWᵀ) scaled by one probe per (layer, component)
(`calibration.sensitivity`). Reported: the rank correlation of ΔKL over every unit × candidate,
the probes each mode ran and their time, and plans of the torch backend (int2/3/4/8 per group)
from each mode at equal bytes, judged on held-out teacher-forced eval sequences (KL of answer
positions, router agreement), which neither mode saw.

Part 2, the real-dimension proxy of `runtimes_bench.make_proxy` (StableLM-2-1.6B layer sizes:
hidden 2048, FFN 5632, 32 heads, vocab 100352; the real CLIP ViT-L/14-336 tower; 4 decoder layers,
MoE on 0 and 2 with 4 experts + meta; random weights): `medmoe-edge calibrate` and
`medmoe-edge quantize --format onnx --sensitivity proxy --method gptq` run as a user runs them,
each in its own process (wall time and peak RSS of that process), then ONNX Runtime decode tok/s
of the quantized bundle against the fp32 export, alternating in child processes.

    python benchmarks/quantization_proxy.py [--calib-per-domain 16] [--sens-per-domain 2] [--reps 3] [--work DIR] [--skip-demo] [--skip-proxy]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"
BEGIN, END = "<!-- quantization_proxy:begin -->", "<!-- quantization_proxy:end -->"
CLI = str(Path(sys.executable).with_name("medmoe-edge"))


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    for pos, i in enumerate(order):
        r[i] = float(pos)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def demo_part(work: Path, calib_per_domain: int, held_out_per_domain: int) -> list[str]:
    import torch

    from medmoe_edge.allocation import BACKENDS
    from medmoe_edge.calibration.collect import select
    from medmoe_edge.calibration.sensitivity import CodeBook, Probe, SensitivityMode, sensitivities, units_for
    from medmoe_edge.calibration.sets import resolve_set
    from medmoe_edge.calibration.teacher import prepare
    from medmoe_edge.checkpoint import load_model, resolve_model_dir
    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.quantization import calibrate, fake_quantize, make_plan, restore
    from medmoe_edge.quantizer import packed_bytes

    torch.set_num_threads(2)
    stats, _ = calibrate("demo", work / "demo-stats", per_domain=calib_per_domain)
    loaded = load_model(resolve_model_dir("demo"))
    samples, root = resolve_set("eval")
    held_out = Probe(loaded, prepare(loaded, select(samples, None, held_out_per_domain)[0], root))
    b = BACKENDS["torch"]
    book = CodeBook(stats, QuantMethod.GPTQ, 32, symmetric=not b.zero_point)
    units = units_for(loaded, b)
    state = loaded.model.lm.state_dict()
    for u in units:  # codes first, so each mode's time below is its probes (and energies) alone
        for p in (p for p in b.candidates if not p.is_float):
            for k in u.keys:
                book.codes_for(k, state[k], p)
    got, took = {}, {}
    for mode in SensitivityMode:
        t = time.perf_counter()
        got[mode] = {f"{u.name}|{c.precision.value}": c for u in sensitivities(mode, loaded, stats, b, book, cache_dir=work / "demo-stats") for c in u.choices if not c.precision.is_float}
        took[mode] = time.perf_counter() - t
    keys = sorted(got[SensitivityMode.MEASURED])
    rho = spearman([got[SensitivityMode.MEASURED][k].delta for k in keys], [got[SensitivityMode.PROXY][k].delta for k in keys])
    import json

    from medmoe_edge.calibration.sensitivity import cache_name

    probes = json.loads((work / "demo-stats" / cache_name(stats, b, QuantMethod.GPTQ, 32, SensitivityMode.PROXY)).read_text())["probes"]
    n_end_to_end = len(probes) + sum(1 for k in keys if k.startswith("embed|"))
    int3 = sum(packed_bytes(u.params, 3, 32, scale_bytes=b.scale_bytes, zero_point=b.zero_point) for u in units)
    lines = [
        f"Demo model, torch backend (int2/int3/int4/int8 GPTQ, block 32, per TensorId group), statistics from {calib_per_domain} calibration questions per domain "
        f"(8 sequences per domain kept for probes). Spearman rank correlation of ΔKL, proxy against measured, over all {len(keys)} group × type pairs: **{rho:.3f}**. "
        f"Measured: {len(keys)} end-to-end probes in {took[SensitivityMode.MEASURED]:.0f} s; proxy: {n_end_to_end} probes (one per layer × component, the embedding at every type) "
        f"and the energies in {took[SensitivityMode.PROXY]:.0f} s. Plans judged on {len(held_out.sequences)} held-out teacher-forced eval sequences ({held_out_per_domain} per domain; KL over answer positions).",
        "",
        "| budget | sensitivities | bits/weight | held-out KL | router agreement | KL proxy / measured | KL / uniform int3's |",
        "|---|---|---|---|---|---|---|",
    ]
    old = fake_quantize(loaded, {k: book.get(k, state[k], 3) for u in units for k in u.keys})
    try:
        kl3, agree3 = held_out.measure()
    finally:
        restore(loaded, old)
    lines.append(f"| (uniform int3 GPTQ itself) | - | {8 * int3 / sum(u.params for u in units):.2f} | {kl3:.2e} | {agree3:.2%} | | 1.00 |")
    for label, mb, avg in (("uniform int3 GPTQ bytes", int3 / 1e6, None), ("3.5 bits per weight", None, 3.5), ("4.5 bits per weight", None, 4.5)):
        kl_of = {}
        for mode in SensitivityMode:
            res = make_plan(loaded, stats, "torch", method=QuantMethod.GPTQ, budget_mb=mb, avg_bits=avg, sensitivity=mode, cache_dir=work / "demo-stats")
            old = fake_quantize(loaded, res.codes)
            try:
                kl, agree = held_out.measure()
            finally:
                restore(loaded, old)
            kl_of[mode] = kl
            ratio = f"{kl / kl_of[SensitivityMode.MEASURED]:.2f}" if mode is SensitivityMode.PROXY else ""
            lines.append(f"| {label} | {mode.value} | {res.allocation.bits_per_weight:.2f} | {kl:.2e} | {agree:.2%} | {ratio} | {kl / kl3:.2f} |")
            print(lines[-1], flush=True)
    return lines


def run_timed(cmd: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command run in its own process; exits on failure."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "1000"})
        _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}):\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def quantize_phases(log: str) -> dict[str, float]:
    """The steps `medmoe-edge quantize` reports on its `took:` line, in seconds."""
    line = next((ln for ln in log.splitlines() if ln.startswith("took: ")), "")
    out = {}
    for part in line[len("took: ") :].split("; "):
        what, _, secs = part.rpartition(" ")[0].rpartition(" ")
        if what:
            out[what] = float(secs)
    return out


def proxy_part(work: Path, calib_per_domain: int, sens_per_domain: int, reps: int, decode: int) -> list[str]:
    import gc

    from runtimes_bench import make_proxy, measure

    from medmoe_edge.allocation import BACKENDS
    from medmoe_edge.calibration.sensitivity import choice_bytes, units_for
    from medmoe_edge.checkpoint import load_model
    from medmoe_edge.export.onnx_export import export_onnx
    from medmoe_edge.vocab import Precision

    ckpt = work / "proxy-stablelm-4e"
    if not (ckpt / "config.json").is_file():
        make_proxy(ckpt, 4)
    # the budget: the bytes of int4 in every planned group + 15 %, so the plan has int8 to place (ONNX: int4, int8, fp32)
    loaded = load_model(ckpt)
    b = BACKENDS["onnx"]
    units = units_for(loaded, b)
    budget = int(1.15 * sum(choice_bytes(u.params, Precision.INT4, b, 32) for u in units))
    params = sum(u.params for u in units)
    del loaded, units
    gc.collect()

    stats, bundle = work / "proxy-stats", work / "proxy-onnx-plan"
    commands = {
        "calibrate": [CLI, "calibrate", "--model", str(ckpt), "--per-domain", str(calib_per_domain), "--sensitivity-per-domain", str(sens_per_domain), "--out", str(stats)],
        "quantize": [CLI, "quantize", "--model", str(ckpt), "--format", "onnx", "--stats", str(stats), "--budget-mb", f"{budget / 1e6:.3f}", "--sensitivity", "proxy", "--method", "gptq", "--no-verify", "--out", str(bundle)],
    }
    steps = [(n, commands[n]) for n, done in (("calibrate", stats / "stats.json"), ("quantize", bundle / "manifest.json")) if not done.is_file()]
    import json

    # each step's (wall s, peak RSS) is kept beside what it made, so a rerun that reuses them still reports them
    record = work / "timed.json"
    timed = {k: tuple(v) for k, v in json.loads(record.read_text()).items()} if record.is_file() else {}
    for name, cmd in steps:
        print("running", " ".join(cmd), flush=True)
        timed[name] = run_timed(cmd, work / f"{name}.log")
        record.write_text(json.dumps(timed))
        print(name, timed[name], flush=True)
    fp32 = work / "proxy-onnx-fp32"
    if not (fp32 / "manifest.json").is_file():
        export_onnx(ckpt, fp32, Precision.FP32)
    runs: dict[str, list[dict]] = {"fp32": [], "plan": []}
    for _ in range(reps):
        for name, path in (("fp32", fp32), ("plan", bundle)):
            runs[name].append(measure("onnxruntime", path, decode, 2))
    tok = {k: statistics.median(r["decode_tok_s"] for r in v) for k, v in runs.items()}
    rss = {k: max(r["peak_rss"] for r in v) for k, v in runs.items()}
    size = {k: sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file()) for k, d in (("fp32", fp32), ("plan", bundle))}

    summary = json.loads((bundle / "manifest.json").read_text())["extra"]["quantization"]
    log = (work / "quantize.log").read_text() if (work / "quantize.log").is_file() else ""
    lines = [
        "",
        f"Real-dimension StableLM proxy (`runtimes_bench.make_proxy`: hidden 2048, FFN 5632, 32 heads, vocab 100352, CLIP ViT-L/14-336, 4 decoder layers, MoE on 0 and 2 with 4 experts + meta; random weights; "
        f"{params:,} planned weights: LLM matrices and projector; ONNX keeps the embedding in floating point). Budget: the bytes of int4 in every group + 15 % ({budget / 1e6:.1f} MB); "
        f"the plan came out at {summary['bits_per_weight']:.2f} bits per weight. Each command in its own process on this machine's 2 cores:",
        "",
        "| step | command | wall | peak RSS |",
        "|---|---|---|---|",
    ]
    for name, cmd in commands.items():
        if name not in timed:
            continue
        wall, peak = timed[name]
        shown = " ".join(c if not c.startswith(str(work)) else c.replace(str(work), "WORK") for c in cmd[1:])
        lines.append(f"| {name} | `medmoe-edge {shown}` | {wall / 60:.1f} min | {peak / 2**30:.1f} GiB |")
    phases = quantize_phases(log)
    for what, secs in phases.items():
        lines.append(f"| quantize: {what.replace(str(work), 'WORK')} | | {secs / 60:.1f} min | |")
    if len(timed) == 2:
        # the bound counts calibration, the sensitivities with their codes, and the allocation; the
        # reference trace the bundle embeds (40 questions generated by the fp32 reference) and the
        # writing are the export's, and are shown as measured above
        planned = timed["calibrate"][0] + sum(v for k, v in phases.items() if not k.startswith(("recording", "writing")))
        lines.append(f"| calibration + sensitivities + GPTQ + allocation | | **{planned / 60:.1f} min** | {max(p for _, p in timed.values()) / 2**30:.1f} GiB |")
        lines.append(f"| both commands, with the trace and the bundle | | {sum(w for w, _ in timed.values()) / 60:.1f} min | |")
    lines += [
        "",
        f"ONNX Runtime decode on the same proxy, one image and question, {decode} greedy steps, median of {reps} alternating runs, each in its own process:",
        "",
        "| bundle | size | decode tok/s | vs fp32 | peak RSS |",
        "|---|---|---|---|---|",
        f"| `export --format onnx --precision fp32` | {size['fp32'] / 1e9:.2f} GB | {tok['fp32']:.2f} | 1.00x | {rss['fp32'] / 2**30:.1f} GiB |",
        f"| the plan above (DequantizeLinear → MatMulNBits) | {size['plan'] / 1e9:.2f} GB | {tok['plan']:.2f} | **{tok['plan'] / tok['fp32']:.2f}x** | {rss['plan'] / 2**30:.1f} GiB |",
    ]
    if "Traceback" in log:
        lines.append("\n(quantize printed a traceback: see its log)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-per-domain", type=int, default=16)
    ap.add_argument("--sens-per-domain", type=int, default=2, help="the real-dimension proxy's probe sequences per domain")
    ap.add_argument("--held-out", type=int, default=16, help="held-out eval sequences per domain judging the demo plans")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-proxy", action="store_true")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-qproxy-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = []
    if not a.skip_demo:
        lines += demo_part(work, a.calib_per_domain, a.held_out)
    if not a.skip_proxy:
        lines += proxy_part(work, a.calib_per_domain, a.sens_per_domain, a.reps, a.decode)
    import onnxruntime
    import torch

    head = [
        f"Command: `python benchmarks/quantization_proxy.py --calib-per-domain {a.calib_per_domain} --sens-per-domain {a.sens_per_domain} --reps {a.reps}` "
        f"(torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {(time.time() - t0) / 60:.0f} min).",
        "",
    ]
    if a.no_doc or a.skip_demo or a.skip_proxy:
        print("\n".join(head + lines))
    else:
        publish_block(DOC, BEGIN, END, head + lines, "Sensitivity proxy and the real-dimension proxy")
        print("\n".join(head + lines))


if __name__ == "__main__":
    main()
