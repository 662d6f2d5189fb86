"""Decode speed per activated byte: the Med-MoE architecture (patched llama.cpp, `medmoe-stablelm`) against
llama.cpp's stock dense `stablelm` architecture at the same layer shapes, q4_k_m and q8_0, one build.

The two models are made from one exported bundle of the whole real-dimension StableLM-variant Med-MoE
(`init-random --preset stablelm`: 24 layers, MoE on the 12 even ones, 4 experts + the meta expert,
top-1), so that every tensor they share holds the same bytes in the same ggml type:

* **moe**: the bundle's model.gguf as it is, except the vocabulary;
* **dense**: the same file with every MoE layer's FFN replaced by its meta expert (`ffn_*_shexp` ->
  `ffn_*`), the router and the routed experts dropped, written for the stock `stablelm` arch: a
  StableLM-2-1.6B-shaped dense model (H 2048, FFN 5632, 24 layers, 32 heads).

Both get StableLM-2's 100,352-row vocabulary (token_embd and output are the bundle's 512 rows of codes
repeated; speed does not depend on the values; the tokenizer gets placeholder tokens), because the
output head is a large part of the bytes every token reads.

Each row is its own process: load (ggml-cpu weight repacking on or off: `use_extra_bufts`), a
32-token prompt, then `--decode` single-token steps (fixed ids, last-position logits, KV f16, the
runtime's other defaults); decode tok/s is 1 / median step time. Weight bytes read per token count
every tensor once, except token_embd (one row) and the stacked experts (the experts used per token:
1 of 4). Effective bandwidth = tok/s x bytes per token; the issue's bound is moe/dense >= 0.9.

    python benchmarks/gguf_bandwidth.py --work DIR [--reps 3] [--decode 128]
      (DIR holds sl24/ and the sl24-<quant>-mmf16 bundles, as benchmarks/gguf_load_memory.py leaves them; missing ones are made)

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
BEGIN, END = "<!-- gguf_bandwidth:begin -->", "<!-- gguf_bandwidth:end -->"
MOE_ARCH, DENSE_ARCH = "medmoe-stablelm", "stablelm"
VOCAB = 100352  # StableLM-2's vocabulary rows
QUANTS = ("q4_k_m", "q8_0")
PROMPT = 32


# ---- building the two GGUFs ----------------------------------------------------------------------


def rewrite(src: Path, dst: Path, *, dense: bool) -> None:
    """Write `dst` from the Med-MoE text GGUF `src`: the vocabulary widened to VOCAB rows, and for
    `dense` the MoE layers' meta experts as their FFNs under the stock stablelm arch."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    arch = DENSE_ARCH if dense else MOE_ARCH
    w = GGUFWriter(str(dst), arch)
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
    reps = VOCAB // n_vocab
    assert reps * n_vocab == VOCAB, (n_vocab, VOCAB)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = name.replace(MOE_ARCH + ".", arch + ".", 1)
        if dense and ".expert_" in key:
            continue
        val = f.contents()  # what GGUFWriter.add_key_value takes
        if name == "tokenizer.ggml.tokens":
            val = list(val) + [f"<|pad{i}|>" for i in range(VOCAB - n_vocab)]
        elif name == "tokenizer.ggml.token_type":
            val = list(val) + [4] * (VOCAB - n_vocab)  # USER_DEFINED
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, val, f.types[0], sub)
    for t in r.tensors:
        name = t.name
        if dense and (".ffn_gate_inp." in name or "_exps." in name):
            continue
        if dense:
            name = name.replace("_shexp.", ".")
        data = t.data
        if name in ("token_embd.weight", "output.weight"):
            data = np.tile(data, (reps, 1))
        w.add_tensor(name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bytes_per_token(path: Path) -> tuple[int, int]:
    """(weight bytes read per token, file's weight bytes): token_embd one row, stacked experts the used ones."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    experts = r.fields.get(f"{arch}.expert_count")
    used = r.fields.get(f"{arch}.expert_used_count")
    used_per_layer = used.contents() if used is not None else None
    total = read = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        if t.name == "token_embd.weight":
            read += n // int(t.shape[1])  # one row of n_vocab
        elif "_exps." in t.name:
            layer = int(t.name.split(".")[1])
            k = used_per_layer[layer] if isinstance(used_per_layer, list) else used_per_layer
            read += n * int(k) // int(experts.contents())
        else:
            read += n
    return read, total


# ---- one measurement (child process) ---------------------------------------------------------------


def child(path: str, threads: int, decode: int, repack: bool) -> None:
    import ctypes

    from medmoe_edge.llamacpp_lib import import_llama

    _llama_cpp, lib, _mtmd = import_llama()
    lib.llama_backend_init()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = repack
    t0 = time.perf_counter()
    model = lib.llama_model_load_from_file(path.encode(), mp)
    assert model, path
    cp = lib.llama_context_default_params()
    cp.n_ctx = 1024
    cp.n_batch = cp.n_ubatch = 512
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = threads
    cp.type_k = cp.type_v = 1  # f16, the runtime's default
    cp.flash_attn_type = 0
    cp.no_perf = True
    ctx = lib.llama_init_from_model(model, cp)
    assert ctx
    load_s = time.perf_counter() - t0
    n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
    prompt = (ctypes.c_int32 * PROMPT)(*[(7 * i + 3) % 512 for i in range(PROMPT)])
    assert lib.llama_decode(ctx, lib.llama_batch_get_one(prompt, PROMPT)) == 0
    steps = []
    tok = (ctypes.c_int32 * 1)()
    for i in range(decode):
        tok[0] = (13 * i + 5) % 512
        t = time.perf_counter()
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(tok, 1)) == 0
        lib.llama_synchronize(ctx)
        assert lib.llama_get_logits_ith(ctx, -1)
        steps.append(time.perf_counter() - t)
    print(json.dumps({"load_s": load_s, "tok_s": 1 / statistics.median(steps), "n_vocab": n_vocab}))
    lib.llama_free(ctx)
    lib.llama_model_free(model)


def measure(path: Path, threads: int, decode: int, repack: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(threads), "--decode", str(decode)] + ([] if repack else ["--no-repack"])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{path} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--no-repack", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.threads, a.decode, not a.no_repack)
        return

    import llama_cpp

    from medmoe_edge.export.gguf_export import export_gguf
    from medmoe_edge.vocab import Precision

    t_start = time.perf_counter()
    work = a.work
    ckpt = work / "sl24"
    if not (ckpt / "config.json").exists():
        subprocess.run([str(Path(sys.executable).with_name("medmoe-edge")), "init-random", "--preset", "stablelm", "--out", str(ckpt)], check=True)
    files: dict[tuple[str, str], Path] = {}
    for q in QUANTS:
        bundle = work / f"sl24-{q}-mmf16"
        if not (bundle / "manifest.json").exists():
            export_gguf(ckpt, bundle, Precision.parse(q), mmproj_dtype="f16")
        for kind in ("dense", "moe"):
            out = work / f"bw-{kind}-{q}.gguf"
            if not out.exists():
                rewrite(bundle / "model.gguf", out, dense=kind == "dense")
            files[(kind, q)] = out

    rows = [(kind, q, repack) for q in QUANTS for repack in (True, False) for kind in ("dense", "moe")]
    results: dict[tuple, list[dict]] = {r: [] for r in rows}
    for rep in range(a.reps):
        for row in rows if rep % 2 == 0 else list(reversed(rows)):
            results[row].append(measure(files[row[:2]], a.threads, a.decode, row[2]))
            print(rep, row, results[row][-1], flush=True)
    minutes = (time.perf_counter() - t_start) / 60

    def tok_s(row) -> float:
        return statistics.median(r["tok_s"] for r in results[row])

    mib = 2**20
    lines = [
        f"Command: `python benchmarks/gguf_bandwidth.py --work DIR --reps {a.reps} --decode {a.decode} --threads {a.threads}` (llama-cpp-python {llama_cpp.__version__}, portable CPU build; "
        f"{a.threads} threads; a {PROMPT}-token prompt then {a.decode} decode steps, KV f16; median of {a.reps} alternating runs, one process each; {minutes:.1f} min).",
        "",
        "| quant | weight repacking | arch | file (MiB) | weights read per token (MiB) | decode tok/s | effective bandwidth (GB/s) | moe / dense (median of per-run ratios) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for q in QUANTS:
        read = {kind: bytes_per_token(files[(kind, q)]) for kind in ("dense", "moe")}
        for repack in (True, False):
            # the ratio is taken per repetition (dense and moe run back to back), then the median:
            # these machines drift 10-15 % between runs, much less between neighbours
            pairs = zip(results[("dense", q, repack)], results[("moe", q, repack)])
            ratio = statistics.median(m["tok_s"] * read["moe"][0] / (d["tok_s"] * read["dense"][0]) for d, m in pairs)
            for kind in ("dense", "moe"):
                per_token, total = read[kind]
                cell = "" if kind == "dense" else f"**{ratio:.2f}**"
                arch = f"`{DENSE_ARCH}` (stock, dense)" if kind == "dense" else f"`{MOE_ARCH}` (4 experts + meta, top-1)"
                lines.append(f"| {q} | {'on' if repack else 'off'} | {arch} | {total / mib:,.0f} | {per_token / mib:,.0f} | {tok_s((kind, q, repack)):.2f} | {tok_s((kind, q, repack)) * per_token / 1e9:.2f} | {cell} |")
            verdicts.append((q, repack, ratio))
    lines += [
        "",
        "Bound moe/dense >= 0.9: "
        + "; ".join(f"{q} repack {'on' if rp else 'off'} {v:.2f} {'met' if v >= 0.9 else 'NOT met'}" for q, rp, v in verdicts)
        + ". Decode with repacking off against on (the runtime's load-time choice): "
        + "; ".join(f"{q} {kind} {tok_s((kind, q, False)) / tok_s((kind, q, True)):.2f}x" for q in QUANTS for kind in ("dense", "moe"))
        + ".",
    ]
    publish_block(DOC, BEGIN, END, lines, "GGUF bundles and the llama.cpp runtime", publish=not a.no_doc)


if __name__ == "__main__":
    main()
