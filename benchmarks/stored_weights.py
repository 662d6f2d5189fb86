"""A bf16 checkpoint through `calibrate` and `quantize` with its matrices kept as stored, and
`quantize`'s candidate codes held to a cap: measured on the real-dimension StableLM proxy stored in
bf16 (as Med-MoE's released checkpoints are), each run in its own process (wall time, peak RSS).

1. `calibrate` with the whole model loaded in fp32 (what it did before) against `calibrate` as it
   ships (matrices kept in bf16, computed in fp32): the two statistics compared tensor by tensor.
2. `quantize --format onnx --sensitivity proxy --codes-memory C` from the kept statistics, with a
   cap below what the candidate codes take, so they are spilled and read back.
3. What the full-size presets' weights and candidate codes take (shapes only).

The proxy is `runtimes_bench.make_proxy` (StableLM-2-1.6B layer sizes, 4 decoder layers, MoE on 0
and 2 with 4 experts + meta, the CLIP ViT-L/14-336 tower, random weights), cast to bf16.

    python benchmarks/stored_weights.py [--per-domain 16] [--codes-memory 0.25] [--work DIR] [--reuse-calibrate]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from calibration_passes import compare  # noqa: E402
from docblock import publish_block  # noqa: E402
from quantization_proxy import CLI, quantize_phases, run_timed  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"
BEGIN, END = "<!-- stored_weights:begin -->", "<!-- stored_weights:end -->"
# `calibrate` as it was before matrices were kept: the same CLI with the whole model loaded in fp32
WHOLE_FP32 = (
    "import sys; from medmoe_edge import checkpoint, quantization; "
    "quantization.load_model = lambda d, **_: checkpoint.load_model(d); "
    "from medmoe_edge.cli.app import main; sys.argv = ['medmoe-edge', *sys.argv[1:]]; main()"
)


def to_bf16(src: Path, dst: Path) -> None:
    """A copy of checkpoint `src` with every floating-point tensor stored in bf16 (the tower is shared)."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for name in sorted(set(index["weight_map"].values())):
        t = load_file(src / name)
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.items()}, tmp / name, metadata={"format": "pt"})
        del t
    index["metadata"] = {"total_size": sum((tmp / n).stat().st_size for n in set(index["weight_map"].values()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = json.loads((src / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=1))
    for f in src.iterdir():
        if f.is_dir():
            (tmp / f.name).symlink_to(f.resolve())
        elif f.name.startswith("tokenizer"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(dst)


def full_size_rows() -> list[str]:
    """Weights (fp32, kept bf16) and candidate codes (ONNX int4+int8 as `QTensor`s; GGUF's ggml types) of the full-size presets."""
    import torch

    from medmoe_edge.allocation import GGML_CANDIDATES
    from medmoe_edge.calibration.code_store import qtensor_bytes
    from medmoe_edge.ggml_codes import nbytes as ggml_nbytes
    from medmoe_edge.model.medmoe import MedMoE
    from medmoe_edge.presets import PRESETS, Preset

    rows = []
    for preset in (Preset.PHI, Preset.STABLELM):
        with torch.device("meta"):
            model = MedMoE(PRESETS[preset])
        matrices = {k: p.numel() for k, p in model.lm.named_parameters() if p.dim() == 2 and "gate.wg" not in k}
        planned = sum(n for k, n in matrices.items() if "embed_tokens" not in k)  # ONNX keeps the embedding in floating point
        lm = sum(p.numel() for p in model.lm.parameters())
        kept = 2 * sum(matrices.values()) + 4 * (lm - sum(matrices.values()))
        onnx = 2 * qtensor_bytes(planned, 32)
        gguf = sum(ggml_nbytes(sum(matrices.values()), p) for p in GGML_CANDIDATES)
        rows.append(f"| {preset.value} | {4 * lm / 2**30:.1f} GiB | {kept / 2**30:.1f} GiB | {onnx / 2**30:.1f} GiB | {gguf / 2**30:.1f} GiB |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-domain", type=int, default=16, help="calibration questions per domain (as quantization_proxy.py)")
    ap.add_argument("--codes-memory", type=float, default=0.25, help="GiB cap on quantize's candidate codes (below what they take)")
    ap.add_argument("--work", type=Path, default=None, help="reuses a proxy checkpoint there (proxy-stablelm-4e)")
    ap.add_argument("--reuse-calibrate", action="store_true", help="report the calibrate runs already in --work (their statistics and stored_weights.json) and run only quantize")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    from runtimes_bench import make_proxy

    from medmoe_edge.allocation import BACKENDS
    from medmoe_edge.calib_stats import CalibStats
    from medmoe_edge.calibration.sensitivity import choice_bytes, units_for
    from medmoe_edge.checkpoint import load_model
    from medmoe_edge.vocab import Precision

    work = args.work or Path(tempfile.mkdtemp(prefix="stored-weights-"))
    record = work / "stored_weights.json"
    if args.reuse_calibrate and not record.is_file():  # before minutes of making checkpoints
        raise SystemExit(f"--reuse-calibrate: {record} is missing; run without it first")
    src = work / "proxy-stablelm-4e"
    if not (src / "config.json").is_file():
        make_proxy(src, 4)
    ckpt = work / "proxy-stablelm-4e-bf16"
    if not (ckpt / "config.json").is_file():
        to_bf16(src, ckpt)

    calib = ["calibrate", "--model", str(ckpt), "--per-domain", str(args.per_domain), "--sensitivity-per-domain", "2"]
    runs = {
        "whole model in fp32 (before)": ([sys.executable, "-c", WHOLE_FP32, *calib, "--out", str(work / "stats-wide")], work / "stats-wide"),
        "matrices kept in bf16 (as shipped)": ([CLI, *calib, "--out", str(work / "stats-kept")], work / "stats-kept"),
    }
    timed = {k: tuple(v) for k, v in json.loads(record.read_text()).items()} if args.reuse_calibrate else {}
    stats = {}
    for name, (cmd, out) in runs.items():
        if not args.reuse_calibrate:
            shutil.rmtree(out, ignore_errors=True)
            print("running", " ".join(cmd[-12:]), flush=True)
            timed[name] = run_timed(cmd, out.with_suffix(".log"))
            record.write_text(json.dumps({k: list(v) for k, v in timed.items()}))
        stats[name] = CalibStats.load(out)
        print(name, timed[name], flush=True)
    same = compare(*stats.values())

    loaded = load_model(ckpt, keep_stored=True)
    b = BACKENDS["onnx"]
    units = units_for(loaded, b)
    budget = int(1.15 * sum(choice_bytes(u.params, Precision.INT4, b, 32) for u in units))  # as quantization_proxy.py
    del loaded, units
    bundle = work / "proxy-bf16-onnx-plan"
    shutil.rmtree(bundle, ignore_errors=True)
    q_cmd = [CLI, "quantize", "--model", str(ckpt), "--format", "onnx", "--stats", str(work / "stats-kept"), "--budget-mb", f"{budget / 1e6:.3f}", "--sensitivity", "proxy", "--method", "gptq",
             "--codes-memory", f"{args.codes_memory:g}", "--no-verify", "--out", str(bundle)]  # fmt: skip
    print("running", " ".join(q_cmd), flush=True)
    q_log = work / "quantize-bf16.log"
    q_wall, q_rss = run_timed(q_cmd, q_log)
    log = q_log.read_text()
    spill = next((ln.strip() for ln in log.splitlines() if "did not fit in memory" in ln), "(no spill line: the codes fitted under the cap)")
    phases = quantize_phases(log)

    (w1, r1), (w2, r2) = timed.values()
    lines = [
        f"`python benchmarks/stored_weights.py --per-domain {args.per_domain} --codes-memory {args.codes_memory:g}` (the real-dimension StableLM proxy stored in bf16; "
        f"{4 * args.per_domain} calibration questions; each run alone, in its own process):",
        "",
        "| run | wall | peak RSS |",
        "|---|---|---|",
        *(f"| `calibrate`, {name} | {w / 60:.1f} min | {rss / 2**30:.2f} GiB |" for name, (w, rss) in timed.items()),
        f"| `quantize --format onnx --sensitivity proxy --codes-memory {args.codes_memory:g}` from the kept statistics | {q_wall / 60:.1f} min | {q_rss / 2**30:.2f} GiB |",
        *(f"| `quantize`: {what} | {secs / 60:.1f} min | |" for what, secs in phases.items()),
        "",
        f"- The two statistics compared tensor by tensor: **{same}**. Kept against whole, side by side: wall {w2 / w1:.2f}×, peak RSS {r2 / r1:.2f}×.",
        f"- `quantize` said: {spill}",
        "",
        "What the full-size presets take (shapes only): the LLM's weights in fp32 and kept (matrices bf16, the rest fp32), and every candidate's codes as `quantize` makes them:",
        "",
        "| preset | weights fp32 | weights kept | ONNX candidates (int4 + int8) | GGUF candidates (every ggml type) |",
        "|---|---|---|---|---|",
        *full_size_rows(),
    ]
    publish_block(DOC, BEGIN, END, lines, "Per-expert quantization", publish=not args.no_doc)


if __name__ == "__main__":
    main()
