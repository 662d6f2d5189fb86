"""Fidelity against size: the KL of every configuration in docs/QUANTIZATION.md's report tables
against its bits per weight, as one chart (docs/quantization-kl-vs-bits.png); the first block's
plan rows, which predate the whole-plan router check, are left out.

Reads the tables `quantization_report.py` published (its blocks quantization_report,
quantization_report_plans and quantization_report_proxy): each row's bits per weight and mean KL
against the fp32 reference on the same 400 eval questions. Uniform types are drawn as lines
(RTN and GPTQ), plans and bundles as labelled points.

    python benchmarks/quantization_chart.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "QUANTIZATION.md"
OUT = ROOT / "docs" / "quantization-kl-vs-bits.png"
BLOCKS = ("quantization_report", "quantization_report_plans", "quantization_report_proxy")


def rows(text: str) -> list[tuple[str, float, float]]:
    """(configuration, bits per weight, KL) of every fidelity row in the report blocks."""
    out = []
    for block in BLOCKS:
        m = re.search(rf"<!-- {block}:begin -->(.*?)<!-- {block}:end -->", text, re.S)
        if not m:
            continue
        for line in m.group(1).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 11 and re.fullmatch(r"\d+\.\d+", cells[1]) and re.fullmatch(r"[\d.]+e[-+]\d+", cells[3]):
                if block == "quantization_report" and cells[0].startswith(("plan", "the same plan")):
                    continue  # that block's plans predate the whole-plan router check: the plans blocks have the current ones
                out.append((cells[0], float(cells[1]), float(cells[3])))
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(DOC.read_text())
    if not data:
        sys.exit(f"no report rows in {DOC}: run benchmarks/quantization_report.py first")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for method, style in (("rtn", "o--"), ("gptq", "s-")):
        pts = sorted({(b, kl) for name, b, kl in data if name.startswith("uniform") and f" {method} " in name and "CT-only" not in name})
        if pts:
            ax.plot([b for b, _ in pts], [kl for _, kl in pts], style, color="grey" if method == "rtn" else "black", label=f"uniform int8/4/3/2 {method.upper()}")
    marks = {"plan": ("D", "tab:blue"), "quantize --format onnx": ("^", "tab:green"), "quantize --format gguf": ("v", "tab:orange"), "quantize --format tensorrt": ("P", "tab:purple")}
    seen: set[str] = set()
    for name, b, kl in data:
        if name.startswith("uniform"):
            continue
        kind = next((k for k in marks if name.startswith(k)), None)
        if kind is None:
            continue
        marker, colour = marks[kind]
        label = None if kind in seen else ("plans (PyTorch fake-quant)" if kind == "plan" else kind + " bundles")
        seen.add(kind)
        ax.plot([b], [kl], marker, color=colour, label=label, markersize=7, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (planned matrices, scales included)")
    ax.set_ylabel("mean KL(fp32 ‖ quantized), 400 eval questions")
    ax.set_title("Demo model: fidelity against size (docs/QUANTIZATION.md)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"{len(data)} rows -> {OUT}")


if __name__ == "__main__":
    main()
