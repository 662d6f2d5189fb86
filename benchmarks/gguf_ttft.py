"""Time to first token with an image: llama.cpp's parts (CLIP tower + projector in mtmd, prompt
prefill) against the PyTorch reference's, on the real-dimension proxy, with the settings that
decide them, side by side in one run.

Model: the proxy of `runtimes_bench.make_proxy` (StableLM-2-1.6B layer sizes, the real CLIP
ViT-L/14-336 tower with 576 image rows, 4 decoder layers with MoE on 0 and 2, 4 experts, random
weights), exported to GGUF at f16 and q4_k_m, each with an F32 and an F16 mmproj.

Each row runs in its own process: load, then one image + question (`examples/ct-lesion.png`), and
the time from the start of `prefill` to the first token's logits, split into the image encoder
(mtmd's `encode_image` / the reference's `encode_images`) and the rest (the prefill of ~616
positions). The first request after load is what `medmoe-edge run` sees (weights paged in,
compute buffers allocated on first use), so that is the TTFT reported; a second request gives
the warm figure. Rows alternate within each repetition; medians of `--reps`.

Settings varied (llama.cpp rows): mmproj precision, threads, `n_ubatch` (the prefill's
micro-batch; `n_batch` is the whole prompt), flash attention in the text model and in mtmd, and
the KV cache type.

    python benchmarks/gguf_ttft.py [--reps 3] [--threads 2] [--work DIR] [--quick]

Writes docs/GGUF.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "GGUF.md"
BEGIN, END = "<!-- gguf_ttft:begin -->", "<!-- gguf_ttft:end -->"
IMAGE = ROOT / "examples" / "ct-lesion.png"
QUESTION = "Is there an abnormality in this image?"


def child(kind: str, model: str, threads: int, settings: dict) -> None:
    """Load once, run two prefills, print one JSON line of timings."""
    import torch

    from medmoe_edge import api
    from medmoe_edge.runtimes.base import KvType, RuntimeOptions

    if kind == "llamacpp":
        import medmoe_edge.runtimes.llamacpp_runtime as lr

        lr.N_UBATCH = settings.get("ubatch", lr.N_UBATCH)
        lr.USE_EXTRA_BUFTS = settings.get("repack", lr.USE_EXTRA_BUFTS)
        if "fa_lm" in settings:
            lr.FLASH_ATTN = {k: (1 if settings["fa_lm"] or k is KvType.Q8_0 else 0) for k in KvType}
        if "fa_clip" in settings:
            lr.MTMD_FLASH_ATTN = 1 if settings["fa_clip"] else 0
    kv = KvType(settings["kv"]) if kind == "llamacpp" and "kv" in settings else None
    t0 = time.perf_counter()
    pipe = api.load(model, runtime=kind, options=RuntimeOptions(num_threads=threads, kv_type=kv))
    load_s = time.perf_counter() - t0
    rt = pipe.runtime
    req, _ = pipe.prepare(IMAGE, QUESTION)
    enc: list[float] = []
    if kind == "llamacpp":
        inner = rt.encode_image

        def timed(pixels):
            t = time.perf_counter()
            out = inner(pixels)
            enc.append(time.perf_counter() - t)
            return out

        rt.encode_image = timed
    else:
        model_ = rt.model
        inner = model_.encode_images

        def timed(pixels):
            t = time.perf_counter()
            out = inner(pixels)
            enc.append(time.perf_counter() - t)
            return out

        model_.encode_images = timed
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.inference_mode():
            rt.prefill([req], 1)
        runs.append(time.perf_counter() - t)
    print(json.dumps({"load_s": load_s, "ttft_s": runs[0], "encode_s": enc[0], "warm_ttft_s": runs[1], "warm_encode_s": enc[1], "positions": req.spliced_length(rt.model_info.spec.image_tokens), "settings": rt.settings()}))


def measure(kind: str, model: Path | str, threads: int, settings: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(model), "--threads", str(threads), "--settings", json.dumps(settings)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} on {model} {settings} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("RUNTIME", "MODEL"))
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="only the before/after rows (no sweep)")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.threads, json.loads(a.settings))
        return

    import llama_cpp
    import torch

    from medmoe_edge.export.gguf_export import export_gguf
    from medmoe_edge.vocab import Precision
    from runtimes_bench import make_proxy

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-ttft-"))
    ckpt = work / "proxy-4e"
    if not (ckpt / "config.json").exists():
        make_proxy(ckpt, 4)
    bundles: dict[tuple[str, str], Path] = {}
    for quant in (Precision.FP16, Precision.Q4_K_M):
        for mm in ("f32", "f16"):
            out = work / f"gguf-{quant.value}-mm{mm}"
            if not (out / "manifest.json").exists():
                export_gguf(ckpt, out, quant, mmproj_dtype=mm)
            bundles[(quant.value, mm)] = out

    before = {"ubatch": 512, "fa_lm": False, "fa_clip": False, "kv": "f32", "repack": True}
    rows: list[tuple[str, str, Path | str, int, dict]] = [("torch fp32 (reference)", "torch", ckpt, a.threads, {})]
    for q in ("fp16", "q4_k_m"):
        rows.append((f"llamacpp {q}, before: mmproj f32, n_ubatch 512, no FA, KV f32, repacked weights", "llamacpp", bundles[(q, "f32")], a.threads, before))
    if not a.quick:
        q = "q4_k_m"
        sweep = [
            ("mmproj f16", bundles[(q, "f16")], a.threads, before),
            ("n_ubatch 256", bundles[(q, "f32")], a.threads, before | {"ubatch": 256}),
            ("n_ubatch 128", bundles[(q, "f32")], a.threads, before | {"ubatch": 128}),
            ("n_ubatch 2048 (whole prompt)", bundles[(q, "f32")], a.threads, before | {"ubatch": 2048}),
            ("flash attention in the text model", bundles[(q, "f32")], a.threads, before | {"fa_lm": True}),
            ("flash attention in mtmd", bundles[(q, "f32")], a.threads, before | {"fa_clip": True}),
            ("KV f16", bundles[(q, "f32")], a.threads, before | {"kv": "f16"}),
            ("KV q8_0 (flash attention on)", bundles[(q, "f32")], a.threads, before | {"kv": "q8_0"}),
            ("no weight repacking", bundles[(q, "f32")], a.threads, before | {"repack": False}),
            ("1 thread", bundles[(q, "f32")], 1, before),
        ]
        rows += [(f"llamacpp {q}, {name}", "llamacpp", b, th, s) for name, b, th, s in sweep]
    after = {"kv": "f16"}  # the runtime's defaults, whatever they are now, plus its default KV type
    for q in ("fp16", "q4_k_m"):
        rows.append((f"llamacpp {q}, after: mmproj f16, the runtime's defaults", "llamacpp", bundles[(q, "f16")], a.threads, after))
    rows.append(("torch fp32 (reference), again", "torch", ckpt, a.threads, {}))

    results: dict[int, list[dict]] = {i: [] for i in range(len(rows))}
    t_start = time.perf_counter()
    for rep in range(a.reps):
        order = range(len(rows)) if rep % 2 == 0 else reversed(range(len(rows)))
        for i in order:
            _, kind, model, th, s = rows[i]
            results[i].append(measure(kind, model, th, s))
            print(rep, rows[i][0], results[i][-1], flush=True)
    minutes = (time.perf_counter() - t_start) / 60

    def med(i: int, key: str) -> float:
        return statistics.median(r[key] for r in results[i])

    ref = statistics.median([med(0, "ttft_s"), med(len(rows) - 1, "ttft_s")])
    positions = results[0][0]["positions"]
    lines = [
        f"Command: `python benchmarks/gguf_ttft.py --reps {a.reps} --threads {a.threads}{' --quick' if a.quick else ''}` "
        f"(torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, portable CPU build; real-dimension proxy, 4 layers, 4 experts; "
        f"one image, {positions} positions; first request after load; median of {a.reps} alternating runs; {minutes:.1f} min).",
        "",
        "| row | threads | TTFT (ms) | image encoder (ms) | prefill of the rest (ms) | warm TTFT (ms) | TTFT vs torch fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (name, _kind, _m, th, _s) in enumerate(rows):
        ttft, encode = med(i, "ttft_s"), med(i, "encode_s")
        lines.append(f"| {name} | {th} | {ttft * 1000:,.0f} | {encode * 1000:,.0f} | {(ttft - encode) * 1000:,.0f} | {med(i, 'warm_ttft_s') * 1000:,.0f} | {ttft / ref:.2f}× |")
    publish_block(DOC, BEGIN, END, lines, "GGUF bundles and the llama.cpp runtime", publish=not a.no_doc)


if __name__ == "__main__":
    main()
