"""`compare` on the real-dimension StableLM proxy, with stock llama.cpp's dense StableLM-2-1.6B in the same run.

Models:
* the proxy of `runtimes_bench.make_proxy`: the StableLM-2-1.6B variant's layer sizes (hidden 2048,
  FFN 5632, 32 heads) and the real CLIP ViT-L/14-336 tower (576 image rows), **4 decoder layers**
  (MoE on 0 and 2, 4 experts, top-1 + meta expert), random weights; rows: the torch reference,
  ONNX Runtime fp32, our llama.cpp (patched `medmoe-stablelm` arch) q8_0 and q4_k_m;
* a dense StableLM-2-1.6B-shaped GGUF (24 layers, hidden 2048, FFN 5632, 32 heads, vocab 100352,
  random weights) for llama.cpp's stock `stablelm` architecture, written with gguf-py at F16 and
  quantized to q4_k_m by llama.cpp's own `llama_model_quantize`; it runs in a worker of this
  script that speaks `perf.Worker`'s protocol, so `compare` alternates it with the other rows
  question by question. It has no image: its prompt is random token ids as long as the MoE
  rows' prompts (576 image rows + the text), then the same number of greedy decode steps.

Every row's decode tok/s is also given as a share of the memory-bandwidth roofline: tok/s ×
activated weight bytes per token (for the dense model: every tensor but the embedding table)
/ the bandwidth doctor's probe measures in the same run.

    python benchmarks/compare_proxy.py [--limit 8] [--threads 2] [--work DIR] [--skip-onnx] [--setup-only]

Writes docs/COMPARE.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "COMPARE.md"
BEGIN, END = "<!-- compare_proxy:begin -->", "<!-- compare_proxy:end -->"
MARKER = "@@medmoe-perf "
DENSE = {"hidden": 2048, "layers": 24, "ffn": 5632, "heads": 32, "vocab": 100352, "context": 4096, "rot": 16}
TEXT_TOKENS = 40  # text positions of a proxy prompt besides the 576 image rows (template + question)


# --- the dense stock model ---------------------------------------------------------------------------


def write_dense_gguf(path: Path) -> None:
    """A random dense StableLM-2-1.6B-shaped F16 GGUF for llama.cpp's stock `stablelm` arch."""
    import numpy as np
    from gguf import GGUFWriter

    d = DENSE
    h, f, v = d["hidden"], d["ffn"], d["vocab"]
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(v * h, dtype=np.float32) * 0.02).astype(np.float16)  # one pool, sliced per tensor
    off = [0]

    def t(*shape: int):
        n = int(np.prod(shape))
        start = off[0] if off[0] + n <= pool.size else 0
        off[0] = (start + n + 4099) % max(1, pool.size - n)
        return pool[start : start + n].reshape(shape)

    def norm(n: int):
        return np.ones(n, dtype=np.float32)

    w = GGUFWriter(str(path), "stablelm")
    w.add_name("dense StableLM-2-1.6B shape, random weights")
    w.add_context_length(d["context"])
    w.add_embedding_length(h)
    w.add_block_count(d["layers"])
    w.add_feed_forward_length(f)
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["heads"])
    w.add_layer_norm_eps(1e-5)
    w.add_rope_dimension_count(d["rot"])
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("none")
    w.add_vocab_size(v)
    w.add_file_type(1)  # MOSTLY_F16
    w.add_tensor("token_embd.weight", t(v, h))
    for i in range(d["layers"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(h))
        w.add_tensor(p + "attn_norm.bias", np.zeros(h, np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(p + name + ".weight", t(h, h))
            w.add_tensor(p + name + ".bias", np.zeros(h, np.float32))  # StableLM-2-1.6B has q/k/v biases
        w.add_tensor(p + "attn_output.weight", t(h, h))
        w.add_tensor(p + "ffn_norm.weight", norm(h))
        w.add_tensor(p + "ffn_norm.bias", np.zeros(h, np.float32))
        w.add_tensor(p + "ffn_gate.weight", t(f, h))
        w.add_tensor(p + "ffn_up.weight", t(f, h))
        w.add_tensor(p + "ffn_down.weight", t(h, f))
    w.add_tensor("output_norm.weight", norm(h))
    w.add_tensor("output_norm.bias", np.zeros(h, np.float32))
    w.add_tensor("output.weight", t(v, h))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, threads: int) -> None:
    import ctypes

    from medmoe_edge.llamacpp_lib import require_patched_llama_cpp

    lc = require_patched_llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} failed")


def dense_decode_bytes(path: Path):
    """Bytes of every tensor but the embedding table (what one decode step reads), from the GGUF."""
    from gguf import GGUFReader

    from medmoe_edge.perf import DecodeBytes

    r = GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")
    params = sum(int(t.n_elements) for t in r.tensors if t.name != "token_embd.weight")
    return DecodeBytes(total, f"every tensor of the q4_k_m GGUF but token_embd ({params:,} parameters)")


# --- the stock worker (perf.Worker's protocol) --------------------------------------------------------


def _send(obj: dict) -> None:
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def stock_worker(model: str, threads: int, positions: int, decode: int) -> None:
    import llama_cpp
    import numpy as np

    from medmoe_edge.perf import peak_rss_bytes

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=positions + decode + 8, n_batch=2048, n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0, flash_attn=False, verbose=False)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)

    def run(n_prompt: int, steps: int) -> dict:
        ids = rng.integers(1000, DENSE["vocab"] - 1000, n_prompt).tolist()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        step_s = []
        for _ in range(steps):
            s = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            step_s.append(time.perf_counter() - s)
        return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": sum(step_s), "decode_steps": steps}

    run(16, 4)  # warm-up
    _send({"ok": True, "load_s": load_s, "threads": threads, "reports_routing": False, "max_batch": 1, "peak_rss": peak_rss_bytes(), "gpu_peak": None})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            _send({"ok": True, "peak_rss": peak_rss_bytes(), "gpu_peak": None})
            break
        _send({"ok": True, "index": cmd["index"], **run(positions, decode), "peak_rss": peak_rss_bytes(), "gpu_peak": None})


