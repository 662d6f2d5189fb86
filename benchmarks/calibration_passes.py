"""Calibration in passes: `medmoe-edge calibrate` of the real-dimension StableLM proxy in one pass
and under a `--hessian-memory` cap that takes several, each in its own process (wall time, peak
RSS), the two statistics compared tensor by tensor (they must be equal bit for bit), and what the
collector plans for the full-size presets (their shapes on meta tensors: no weights are made).

The proxy is `runtimes_bench.make_proxy` (StableLM-2-1.6B layer sizes, 4 decoder layers, MoE on 0
and 2 with 4 experts + meta, the real CLIP ViT-L/14-336 tower, random weights), as in
`quantization_proxy.py`.

    python benchmarks/calibration_passes.py [--per-domain 16] [--hessian-memory 1.1] [--work DIR]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402
from quantization_proxy import CLI, run_timed  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"
BEGIN, END = "<!-- calibration_passes:begin -->", "<!-- calibration_passes:end -->"
FULL_SIZE_CAPS_GIB = (4, 8, 16)


def compare(a, b) -> str:
    """'equal' or the first thing two statistics differ in."""
    import torch

    if a.key != b.key or a.tokens != b.tokens or a.fallbacks != b.fallbacks:
        return "header differs"
    if not (torch.equal(a.routed, b.routed) and torch.equal(a.margins, b.margins)):
        return "routing counts differ"
    if a.hessians.keys() != b.hessians.keys():
        return "Hessian keys differ"
    for k in a.hessians:
        if not torch.equal(a.hessians[k], b.hessians[k]):
            return f"Hessian of {k} differs"
    return "equal"


def full_size_rows(seqs) -> list[str]:
    """What `plan_passes` makes of the full-size presets at a few caps (carry estimated with `seqs`)."""
    import torch

    from medmoe_edge.calibration.collect import carry_bytes, plan_passes, stage_hessians
    from medmoe_edge.model.medmoe import MedMoE
    from medmoe_edge.presets import PRESETS, Preset

    rows = []
    for preset in (Preset.PHI, Preset.STABLELM):
        spec = PRESETS[preset]
        with torch.device("meta"):
            model = MedMoE(spec)
        shell = SimpleNamespace(model=model, spec=spec)  # all the planner reads: the modules' shapes and the spec
        stages = stage_hessians(shell)
        params = sum(p.numel() for p in model.parameters())
        passes = [str(len(plan_passes(shell, seqs, cap * 2**30))) for cap in FULL_SIZE_CAPS_GIB]
        rows.append(
            f"| {preset.value} | {params / 1e9:.2f} B: {4 * params / 2**30:.1f} GiB fp32, {2 * params / 2**30:.1f} GiB bf16 "
            f"| {sum(b for _k, b in stages.values()) / 2**30:.1f} GiB | {max(b for _k, b in stages.values()) / 2**30:.2f} GiB "
            f"| {carry_bytes(shell, seqs) / 2**30:.2f} GiB | {' / '.join(passes)} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-domain", type=int, default=16, help="calibration questions per domain (as quantization_proxy.py)")
    ap.add_argument("--hessian-memory", type=float, default=1.1, help="the cap in GiB for the run in passes")
    ap.add_argument("--work", type=Path, default=None, help="reuses a proxy checkpoint there (proxy-stablelm-4e)")
    ap.add_argument("--reuse", action="store_true", help="report the runs already in --work (their statistics and calibration_passes.json) instead of running them again")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    from runtimes_bench import make_proxy

    from medmoe_edge.calib_stats import CalibStats
    from medmoe_edge.calibration.collect import quantizable_linears, select
    from medmoe_edge.calibration.teacher import prepare
    from medmoe_edge.checkpoint import load_model
    from medmoe_edge.quantization import resolve_calibration_set

    work = args.work or Path(tempfile.mkdtemp(prefix="calib-passes-"))
    record = work / "calibration_passes.json"
    if args.reuse and not record.is_file():
        raise SystemExit(f"--reuse: {record} is missing; run without --reuse first")
    ckpt = work / "proxy-stablelm-4e"
    if not (ckpt / "config.json").is_file():
        make_proxy(ckpt, 4)
    runs = {"one pass": [], f"--hessian-memory {args.hessian_memory:g}": ["--hessian-memory", str(args.hessian_memory)]}
    timed = {k: tuple(v) for k, v in json.loads(record.read_text()).items()} if args.reuse else {}
    stats = {}
    for name, extra in runs.items():
        out = work / f"stats-{'one' if not extra else 'capped'}"
        if not args.reuse:
            shutil.rmtree(out, ignore_errors=True)
            cmd = [CLI, "calibrate", "--model", str(ckpt), "--per-domain", str(args.per_domain), "--sensitivity-per-domain", "2", "--out", str(out), *extra]
            print("running", " ".join(cmd), flush=True)
            timed[name] = run_timed(cmd, work / f"calibrate-{'one' if not extra else 'capped'}.log")
            record.write_text(json.dumps({k: list(v) for k, v in timed.items()}))
        stats[name] = CalibStats.load(out)
        print(name, timed[name], stats[name].passes, flush=True)
    (one, capped) = stats.values()
    same = compare(one, capped)

    qs = resolve_calibration_set("calibration")
    samples, _ = select(qs.samples, None, args.per_domain)
    loaded = load_model(ckpt)
    seqs = prepare(loaded, samples, qs.root)
    largest = max(4 * m.in_features**2 for m in quantizable_linears(loaded).values())
    (w1, r1), (w2, r2) = timed.values()

    lines = [
        f"`python benchmarks/calibration_passes.py --per-domain {args.per_domain} --hessian-memory {args.hessian_memory:g}` "
        f"(the real-dimension StableLM proxy, {4 * args.per_domain} questions; each run alone, in its own process):",
        "",
        "| calibrate | passes | wall | peak RSS |",
        "|---|---|---|---|",
        *(f"| {name} | {stats[name].passes} | {w / 60:.1f} min | {rss / 2**30:.2f} GiB |" for name, (w, rss) in timed.items()),
        "",
        f"- The statistics of the two runs compared tensor by tensor: **{same}**.",
        f"- In passes against one pass, side by side: wall {w2 / w1:.2f}×, peak RSS {r2 / r1:.2f}×.",
        f"- `quantize` reads the Hessians from their files as it needs them and keeps the last 4: at most "
        f"{4 * largest / 2**30:.2f} GiB of them here, where the statistics hold {sum(p.stat().st_size for p in (work / 'stats-one').glob('stats-hessians-*')) / 2**30:.2f} GiB.",
        "",
        f"What the collector plans for the full-size presets (shapes only; the hidden states carried between passes "
        f"estimated with these {len(seqs)} sequences; passes at a cap of {' / '.join(str(c) for c in FULL_SIZE_CAPS_GIB)} GiB):",
        "",
        "| preset | parameters | Hessians | largest layer's | carried | passes |",
        "|---|---|---|---|---|---|",
        *full_size_rows(seqs),
    ]
    publish_block(DOC, BEGIN, END, lines, "Quantization", publish=not args.no_doc)


if __name__ == "__main__":
    main()
