"""The lm_head's GPTQ statistics over every position, or over the positions whose logits are used.

`calibrate` sums the lm_head's input Hessian over every spliced position of a calibration
sequence: image rows, prompt and answer. At inference only the logits of the last prompt position
and of each generated token are computed, so most of those rows never reach the lm_head in
deployment (on the demo: 823 of 27,447). This script measures what GPTQ codes from the Hessian over
the used positions only (the last prompt position up to the last answer token: the rows whose
logits predict an answer token or EOS) do to the answer KL, against the codes `calibrate`'s
statistics give, with the lm_head alone quantized and with every planned matrix quantized (uniform
GPTQ, block 32; per-domain statistics of the shipped calibration split, 64 questions per domain).

    python benchmarks/lm_head_positions.py [--per-domain 100] [--bits 3 2] [--no-doc]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from calibration_domains import Oracle  # noqa: E402
from docblock import publish_block  # noqa: E402
from quantization_report import DOMAINS, _trace  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"
BEGIN, END = "<!-- lm_head_positions:begin -->", "<!-- lm_head_positions:end -->"
CALIB_PER_DOMAIN = 64


def used_positions_hessian(oracle: Oracle, seqs) -> tuple:
    """(Σ x xᵀ over the final hidden states whose logits are used, their count)."""
    import torch

    from medmoe_edge.calibration.teacher import hidden

    d = oracle.loaded.model.lm.lm_head.in_features
    h_used, n = torch.zeros(d, d), 0
    for s in seqs:
        h, _ = hidden(oracle.loaded, s)
        x = h[s.answer_start - 1 : len(h) - 1].float()
        h_used.addmm_(x.T, x)
        n += x.shape[0]
    return h_used, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-domain", type=int, default=100, help="eval questions per domain")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    t0 = time.time()

    import torch

    from medmoe_edge.calibration.collect import select
    from medmoe_edge.calibration.sensitivity import CodeBook
    from medmoe_edge.calibration.sets import resolve_set
    from medmoe_edge.calibration.teacher import prepare
    from medmoe_edge.checkpoint import resolve_model_dir
    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.quantization import calibrate
    from medmoe_edge.quantizer import QuantizerConfig, quantize

    torch.set_num_threads(2)
    trace = _trace(resolve_model_dir("demo"), args.per_domain)
    domain_of = {it.id: it.meta["domain"] for it in trace.items}

    def kl(got: dict) -> list[float]:
        """Mean KL overall, then per domain."""
        sums = {d: [0.0, 0] for d in ("all", *DOMAINS)}
        for i, (k, steps) in got.items():
            for d in ("all", domain_of[i]):
                sums[d][0] += k
                sums[d][1] += steps
        return [k / n for k, n in sums.values()]

    with tempfile.TemporaryDirectory() as tmp:
        stats, _ = calibrate("demo", Path(tmp) / "stats", per_domain=CALIB_PER_DOMAIN, sensitivity_per_domain=1)
        oracle = Oracle("all")
        head = "lm_head.weight"
        qs = resolve_set("calibration")
        h_used, n_used = used_positions_hessian(oracle, prepare(oracle.loaded, select(qs.samples, None, CALIB_PER_DOMAIN)[0], qs.root))
        book = CodeBook(stats, QuantMethod.GPTQ, 32, symmetric=False)
        rows = []
        for bits in args.bits:
            every = book.get(head, oracle.state[head], bits)
            used = quantize(oracle.state[head], QuantizerConfig(bits, 32, QuantMethod.GPTQ, False), h_used, n_used)
            rows.append((bits, "lm_head only", kl(oracle.replay(trace, {head: every})), kl(oracle.replay(trace, {head: used}))))
            codes = oracle.codes(book, bits)
            base = kl(oracle.replay(trace, codes))
            rows.append((bits, "every planned matrix", base, kl(oracle.replay(trace, codes | {head: used}))))
        oracle.close()

    lines = [
        f"Command: `python benchmarks/lm_head_positions.py --per-domain {args.per_domain} --bits {' '.join(map(str, args.bits))}` "
        f"(torch {torch.__version__}; demo model; {len(trace.items)} eval questions teacher-forced against one fp32 trace; uniform GPTQ, block 32; "
        f"lm_head statistics over {stats.tokens[head]:,} positions (calibrate's) or the {n_used:,} whose logits are used; {(time.time() - t0) / 60:.1f} min). "
        "Mean KL overall and per domain; change: used positions' over every position's − 1 (negative: the used positions' codes are better).",
        "",
        "| bits | quantized | lm_head statistics | KL (mean) | KL CT | KL MRI | KL X-ray | KL pathology | change |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bits, scope, every, used in rows:
        for name, k in (("every position", every), ("used positions", used)):
            change = f"**{used[0] / every[0] - 1:+.0%}**" if k is used else ""
            lines.append(f"| int{bits} | {scope} | {name} | " + " | ".join(f"{v:.2e}" for v in k) + f" | {change} |")
    publish_block(DOC, BEGIN, END, lines, "Per-expert quantization", publish=not args.no_doc)


if __name__ == "__main__":
    main()