# --- the run ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stock-worker", nargs=4, metavar=("GGUF", "THREADS", "POSITIONS", "DECODE"), help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--setup-only", action="store_true", help="write the models and bundles into --work, then stop")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory, reused between runs [default: a temporary one]")
    a = ap.parse_args()
    if a.stock_worker:
        m, t, p, d = a.stock_worker
        stock_worker(m, int(t), int(p), int(d))
        return

    from runtimes_bench import make_proxy

    from medmoe_edge.checkpoint import read_spec
    from medmoe_edge.comparison import ExternalRow, compare
    from medmoe_edge.workflows import export_bundle

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-compare-proxy-"))
    work.mkdir(parents=True, exist_ok=True)
    t_setup = time.perf_counter()
    proxy = work / "proxy-stablelm-4e"
    if not (proxy / "config.json").is_file():
        print("writing the proxy checkpoint", flush=True)
        make_proxy(proxy, 4)
    bundles = []
    for fmt, given, name in (("onnx", {}, "onnx-fp32"), ("gguf", {"--quant": "q8_0"}, "gguf-q8_0"), ("gguf", {"--quant": "q4_k_m"}, "gguf-q4_k_m")):
        if fmt == "onnx" and a.skip_onnx:
            continue
        b = work / f"proxy-{name}"
        if not (b / "manifest.json").is_file():
            print(f"exporting {name}", flush=True)
            shutil.rmtree(b, ignore_errors=True)
            export_bundle(fmt, proxy, b, given, trace_questions=0)
        bundles.append(b)
    dense = work / "stablelm-2-1_6b-dense-q4_k_m.gguf"
    if not dense.is_file():
        f16 = work / "stablelm-2-1_6b-dense-f16.gguf"
        print("writing the dense StableLM-2-1.6B-shaped GGUF", flush=True)
        write_dense_gguf(f16)
        print("quantizing it to q4_k_m", flush=True)
        quantize(f16, dense, a.threads)
        f16.unlink()
    setup_s = time.perf_counter() - t_setup
    if a.setup_only:
        print(f"set up in {work} ({setup_s / 60:.1f} min)")
        return
    spec, _cfg, _tower = read_spec(proxy)
    positions = spec.image_tokens + TEXT_TOKENS
    stock = ExternalRow(
        "stock llama.cpp stablelm dense q4_k_m",
        "llamacpp (stock stablelm)",
        [sys.executable, str(Path(__file__).resolve()), "--stock-worker", str(dense), str(a.threads), str(positions), str(a.max_new_tokens - 1)],
        size_bytes=dense.stat().st_size,
        decode=dense_decode_bytes(dense),
        note=f"dense StableLM-2-1.6B shape (24 layers), text only: {positions} random prompt ids, then {a.max_new_tokens - 1} greedy decode steps",
    )
    report = work / "report"
    shutil.rmtree(report, ignore_errors=True)
    t0 = time.perf_counter()
    result = compare(str(proxy), bundles=bundles, runtimes=["torch"], limit=a.limit, max_new_tokens=a.max_new_tokens, threads=a.threads, out=report, extra=[stock], progress=lambda i, n: print(f"  {i}/{n}", flush=True))
    run_s = time.perf_counter() - t0
    data = result.to_json()
    (work / "compare-proxy.json").write_text(json.dumps(data, indent=2))
    for name in ("decode_tok_s.png",):
        shutil.copy(report / name, ROOT / "docs" / f"compare-proxy-{name}")
    write_doc(a, data, setup_s, run_s)


