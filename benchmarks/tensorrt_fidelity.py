"""Fidelity of the TensorRT bundles' graphs on the demo model's whole eval split, without a GPU.

`medmoe-edge export --format tensorrt` builds its engines from ONNX graphs with the `if` MoE
dispatch (docs/MOE_DISPATCH.md) and keeps them in the bundle. Running the engines needs a GPU;
the graphs run anywhere. For fp32 and fp16: export the demo model (TensorRT-RTX builds the
engines here), then teacher-force the bundle's graphs through ONNX Runtime CPU
(`medmoe-edge verify BUNDLE --runtime onnxruntime`) on the reference trace of the whole eval
split (1,600 questions), recorded once and replayed against both bundles.

    python benchmarks/tensorrt_fidelity.py [--limit N] [--threads 2] [--work DIR]

Writes the block between its markers in docs/TENSORRT.md and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "TENSORRT.md"
BEGIN, END = "<!-- tensorrt_fidelity:begin -->", "<!-- tensorrt_fidelity:end -->"
PRECISIONS = ("fp32", "fp16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="eval questions [default: all 1,600]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory [default: a temporary one]")
    a = ap.parse_args()

    from medmoe_edge.runtime_contract import RuntimeOptions
    from medmoe_edge.workflows import export_bundle, record_trace, save_trace, verify_bundle

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-trt-fid-"))
    trace_dir = work / "trace-eval"
    if not (trace_dir / "trace.json").is_file():
        t0 = time.perf_counter()
        save_trace(record_trace("demo", limit=a.limit, options=RuntimeOptions(num_threads=a.threads)), trace_dir)
        print(f"reference trace recorded in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for p in PRECISIONS:
        bundle = work / f"demo-tensorrt-{p}"
        if not (bundle / "manifest.json").is_file():
            export_bundle("tensorrt", "demo", bundle, {"--precision": p}, trace_questions=0)
        t0 = time.perf_counter()
        out = verify_bundle(bundle, trace_dir=trace_dir, limit=None, runtime="onnxruntime", options=RuntimeOptions(num_threads=a.threads))
        rep, m = out.report, out.report.metrics
        agreed = sum(s.reference_answer == s.bundle_answer for s in rep.samples)
        rows.append(
            {
                "precision": p,
                "questions": len(rep.samples),
                "max_abs": m["logits_max_abs"],
                "cos": m["logits_cosine_min"],
                "tokens": m["token_agreement"],
                "routing": m["routing_agreement"],
                "answers": f"{m['answer_agreement']:.2%} ({agreed:,} / {len(rep.samples):,})",
                "verdict": "pass" if rep.passed else "FAIL",
                "seconds": time.perf_counter() - t0,
            }
        )
        print(rows[-1], flush=True)
    write_doc(a, rows)


def write_doc(a, rows: list[dict]) -> None:
    import onnxruntime
    import tensorrt_rtx_bindings as trt

    cmd = "python benchmarks/tensorrt_fidelity.py" + (f" --limit {a.limit}" if a.limit else "")
    lines = [
        f"Command: `{cmd}` (TensorRT-RTX {trt.__version__} builds the engines; the bundle's graphs run on onnxruntime {onnxruntime.__version__} CPU, "
        f"{a.threads} threads; `medmoe-edge verify` teacher-forces each bundle on the reference trace's greedy tokens, 32 new tokens at most).",
        "",
        "| bundle | questions | logits max-abs | min cosine | greedy token agreement | routing agreement | answer agreement | verdict (verify tolerances) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| demo, tensorrt {r['precision']} | {r['questions']:,} | {r['max_abs']:.2g} | {r['cos']:.6f} | {r['tokens']:.3%} | {r['routing']:.3%} | {r['answers']} | {r['verdict']} |")
    publish_block(DOC, BEGIN, END, lines, "TensorRT bundles")


if __name__ == "__main__":
    main()
