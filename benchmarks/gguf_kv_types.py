"""llama.cpp KV cache types (`--kv-type f32|f16|q8_0`) on the demo model's whole eval split.

For the F32 and F16 demo GGUF bundles and each KV type: `medmoe-edge verify` against one reference
trace recorded once (teacher-forced logits max-abs / min cosine, greedy token agreement, answer
agreement with the reference), and how many answers are identical to the same bundle's answers
with an F32 KV cache. The cache's size at the released StableLM variant's full context is computed
from its shape (24 layers, 32 KV heads of 64, 4,096 positions). Speed per KV type is measured on
the real-dimension proxy by `benchmarks/gguf_ttft.py` (docs/GGUF.md has both tables).

    python benchmarks/gguf_kv_types.py [--limit N] [--work DIR]

Writes docs/GGUF.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "GGUF.md"
BEGIN, END = "<!-- gguf_kv_types:begin -->", "<!-- gguf_kv_types:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N eval questions [default: the whole split]")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()

    import llama_cpp

    from medmoe_edge.export.gguf_export import export_gguf
    from medmoe_edge.presets import PRESETS, Preset
    from medmoe_edge.runtimes.base import KvType, RuntimeOptions
    from medmoe_edge.runtimes.llamacpp_runtime import DEFAULT_KV_TYPE
    from medmoe_edge.vocab import Precision
    from medmoe_edge.workflows import verify_bundle

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-kv-"))
    trace = work / "trace"
    if not (trace / "trace.json").exists():
        cmd = [str(Path(sys.executable).with_name("medmoe-edge")), "trace", "--out", str(trace)] + (["--limit", str(a.limit)] if a.limit else [])
        subprocess.run(cmd, check=True)
    t_start = time.perf_counter()
    rows = []
    for quant in (Precision.FP32, Precision.FP16):
        bundle = work / quant.value
        if not (bundle / "manifest.json").exists():
            export_gguf("demo", bundle, quant)
        base = None
        for kv in KvType:
            rep = verify_bundle(bundle, trace_dir=trace, limit=a.limit, options=RuntimeOptions(kv_type=kv)).report
            answers = [s.bundle_answer for s in rep.samples]
            base = answers if kv is KvType.F32 else base
            same = sum(x == y for x, y in zip(answers, base, strict=True))
            m = rep.metrics
            rows.append((quant, kv, m, same, len(answers), rep.passed))
            print(quant.value, kv.value, m, same, flush=True)
    minutes = (time.perf_counter() - t_start) / 60

    t = PRESETS[Preset.STABLELM].text
    full_ctx = {kv: 2 * t.num_layers * t.num_kv_heads * t.head_dim * 4096 * kv.bytes_per_value / 2**20 for kv in KvType}

    n = rows[0][4]
    lines = [
        f"Command: `python benchmarks/gguf_kv_types.py{f' --limit {a.limit}' if a.limit else ''}` (llama-cpp-python {llama_cpp.__version__}, portable CPU build; "
        f"demo model, {n} eval questions, one reference trace; 32 new tokens at most; {minutes:.1f} min). Default: **{DEFAULT_KV_TYPE.value}**.",
        "",
        "| bundle | KV cache | KV MiB at 4,096 positions, StableLM variant | logits max-abs | min cosine | greedy token agreement | answers = reference | answers = F32 KV | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for quant, kv, m, same, total, passed in rows:
        agree = m["answer_agreement"]
        lines.append(
            f"| {quant.value} | {kv.value}{' (default)' if kv is DEFAULT_KV_TYPE else ''} | {full_ctx[kv]:,.0f} | {m['logits_max_abs']:.3g} | {m['logits_cosine_min']:.6f} | "
            f"{m['token_agreement']:.2%} | {agree:.2%} ({round(agree * total):,} / {total:,}) | {same:,} / {total:,} | {'pass' if passed else 'FAIL'} |"
        )
    publish_block(DOC, BEGIN, END, lines, "GGUF bundles and the llama.cpp runtime", publish=not a.no_doc)


if __name__ == "__main__":
    main()
