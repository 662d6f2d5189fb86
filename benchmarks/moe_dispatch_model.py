"""The two ONNX MoE graphs on the whole real-dimension proxy, side by side in one run, on ONNX Runtime CPU.

`scatter` (NonZero + Gather + ScatterND per expert, the ONNX default) against `if` (an `If` per
expert, what `--format tensorrt` builds engines from and `--moe-dispatch if` exports), on the
real-dimension StableLM proxies of `runtimes_bench.make_proxy` (hidden 2048, FFN 5632, 32 heads,
vocab 100352, real CLIP ViT-L/14-336 tower: 576 image rows; 4 decoder layers, MoE on 0 and 2;
random weights) with 4 and with 8 experts, fp32.

Per bundle: time to first token (one image + question; dominated by the prefill of ~620 positions)
and decode tok/s (median step of `--decode` greedy steps, EOS ignored), each measurement in its
own process, candidates alternating within each repetition, median of `--reps`. Also: the
greedy tokens of `if` against `scatter` (same weights: they must agree), and whether TensorRT-RTX
parses each decoder graph.

    python benchmarks/moe_dispatch_model.py [--reps 3] [--decode 32] [--threads 2] [--work DIR]

Writes the block between its markers in docs/MOE_DISPATCH.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402
from runtimes_bench import make_proxy, measure  # noqa: E402

DOC = ROOT / "docs" / "MOE_DISPATCH.md"
BEGIN, END = "<!-- moe_dispatch_model:begin -->", "<!-- moe_dispatch_model:end -->"
DISPATCHES = ("scatter", "if")


def tokens(bundle: Path, threads: int, n: int) -> list[int]:
    """Greedy token ids of one image + question (EOS ignored), in a child process."""
    code = (
        "import json;from medmoe_edge import api;from medmoe_edge.runtime_contract import greedy_tokens;"
        "from medmoe_edge.runtimes.base import RuntimeOptions;"
        f"p=api.load({str(bundle)!r},runtime='onnxruntime',options=RuntimeOptions(num_threads={threads}));"
        f"r,_=p.prepare({str(ROOT / 'examples' / 'ct-lesion.png')!r},'Is there an abnormality in this image?');"
        "p.runtime.model_info.tokenizer.eos_id=-1;"
        f"print(json.dumps(greedy_tokens(p.runtime,r,{n})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def trt_parses(decoder: Path) -> str:
    try:
        import tensorrt_rtx_bindings as trt
    except ImportError:
        return "not installed"
    logger = trt.Logger(trt.Logger.ERROR)
    net = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(net, logger)
    if parser.parse_from_file(str(decoder)):
        return "yes"
    return "no: " + parser.get_error(0).desc().split(":")[-1].strip()[:60]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()

    from medmoe_edge.workflows import export_bundle

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-dispatch-"))
    bundles: dict[tuple[int, str], Path] = {}
    for n in a.experts:
        src = work / f"proxy-{n}e"
        if not (src / "config.json").is_file():
            make_proxy(src, n)
        for d in DISPATCHES:
            out = work / f"onnx-{n}e-{d}"
            if not (out / "manifest.json").is_file():
                print(f"exporting {out.name}", flush=True)
                export_bundle("onnx", src, out, {"--moe-dispatch": d}, trace_questions=1)
            bundles[(n, d)] = out
    runs: dict[tuple[int, str], list[dict]] = {k: [] for k in bundles}
    for rep in range(a.reps):
        for key, b in bundles.items():
            runs[key].append(measure("onnxruntime", b, a.decode, a.threads))
            print(rep, key, runs[key][-1], flush=True)
    agree = {n: tokens(bundles[(n, "if")], a.threads, a.decode) == tokens(bundles[(n, "scatter")], a.threads, a.decode) for n in a.experts}

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("ttft_s", "decode_tok_s", "peak_rss")} for k, v in runs.items()}
    import onnxruntime as ort

    lines = [
        f"Command: `python benchmarks/moe_dispatch_model.py --reps {a.reps} --decode {a.decode} --threads {a.threads}` "
        f"(onnxruntime {ort.__version__} CPU, fp32, {a.threads} threads, median of {a.reps}; each measurement its own process, candidates alternating).",
        "",
        "| experts | graph | time to first token (s) | decode tok/s | decode vs scatter | peak RSS (MiB) | TensorRT-RTX parses the decoder | greedy tokens equal scatter's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (n, d), m in med.items():
        base = med[(n, "scatter")]["decode_tok_s"]
        lines.append(
            f"| {n} | {d} | {m['ttft_s']:.2f} | {m['decode_tok_s']:.2f} | {m['decode_tok_s'] / base:.2f}× | {m['peak_rss'] / 2**20:,.0f} | "
            f"{trt_parses(bundles[(n, d)] / 'decoder.onnx')} | {'-' if d == 'scatter' else ('yes' if agree[n] else 'NO')} |"
        )
    if 4 in a.experts and 8 in a.experts:
        lines.append("")
        for d in DISPATCHES:
            lines.append(f"`{d}` decode with 8 experts / with 4: **{med[(8, d)]['decode_tok_s'] / med[(4, d)]['decode_tok_s']:.2f}×** (tok/s; activated parameters are equal).")
    publish_block(DOC, BEGIN, END, lines, "Expert-sparse MoE in ONNX: the candidates")


if __name__ == "__main__":
    main()
