"""llama.cpp decode speed of per-group GGUF plans against uniform file types, on the real-dimension proxy.

A plan mixes ggml types per layer × projection (`quantize --format gguf`); the question is whether
that costs decode speed beyond what its bytes explain. Both kinds of file are made from the
real-dimension StableLM proxy `benchmarks/quantization_proxy.py` leaves in `--work` (its checkpoint
and calibration statistics; 4 decoder layers at StableLM-2-1.6B sizes, vocab 100352, random weights):

* uniform: `export --format gguf --precision q4_0|q6_k` (llama.cpp's own file types);
* plans: `quantize --format gguf --sensitivity proxy --avg-bits B` at each uniform type's bits;
* with `--match-activated`, also a plan at the same *activated* bytes as each uniform type, which
  is what the issue's bound compares: a plan moves bytes between tensors every token reads and the
  stacked experts (a quarter of which a token reads), so at equal file size the two read different
  bytes. The knapsack's budget is file bytes; the avg-bits whose plan reads the uniform file's
  bytes per token is found by bisection over the knapsack alone (`activated_bits`, cached
  sensitivities, no model run), then that plan is made by `quantize` and its file read back.

Each decode runs in its own process (`gguf_bandwidth.child`: a 32-token prompt, then `--decode`
single-token steps, 2 threads), files alternating, median of `--reps`. Weight bytes read per token
(`gguf_bandwidth.bytes_per_token`: every tensor once, token_embd one row, the stacked experts the
one used of 4) differ a little between a plan and its uniform type, so the comparison is made per
byte as well: effective bandwidth = tok/s × bytes per token; the issue's bound is plan ≥ 0.95× the
uniform type with the same activated bytes.

    python benchmarks/gguf_plan_decode.py --work DIR [--reps 3] [--decode 64] [--types q4_0 q6_k] [--match-activated] [--uniform-only q3_k q4_k ...]

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


def read_fraction(unit, n_experts: int, n_vocab: int) -> float:
    """Share of a unit's bytes one decode step reads (as `gguf_bandwidth.bytes_per_token` counts)."""
    if "expert.*" in unit.name:  # a stacked-experts unit: top-1 reads one expert of the stack
        return 1 / n_experts
    if any("embed_tokens" in k for k in unit.keys):  # one row of the embedding
        return 1 / n_vocab
    return 1.0


def planned_reader(ckpt: Path, stats_dir: Path):
    """bits → bytes per token the planned units of the knapsack's plan at `--avg-bits bits` read
    (cached proxy sensitivities, router guard as `quantize`; no model run). The whole-plan router
    check of `quantize` is left out, so it may move a pick: this only chooses the bits, and what is
    measured is the file `quantize` then writes, read back."""
    from dataclasses import replace

    from medmoe_edge.allocation import BACKENDS, budget_from, guard, solve_routed
    from medmoe_edge.calibration.sensitivity import GgmlCodeBook, SensitivityMode, sensitivities
    from medmoe_edge.checkpoint import load_model, resolve_model_dir
    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.quantization import ROUTER_GUARD, load_stats

    model_dir = resolve_model_dir(ckpt)
    stats = load_stats(stats_dir, model_dir, ckpt)
    loaded = load_model(model_dir)
    book = GgmlCodeBook(stats, QuantMethod.IMATRIX_RTN)  # quantize's default for gguf: the cached sensitivities are keyed by it
    units = sensitivities(SensitivityMode.PROXY, loaded, stats, BACKENDS["gguf"], book, cache_dir=stats_dir)
    units = [replace(u, choices=guard(u.choices, ROUTER_GUARD)) for u in units]
    frac = {u.name: read_fraction(u, loaded.spec.moe.num_experts, loaded.spec.text.vocab_size) for u in units}

    def read(bits: float) -> int:
        alloc = solve_routed(units, budget_from(units, avg_bits=bits), 1.0 - ROUTER_GUARD)
        return int(sum(frac[u.name] * c.nbytes for u, c in zip(units, alloc.picks)))

    return read


