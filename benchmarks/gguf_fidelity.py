"""Fidelity of GGUF bundles (f32, f16, q8_0, q4_k_m) against the PyTorch reference.

For each quant type: export the bundle, then `medmoe-edge verify` (teacher-forced logits
max-abs and cosine, greedy token agreement, answer agreement; image through mtmd):

* the demo model on its whole `eval` split (1,600 questions, `--demo-limit` to shorten);
* the real-dimension proxy of runtimes_bench.py (StableLM-2 layer sizes, the CLIP ViT-L/14-336
  tower, 4 layers, 4 experts, random weights) on the first `--proxy-limit` eval questions. Its
  answers are noise from random weights, so only its logit figures mean much (and quantization
  error on random weights says little about real ones: toolchain-facts §3, note 14).

    python benchmarks/gguf_fidelity.py [--demo-limit N] [--proxy-limit 8] [--skip-proxy]

Writes docs/GGUF.md (the section between the markers) and prints the table. Needs the patched
llama-cpp-python (bash scripts/build_llamacpp.sh).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "GGUF.md"
BEGIN, END = "<!-- gguf_fidelity:begin -->", "<!-- gguf_fidelity:end -->"
QUANTS = ("f32", "f16", "q8_0", "q4_k_m")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-limit", type=int, default=None, help="eval questions for the demo model [default: all 1,600]")
    ap.add_argument("--proxy-limit", type=int, default=8)
    ap.add_argument("--skip-proxy", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory [default: a temporary one]")
    a = ap.parse_args()

    from runtimes_bench import dir_size, make_proxy

    from medmoe_edge.checkpoint import resolve_model_dir
    from medmoe_edge.cli.verify_cmd import run_verify
    from medmoe_edge.export.gguf_export import TEXT_FILE, export_gguf
    from medmoe_edge.vocab import Precision
    from medmoe_edge.imaging import PreprocessMode

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-gguf-fid-"))
    models: list[tuple[str, Path, int | None]] = [("demo", resolve_model_dir("demo"), a.demo_limit)]
    if not a.skip_proxy:
        proxy = work / "proxy-stablelm-4e"
        if not (proxy / "config.json").is_file():
            make_proxy(proxy, 4)
        models.append(("StableLM-size proxy (random weights)", proxy, a.proxy_limit))

    rows = []
    for label, ckpt, limit in models:
        for q in QUANTS:
            bundle = work / f"{ckpt.name}-gguf-{q}"
            if not (bundle / "manifest.json").is_file():
                export_gguf(ckpt, bundle, Precision.parse(q, option="--quant"))
            rep = run_verify(bundle, reference=None, set_name="eval", data=None, limit=limit, provider=None, threads=a.threads, max_new_tokens=32, preprocess=PreprocessMode.PAD)
            m = rep.metrics
            agreed = sum(s.reference_answer == s.bundle_answer for s in rep.samples)
            rows.append(
                {
                    "model": label,
                    "quant": q,
                    "text_mib": (bundle / TEXT_FILE).stat().st_size / 2**20,
                    "bundle_mib": dir_size(bundle) / 2**20,
                    "max_abs": m["logits_max_abs"],
                    "cos": m["logits_cosine_min"],
                    "tokens": m["token_agreement"],
                    "answers": f"{m['answer_agreement']:.1%} ({agreed:,} / {len(rep.samples):,})",
                    "verdict": "pass" if rep.passed else "FAIL",
                }
            )
            print(rows[-1], flush=True)
    write_doc(a, rows)


def write_doc(a, rows: list[dict]) -> None:
    import llama_cpp

    cmd = "python benchmarks/gguf_fidelity.py" + (f" --demo-limit {a.demo_limit}" if a.demo_limit else "") + (" --skip-proxy" if a.skip_proxy else f" --proxy-limit {a.proxy_limit}")
    lines = [
        f"Command: `{cmd}` (llama-cpp-python {llama_cpp.__version__}, portable CPU build; F32 KV cache; mmproj F32; "
        "`medmoe-edge verify` teacher-forces the bundle on the reference's greedy tokens, 32 new tokens at most).",
        "",
        "| model | quant | model.gguf (MiB) | bundle (MiB) | logits max-abs | min cosine | greedy token agreement | answer agreement | verdict (docs: verify tolerances) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quant']} | {r['text_mib']:.1f} | {r['bundle_mib']:.1f} | {r['max_abs']:.2g} | {r['cos']:.6f} | {r['tokens']:.2%} | {r['answers']} | {r['verdict']} |")
    publish_block(DOC, BEGIN, END, lines, "GGUF bundles and the llama.cpp runtime")


if __name__ == "__main__":
    main()
