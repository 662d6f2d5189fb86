"""GGUF expert layout: stacked `ffn_*_exps` (one tensor per layer and projection) vs one tensor per expert.

The question (issue: per-expert quantization) is whether to store each expert as its own
2-D tensor, which would let every expert have its own ggml type, or to stack the experts of a
layer into one 3-D tensor, which forces one type on all experts of that layer/projection.

ggml's only sparse expert op is `ggml_mul_mat_id`, and it takes one stacked tensor; ggml graphs
have no conditional execution. A graph over separate per-expert tensors therefore has to
multiply every token through every expert (`ggml_mul_mat` per expert) and mask the results
with the routing weights. That reads all E experts' weights per decoded token. The stacked
layout with `expert_used_count = E` on the MoE layers does the same reads and the same
matrix products through the same CPU kernels, so it is what is timed here as the per-expert
layout's cost (its answers differ; only speed is compared). `expert_used_count = 1` is the
stacked, expert-sparse graph our patch runs.

Model: the real-dimension proxy of runtimes_bench.py (StableLM-2 layer sizes, 4 decoder
layers, MoE on 0 and 2, 4 experts, random weights), text only, 32-token prompt, then 64
single-token decode steps; both files alternate `--reps` times in this one process and the
median is reported (absolute speed drifts 10-15 % between runs on these machines).

    python benchmarks/gguf_expert_layout.py [--reps 3] [--quant q8_0] [--threads 2]

Writes docs/GGUF.md (the section between the markers). Needs the patched llama-cpp-python.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "GGUF.md"
BEGIN, END = "<!-- gguf_expert_layout:begin -->", "<!-- gguf_expert_layout:end -->"


def with_experts_used(src: Path, dst: Path, used: int) -> None:
    """Copy an F32 text GGUF with `expert_used_count` set to `used` on its MoE layers."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(src))
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == f"{arch}.expert_used_count":
            value = [used if v else 0 for v in value]
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in r.tensors:  # an F32 file: the data's numpy shape is already the torch shape
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def decode_tok_s(path: Path, threads: int, prompt: int, steps: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt + steps + 8, n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0, verbose=False)
    try:
        ids = [(7 * i + 3) % 200 + 10 for i in range(prompt)]
        llm.eval(ids)
        times = []
        tok = ids[-1]
        for _ in range(steps):
            t = time.perf_counter()
            llm.eval([tok])
            times.append(time.perf_counter() - t)
        return 1.0 / statistics.median(times)
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quant", default="q8_0", help="llama.cpp type of the files (f32, f16, q8_0, q4_k_m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()

    from runtimes_bench import make_proxy

    from medmoe_edge.export.gguf_export import quantize
    from medmoe_edge.export.gguf_text import write_text_gguf
    from medmoe_edge.vocab import Precision

    work = a.work or Path(tempfile.mkdtemp(prefix="medmoe-layout-"))
    ckpt = work / "proxy-stablelm-4e"
    if not (ckpt / "config.json").is_file():
        make_proxy(ckpt, 4)
    quant = Precision.parse(a.quant, option="--quant")
    f32 = work / "proxy-f32.gguf"
    if not f32.is_file():
        write_text_gguf(ckpt, f32, dtype="f32")
    files: dict[str, Path] = {}
    for label, used in (("stacked, expert-sparse (expert_used_count 1)", 1), ("all experts per token: the per-expert-tensor cost (expert_used_count 4)", 4)):
        p = work / f"proxy-used{used}-{quant.value}.gguf"
        if not p.is_file():
            src = work / f"proxy-used{used}-f32.gguf"
            if used == 1:
                src = f32
            else:
                with_experts_used(f32, src, used)
            if quant is Precision.FP32:
                p = src
            else:
                quantize(src, p, quant)
        files[label] = p
    runs: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(a.reps):
        for label, p in files.items():
            runs[label].append(decode_tok_s(p, a.threads, 32, 64))
            print(label, f"{runs[label][-1]:.2f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = next(iter(med.values()))
    import llama_cpp

    lines = [
        f"Command: `python benchmarks/gguf_expert_layout.py --reps {a.reps} --quant {quant.value} --threads {a.threads}` "
        f"(llama-cpp-python {llama_cpp.__version__}, {a.threads} threads; StableLM-size proxy, 4 layers, MoE on 0 and 2, 4 experts; "
        f"32-token prompt, median decode step of 64, median of {a.reps} alternating runs).",
        "",
        "| layout | decode tok/s | vs stacked |",
        "|---|---|---|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.2f} | {v / base:.2f}× |")
    publish_block(DOC, BEGIN, END, lines, "GGUF bundles and the llama.cpp runtime")


if __name__ == "__main__":
    main()
