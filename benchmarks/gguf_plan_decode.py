"""llama.cpp decode speed of per-group GGUF plans against uniform file types, on the real-dimension proxy.

A plan mixes ggml types per layer × projection (`quantize --format gguf`); the question is whether
that costs decode speed beyond what its bytes explain. Both kinds of file are made from the
real-dimension StableLM proxy `benchmarks/quantization_proxy.py` leaves in `--work` (its checkpoint
and calibration statistics; 4 decoder layers at StableLM-2-1.6B sizes, vocab 100352, random weights):

* uniform: `export --format gguf --precision q4_0|q6_k` (llama.cpp's own file types);
* plans: `quantize --format gguf --sensitivity proxy --avg-bits B` at each uniform type's bits.

Each decode runs in its own process (`gguf_bandwidth.child`: a 32-token prompt, then `--decode`
single-token steps, 2 threads), files alternating, median of `--reps`. Weight bytes read per token
(`gguf_bandwidth.bytes_per_token`: every tensor once, token_embd one row, the stacked experts the
one used of 4) differ a little between a plan and its uniform type, so the comparison is made per
byte as well: effective bandwidth = tok/s × bytes per token; the issue's bound is plan ≥ 0.95× the
uniform type with the same activated bytes.

    python benchmarks/gguf_plan_decode.py --work DIR [--reps 3] [--decode 64] [--types q4_0 q6_k]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"
BEGIN, END = "<!-- gguf_plan_decode:begin -->", "<!-- gguf_plan_decode:end -->"
UNIFORM = ("q4_0", "q6_k")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work directory of benchmarks/quantization_proxy.py")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--types", nargs="+", default=list(UNIFORM), choices=UNIFORM, help="the uniform types, each against a plan at its bits")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    t0 = time.time()

    from gguf_bandwidth import bytes_per_token, measure

    from medmoe_edge.calibration.sensitivity import SensitivityMode
    from medmoe_edge.export.gguf_export import export_gguf
    from medmoe_edge.quantization import quantize_bundle
    from medmoe_edge.vocab import Precision

    ckpt, stats = a.work / "proxy-stablelm-4e", a.work / "proxy-stats"
    if not (stats / "stats.json").is_file():
        raise SystemExit(f"{stats} is missing: run benchmarks/quantization_proxy.py --work {a.work} first")
    rows: list[tuple[str, Path, float | None]] = []
    for q in a.types:
        out = a.work / f"proxy-gguf-{q}"
        if not (out / "manifest.json").is_file():
            export_gguf(ckpt, out, Precision(q))
        rows.append((f"uniform {q} (`export --precision {q}`)", out, None))
    for q in a.types:
        bits = Precision(q).bits
        out = a.work / f"proxy-gguf-plan-{bits:g}"
        if not (out / "manifest.json").is_file():
            quantize_bundle(ckpt, "gguf", stats, out, avg_bits=bits, sensitivity=SensitivityMode.PROXY, trace_questions=0)
        rows.append((f"plan at {bits:g} bits (`quantize --format gguf --avg-bits {bits:g} --sensitivity proxy`)", out, bits))
    files = [(name, out / "model.gguf") for name, out, _ in rows]
    runs: dict[str, list[float]] = {name: [] for name, _ in files}
    for _ in range(a.reps):
        for name, f in files:
            runs[name].append(measure(f, 2, a.decode, True)["tok_s"])
            print(name, runs[name][-1], flush=True)
    tok = {n: statistics.median(v) for n, v in runs.items()}
    read = {n: bytes_per_token(f)[0] for n, f in files}
    lines = [
        f"Command: `python benchmarks/gguf_plan_decode.py --work WORK --reps {a.reps} --decode {a.decode}{'' if tuple(a.types) == UNIFORM else ' --types ' + ' '.join(a.types)}` (the real-dimension StableLM proxy of "
        f"`benchmarks/quantization_proxy.py`: 4 decoder layers at StableLM-2-1.6B sizes, vocab 100352, random weights; 2 threads; {(time.time() - t0) / 60:.0f} min). "
        "Bytes per token: weight bytes read per decode step (token_embd one row, the stacked experts the one used of 4).",
        "",
        "| file | MB read per token | decode tok/s | GB/s (tok/s × bytes) | plan / uniform, tok/s | plan / uniform, per byte |",
        "|---|---|---|---|---|---|",
    ]
    names = [n for n, _ in files]
    for i, (name, _f) in enumerate(files):
        bw = tok[name] * read[name]
        if i >= len(a.types):
            u = names[i - len(a.types)]
            cmp = f"{tok[name] / tok[u]:.2f}x | **{bw / (tok[u] * read[u]):.2f}x**"
        else:
            cmp = "| "
        lines.append(f"| {name} | {read[name] / 1e6:.1f} | {tok[name]:.2f} | {bw / 1e9:.2f} | {cmp} |")
    print("\n".join(lines))
    if not a.no_doc:
        publish_block(DOC, BEGIN, END, lines, "llama.cpp decode of plans against uniform types")


if __name__ == "__main__":
    main()
