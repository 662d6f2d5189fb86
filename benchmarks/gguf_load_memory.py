"""Load time and resident memory of the llama.cpp runtime on the whole real-dimension StableLM-variant
Med-MoE (`init-random --preset stablelm`: 24 layers, 4 experts, the real CLIP ViT-L/14-336 tower),
part by part, and the bounds `medmoe-edge run` must keep.

Each row is its own process: `LlamaCppRuntime` load (its `timings.load_parts_s`: library, bundle
check = SHA-256 of every file, text model, context = KV cache + compute buffers, mmproj; and the
resident memory after each part), then one image + question, greedy 8 tokens (the answer must be
the same in every row), peak RSS (VmHWM) and how much of the resident memory is file-backed
(mmapped weights) or anonymous (copies, repacked weights, KV, buffers). Rows vary the mmproj
precision, the KV cache type, mmap and ggml-cpu's weight repacking.

Then `medmoe-edge run --runtime llamacpp --json` itself on the chosen bundle, checked against
    peak RSS <= bundle size + KV cache at the context + 0.5 GB,
    load (bundle check included) <= 5 s + 1 s per GB of bundle.

    python benchmarks/gguf_load_memory.py --work DIR [--reps 2]   (DIR holds sl24/, from init-random, or it is made)

Writes docs/GGUF.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "GGUF.md"
BEGIN, END = "<!-- gguf_load_memory:begin -->", "<!-- gguf_load_memory:end -->"
IMAGE = ROOT / "examples" / "ct-lesion.png"
QUESTION = "Is there an abnormality in this image?"
GB = 1e9


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(bundle: str, threads: int, settings: dict) -> None:
    import medmoe_edge.runtimes.llamacpp_runtime as lr
    from medmoe_edge import api
    from medmoe_edge.generation import GenerationConfig
    from medmoe_edge.runtimes.base import KvType, RuntimeOptions

    if "load_mode" in settings:
        lr.LOAD_MODE = settings["load_mode"]
    if "extra_bufts" in settings:
        lr.USE_EXTRA_BUFTS = settings["extra_bufts"]
    kv = KvType(settings["kv"]) if "kv" in settings else None
    base = _status("VmRSS")
    t0 = time.perf_counter()
    pipe = api.load(bundle, runtime="llamacpp", options=RuntimeOptions(num_threads=threads, kv_type=kv))
    load_s = time.perf_counter() - t0
    rt = pipe.runtime
    after_load = {"rss": _status("VmRSS"), "anon": _status("RssAnon"), "file": _status("RssFile")}
    t = time.perf_counter()
    ans = pipe.answer(IMAGE, QUESTION, generation=GenerationConfig(max_new_tokens=8))
    answer_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "load_s": load_s,
                "parts": rt.timings.load_parts_s,
                "rss_parts": rt.load_rss_mib,
                "base_rss": base,
                "after_load": after_load,
                "after_answer": {"anon": _status("RssAnon"), "file": _status("RssFile")},
                "peak": _status("VmHWM"),
                "ttft_s": ans.timings.time_to_first_token_s,
                "answer_s": answer_s,
                "tokens": ans.token_ids,
                "kv_bytes": rt.kv_cache_bytes,
                "settings": rt.settings(),
            }
        )
    )


def measure(bundle: Path, threads: int, settings: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", str(bundle), "--threads", str(threads), "--settings", json.dumps(settings)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{bundle} {settings} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_cli(bundle: Path, threads: int) -> dict:
    exe = Path(sys.executable).with_name("medmoe-edge")
    cmd = [str(exe), "run", "--runtime", "llamacpp", "--model", str(bundle), "--image", str(IMAGE), "--question", QUESTION, "--json", "--max-new-tokens", "8", "--threads", str(threads)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"run failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout)
    out["wall_s"] = time.perf_counter() - t
    return out


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--settings", default="{}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", type=Path, required=False)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.threads, json.loads(a.settings))
        return

    import llama_cpp

    from medmoe_edge.export.gguf_export import export_gguf
    from medmoe_edge.vocab import Precision

    work = a.work
    ckpt = work / "sl24"
    if not (ckpt / "config.json").exists():
        subprocess.run([str(Path(sys.executable).with_name("medmoe-edge")), "init-random", "--preset", "stablelm", "--out", str(ckpt)], check=True)
    bundles = {}
    for mm in ("f32", "f16"):
        out = work / f"sl24-q4_k_m-mm{mm}"
        if not (out / "manifest.json").exists():
            export_gguf(ckpt, out, Precision.Q4_K_M, mmproj_dtype=mm)
        bundles[mm] = out

    before = {"kv": "f32", "load_mode": 1, "extra_bufts": True}
    rows = [
        ("before: mmproj f32, KV f32, mmap + repack", bundles["f32"], before),
        ("mmproj f16", bundles["f16"], before),
        ("mmproj f16, KV f16", bundles["f16"], before | {"kv": "f16"}),
        ("mmproj f16, KV f16, mmap, no repack", bundles["f16"], before | {"kv": "f16", "extra_bufts": False}),
        ("mmproj f16, KV f16, no mmap, repack", bundles["f16"], before | {"kv": "f16", "load_mode": 0}),
        ("after: mmproj f16, the runtime's defaults", bundles["f16"], {}),
    ]
    results: dict[int, list[dict]] = {i: [] for i in range(len(rows))}
    t_start = time.perf_counter()
    for rep in range(a.reps):
        order = range(len(rows)) if rep % 2 == 0 else reversed(range(len(rows)))
        for i in order:
            results[i].append(measure(rows[i][1], a.threads, rows[i][2]))
            print(rep, rows[i][0], json.dumps(results[i][-1])[:400], flush=True)
    cli = run_cli(bundles["f16"], a.threads)
    minutes = (time.perf_counter() - t_start) / 60

    answers = {tuple(r["tokens"]) for rs in results.values() for r in rs} | {tuple(cli["token_ids"])}

    def med(i: int, f) -> float:
        return statistics.median(f(r) for r in results[i])

    mib = 2**20
    lines = [
        f"Command: `python benchmarks/gguf_load_memory.py --work DIR --reps {a.reps} --threads {a.threads}` (llama-cpp-python {llama_cpp.__version__}, portable CPU build; "
        f"the whole StableLM-variant Med-MoE at real dimensions, `init-random --preset stablelm`, 24 layers, exported `--quant q4_k_m`; one image + question, 8 greedy tokens; "
        f"median of {a.reps} alternating runs, one process each; {minutes:.1f} min). Answers: {'identical in every row' if len(answers) == 1 else f'{len(answers)} different token sequences'}.",
        "",
        "| row | bundle (MiB) | load (s) | bundle check (s) | text model (s) | context (s) | mmproj (s) | RSS after load (MiB) | of it file-backed | peak RSS (MiB) | KV (MiB) | TTFT (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (name, bundle, _s) in enumerate(rows):
        p = lambda k: med(i, lambda r: r["parts"][k])  # noqa: E731
        lines.append(
            f"| {name} | {dir_size(bundle) / mib:,.0f} | {med(i, lambda r: r['load_s']):.1f} | {p('bundle_check_s'):.1f} | {p('text_model_s'):.1f} | {p('context_s'):.1f} | {p('mmproj_s'):.1f} | "
            f"{med(i, lambda r: r['after_load']['rss']) / mib:,.0f} | {med(i, lambda r: r['after_load']['file']) / mib:,.0f} | {med(i, lambda r: r['peak']) / mib:,.0f} | "
            f"{results[i][0]['kv_bytes'] / mib:,.0f} | {med(i, lambda r: r['ttft_s']):.1f} |"
        )
    size = dir_size(bundles["f16"])
    kv = cli["runtime_settings"]["kv_cache_mib"] * mib
    rss_bound = size + kv + 0.5 * GB
    load_bound = 5 + size / GB
    peak = cli["memory"]["peak_rss_mb"] * mib
    lines += [
        "",
        f"`medmoe-edge run --runtime llamacpp --model sl24-q4_k_m-mmf16 --image examples/ct-lesion.png --question … --json --max-new-tokens 8 --threads {a.threads}`: "
        f"peak RSS **{peak / mib:,.0f} MiB** against the bound bundle {size / mib:,.0f} + KV {kv / mib:,.0f} (kv_type {cli['runtime_settings']['kv_type']}, {cli['runtime_settings']['n_ctx']} positions) + 477 (0.5 GB) = {rss_bound / mib:,.0f} MiB: "
        f"**{'within' if peak <= rss_bound else 'OVER'}**; load **{cli['timings']['load_s']:.1f} s** (bundle check {cli['timings']['load_parts_s']['bundle_check_s']:.1f} s) against 5 s + 1 s/GB = {load_bound:.1f} s: "
        f"**{'within' if cli['timings']['load_s'] <= load_bound else 'OVER'}**; whole `run` {cli['wall_s']:.1f} s wall.",
    ]
    publish_block(DOC, BEGIN, END, lines, "GGUF bundles and the llama.cpp runtime", publish=not a.no_doc)


if __name__ == "__main__":
    main()
