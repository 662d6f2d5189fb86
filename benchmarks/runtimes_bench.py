"""ONNX Runtime and llama.cpp vs the PyTorch reference, side by side in one run: TTFT, decode tok/s, peak RSS, size.

Models:
* the built-in demo model;
* real-dimension proxies: the StableLM-2-1.6B variant's layer sizes (hidden 2048, FFN 5632,
  32 heads, vocab 100352) and the real CLIP ViT-L/14-336 tower (576 image rows), with 4
  decoder layers (MoE on 0 and 2), random weights, with 4 and with 8 experts.

Each measurement runs in its own process (so peak RSS is that runtime's alone), one image
and question, prefill then `--decode` greedy steps (EOS ignored so every run decodes the
same count). Runtimes alternate within each repetition and the median of `--reps` is
reported, because absolute speed on these machines drifts by 10-15 % between runs
(toolchain-facts §5): compare the ratios.

    python benchmarks/runtimes_bench.py [--reps 3] [--decode 64] [--threads 2] [--skip-proxy] [--skip-gguf]

llama.cpp rows need the patched llama-cpp-python (bash scripts/build_llamacpp.sh); its
llama.cpp is built portable (-DGGML_NATIVE=OFF) as CI builds it.

Writes docs/BENCHMARKS.md (the section between the markers) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
PROXY_EXPERTS = (4, 8)


def markers(experts: tuple[int, ...], skip_gguf: bool) -> tuple[str, str]:
    """The doc block a run writes: one per set of runtimes and proxies, so a shorter run
    (e.g. `--experts 4`) does not replace the table of a full one."""
    tag = "" if experts == PROXY_EXPERTS else f":{'-'.join(map(str, experts))}e"
    tag += ":no-gguf" if skip_gguf else ""
    return f"<!-- runtimes_bench{tag}:begin -->", f"<!-- runtimes_bench{tag}:end -->"


def child(kind: str, model: str, decode: int, threads: int) -> None:
    """Run one runtime once and print a JSON line of measurements."""
    import torch

    from medmoe_edge import api
    from medmoe_edge.generation import GenerationConfig, LoopTimings
    from medmoe_edge.perf import peak_rss_bytes
    from medmoe_edge.runtimes.base import RuntimeOptions

    t0 = time.perf_counter()
    pipe = api.load(model, runtime=kind, options=RuntimeOptions(num_threads=threads))
    load_s = time.perf_counter() - t0
    img = ROOT / "examples" / "ct-lesion.png"
    req, _ = pipe.prepare(img, "Is there an abnormality in this image?")
    rt = pipe.runtime
    rt.model_info.tokenizer.eos_id = -1  # EOS ignored: no sampled id matches, so every run decodes the same count
    loop = LoopTimings()
    for _ev in rt.generate([req], GenerationConfig(max_new_tokens=decode + 1), loop):  # greedy: prefill, then `decode` steps
        pass
    assert len(rt.timings.decode_s) == decode
    rss = peak_rss_bytes()
    print(json.dumps({"load_s": load_s, "ttft_s": loop.prefill_s, "decode_tok_s": 1.0 / statistics.median(rt.timings.decode_s), "peak_rss": rss, "torch_threads": torch.get_num_threads()}))


def measure(kind: str, model: Path | str, decode: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(model), "--decode", str(decode), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} on {model} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def make_proxy(out: Path, experts: int) -> Path:
    from medmoe_edge.presets import CLIP_L14_336, PRESETS, Preset
    from medmoe_edge.random_init import write_random_checkpoint
    from medmoe_edge.spec import MoESpec

    base = PRESETS[Preset.STABLELM]
    spec = replace(base, text=replace(base.text, num_layers=4), moe=MoESpec(layers=(0, 2), num_experts=experts), vision=CLIP_L14_336)
    # full_vocab: the released tokenizer covers the vocabulary, so the lm_head keeps its 100352 rows
    return write_random_checkpoint(spec, out, seed=0, dtype="float32", full_vocab=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("RUNTIME", "MODEL"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-proxy", action="store_true", help="only the demo model")
    ap.add_argument("--skip-gguf", action="store_true", help="leave out the llama.cpp runtime")
    ap.add_argument("--experts", type=int, nargs="+", default=list(PROXY_EXPERTS), help="expert counts of the real-dimension proxies [default: 4 8]")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory [default: a temporary one]")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.decode, a.threads)
        return

    from medmoe_edge.checkpoint import resolve_model_dir
    from medmoe_edge.export.onnx_export import export_onnx
    from medmoe_edge.info import checkpoint_info
    from medmoe_edge.runtimes.llamacpp_runtime import LlamaCppRuntime
    from medmoe_edge.vocab import Precision

    gguf_ok = LlamaCppRuntime.availability().available and not a.skip_gguf
    if gguf_ok:
        from medmoe_edge.export.gguf_export import export_gguf

        GGUF_QUANTS = (Precision.FP32, Precision.FP16, Precision.Q8_0, Precision.Q4_K_M)

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-bench-"))
    models: list[tuple[str, Path]] = [("demo", resolve_model_dir("demo"))]
    if not a.skip_proxy:
        for n in a.experts:
            d = work / f"proxy-stablelm-{n}e"
            models.append((f"StableLM-size proxy, {n} experts", d if (d / "config.json").is_file() else make_proxy(d, n)))
    rows = []
    for label, ckpt in models:
        info = checkpoint_info(str(ckpt))
        cands = [("torch fp32", "torch", ckpt)]
        for prec in (Precision.FP32, Precision.FP16):
            b = work / f"{ckpt.name}-onnx-{prec.value}"
            if not (b / "manifest.json").is_file():
                export_onnx(ckpt, b, prec)
            cands.append((f"onnxruntime {prec.value}", "onnxruntime", b))
        if gguf_ok:
            for q in GGUF_QUANTS:
                b = work / f"{ckpt.name}-gguf-{q.value}"
                if not (b / "manifest.json").is_file():
                    export_gguf(ckpt, b, q)
                cands.append((f"llamacpp {q.value}", "llamacpp", b))
        runs: dict[str, list[dict]] = {c[0]: [] for c in cands}
        for _ in range(a.reps):
            for name, kind, path in cands:
                runs[name].append(measure(kind, path, a.decode, a.threads))
                print(label, name, runs[name][-1], flush=True)
        ref = statistics.median(r["decode_tok_s"] for r in runs["torch fp32"])
        for name, _kind, path in cands:
            rs = runs[name]
            tok_s = statistics.median(r["decode_tok_s"] for r in rs)
            rows.append(
                {
                    "model": label,
                    "params": f"LLM {info.counts.llm_total / 1e6:,.0f} M total / {info.counts.llm_activated / 1e6:,.0f} M activated",
                    "runtime": name,
                    "ttft_ms": statistics.median(r["ttft_s"] for r in rs) * 1000,
                    "tok_s": tok_s,
                    "ratio": tok_s / ref,
                    "rss_mib": statistics.median(r["peak_rss"] for r in rs) / 2**20,
                    "size_mib": dir_size(path) / 2**20,
                }
            )
    write_doc(a, rows)


def _llama_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return ""
    return f", llama-cpp-python {llama_cpp.__version__} (portable CPU build)"


def write_doc(a, rows: list[dict]) -> None:
    import onnxruntime
    import torch

    experts = tuple(a.experts)
    begin, end = markers(experts, a.skip_gguf)
    experts_arg = "" if experts == PROXY_EXPERTS else " --experts " + " ".join(map(str, experts))
    lines = [
        f"Command: `python benchmarks/runtimes_bench.py --reps {a.reps} --decode {a.decode} --threads {a.threads}{' --skip-proxy' if a.skip_proxy else ''}{' --skip-gguf' if a.skip_gguf else ''}{experts_arg}` "
        f"(torch {torch.__version__}, onnxruntime {onnxruntime.__version__}{_llama_version()}, {a.threads} threads, one image + question, prefill then {a.decode} greedy decode steps, median of {a.reps} alternating runs, each in its own process).",
        "",
        "| model | parameters | runtime | time to first token (ms) | decode tok/s | decode vs torch | peak RSS (MiB) | size on disk (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']} | {r['runtime']} | {r['ttft_ms']:.0f} | {r['tok_s']:.1f} | {r['ratio']:.2f}× | {r['rss_mib']:.0f} | {r['size_mib']:.0f} |")
    by = {(r["model"], r["runtime"]): r["tok_s"] for r in rows}
    p4, p8 = "StableLM-size proxy, 4 experts", "StableLM-size proxy, 8 experts"
    if (p4, "onnxruntime fp32") in by and (p8, "onnxruntime fp32") in by:
        lines += ["", "Decode with 8 experts relative to 4 (same activated parameters, more total):", ""]
        for rt in sorted({r["runtime"] for r in rows}):
            if (p8, rt) in by and (p4, rt) in by:
                lines.append(f"* {rt}: {by[(p8, rt)] / by[(p4, rt)]:.2f}×")
    publish_block(DOC, begin, end, lines, "Benchmarks")


if __name__ == "__main__":
    main()