def activated_bits(read, target: int, lo: float = 2.0, hi: float = 16.0, steps: int = 24) -> float:
    """The least avg-bits (to the bisection's resolution) whose plan reads at least `target` bytes per token."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if read(mid) < target else (lo, mid)
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the --work directory of benchmarks/quantization_proxy.py")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--types", nargs="+", default=list(UNIFORM), choices=UNIFORM, help="the uniform types, each against a plan at its bits")
    ap.add_argument("--uniform-only", nargs="*", default=[], choices=("q2_k", "q3_k", "q4_0", "q4_k", "q5_k", "q6_k", "q8_0"), help="more types, every matrix in the type, measured beside (GB/s per type: which types cost time per byte)")
    ap.add_argument("--match-activated", action="store_true", help="also a plan at each uniform type's activated bytes per token (the issue's bound)")
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
    if a.match_activated:
        read_planned = planned_reader(ckpt, stats)
        n = len(a.types)
        for q, (_u, uniform, _), (_p, same_bits, bits0) in zip(a.types, rows[:n], rows[n:]):
            # what the file reads outside the planned units (norms, biases, routers), from the plan at the type's bits
            offset = bytes_per_token(same_bits / "model.gguf")[0] - read_planned(bits0)
            target = bytes_per_token(uniform / "model.gguf")[0]
            bits = round(activated_bits(read_planned, target - offset), 4)
            out = a.work / f"proxy-gguf-plan-{q}-activated"
            if not (out / "manifest.json").is_file():
                quantize_bundle(ckpt, "gguf", stats, out, avg_bits=bits, sensitivity=SensitivityMode.PROXY, trace_questions=0)
            print(f"{q}: {target / 1e6:.1f} MB per token; plan at {bits} bits predicted {(offset + read_planned(bits)) / 1e6:.1f} MB", flush=True)
            rows.append((f"plan at {q}'s activated bytes: {bits:g} bits (`quantize --format gguf --avg-bits {bits:g} --sensitivity proxy`)", out, bits))
    for q in a.uniform_only:  # every matrix in one type (llama.cpp's own file types keep some tensors in others)
        out = a.work / f"proxy-gguf-all-{q}"
        if not (out / "manifest.json").is_file():
            export_gguf(ckpt, out, Precision.Q8_0, overrides={r"\.weight$": q})
        rows.append((f"every matrix {q} (`export_gguf(..., overrides={{'\\.weight$': '{q}'}})`)", out, None))
    files = [(name, out / "model.gguf") for name, out, _ in rows]
    runs: dict[str, list[float]] = {name: [] for name, _ in files}
    for _ in range(a.reps):
        for name, f in files:
            runs[name].append(measure(f, 2, a.decode, True)["tok_s"])
            print(name, runs[name][-1], flush=True)
    tok = {n: statistics.median(v) for n, v in runs.items()}
    read = {n: bytes_per_token(f)[0] for n, f in files}
    lines = [
        f"Command: `python benchmarks/gguf_plan_decode.py --work WORK --reps {a.reps} --decode {a.decode}{'' if tuple(a.types) == UNIFORM else ' --types ' + ' '.join(a.types)}{' --match-activated' if a.match_activated else ''}{' --uniform-only ' + ' '.join(a.uniform_only) if a.uniform_only else ''}` (the real-dimension StableLM proxy of "
        f"`benchmarks/quantization_proxy.py`: 4 decoder layers at StableLM-2-1.6B sizes, vocab 100352, random weights; 2 threads; {(time.time() - t0) / 60:.0f} min). "
        "Bytes per token: weight bytes read per decode step (token_embd one row, the stacked experts the one used of 4). "
        "Per round: plan over uniform tok/s within each round of the alternating runs (median, range), which the machine's drift between rounds does not enter.",
        "",
        "| file | MB read per token | decode tok/s (median) | GB/s (tok/s × bytes) | plan / uniform, tok/s | per round | plan / uniform, per byte |",
        "|---|---|---|---|---|---|---|",
    ]
    names = [n for n, _ in files]
    for i, (name, _f) in enumerate(files):
        bw = tok[name] * read[name]
        if len(a.types) <= i < len(rows) - len(a.uniform_only):
            u = names[i % len(a.types)]  # the uniform type this plan is compared with
            paired = sorted(p / q for p, q in zip(runs[name], runs[u]))
            cmp = f"{tok[name] / tok[u]:.2f}x | {statistics.median(paired):.2f}x ({paired[0]:.2f}–{paired[-1]:.2f}) | **{bw / (tok[u] * read[u]):.2f}x**"
        else:
            cmp = "| | "
        lines.append(f"| {name} | {read[name] / 1e6:.1f} | {tok[name]:.2f} | {bw / 1e9:.2f} | {cmp} |")
    publish_block(DOC, BEGIN, END, lines, "llama.cpp decode of plans against uniform types", publish=not a.no_doc)


if __name__ == "__main__":
    main()