def write_doc(a, data: dict, setup_s: float, run_s: float) -> None:
    from medmoe_edge.charts import MIB

    bw = data["bandwidth"]
    libs = data["libraries"]
    lines = [
        f"Command: `python benchmarks/compare_proxy.py --limit {a.limit} --max-new-tokens {a.max_new_tokens} --threads {a.threads}{' --skip-onnx' if a.skip_onnx else ''}` "
        f"(torch {libs.get('torch')}, onnxruntime {libs.get('onnxruntime')}, llama-cpp-python {libs.get('llama_cpp_python')}, portable CPU build; {a.threads} threads; "
        f"{data['set']['questions']} eval questions, each row's free run decodes {a.max_new_tokens - 1} steps; {f'setup {setup_s / 60:.1f} min, ' if setup_s >= 6 else ''}compare {run_s / 60:.1f} min). "
        f"Memory bandwidth measured in the same run: **{bw['gbs']:.1f} GB/s** ({bw['method']}; probes {', '.join(f'{p:.1f}' for p in bw['probes_gbs'])} GB/s).",
        "",
        "| row | size on disk (MiB) | weights read per token (MiB) | time to first token (ms) | decode tok/s (p10–p90) | share of the roofline | peak RSS (MiB) | answers / tokens vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']}: {r['reason']} |  |  |  |  |  |  |")
            continue
        d = r["decode_tok_s"]
        f = r["fidelity"]
        fid = "–" if f is None else f"{100 * f['answer_agreement']:.0f} % / {100 * f['token_agreement']:.1f} %"
        lines.append(
            f"| {r['label']} | {r['size_bytes'] / MIB:,.0f} | {r['decode_bytes_per_token'] / MIB:,.0f} | {r['ttft_s']['median'] * 1000:,.0f} | "
            f"{d['median']:.1f} ({d['p10']:.1f}–{d['p90']:.1f}) | {r['roofline_fraction']:.2f} | {r['peak_rss_bytes'] / MIB:,.0f} | {fid} |"
        )
    by = {r["label"]: r for r in data["rows"] if r["status"] == "ok"}
    ours, stock = by.get("llamacpp q4_k_m"), by.get("stock llama.cpp stablelm dense q4_k_m")
    if ours and stock:
        lines += [
            "",
            f"llama.cpp q4_k_m decode as a share of the roofline: **{ours['roofline_fraction']:.2f}** for the Med-MoE proxy (patched `medmoe-stablelm`, expert-sparse) "
            f"against **{stock['roofline_fraction']:.2f}** for stock llama.cpp's dense StableLM-2-1.6B shape at the same quant, same run, same threads "
            f"({ours['decode_tok_s']['median']:.1f} vs {stock['decode_tok_s']['median']:.1f} tok/s; {ours['decode_bytes_per_token'] / MIB:,.0f} vs {stock['decode_bytes_per_token'] / MIB:,.0f} MiB of weights per token).",
        ]
    publish_block(DOC, BEGIN, END, lines, "Comparing runtimes")


if __name__ == "__main__":
    main()
