"""Decode cost of delta-from-meta coding end to end in ONNX Runtime (issue: per-expert quantization, item 5).

Two ONNX bundles of the same model from the same int4 codes of every planned matrix (RTN, block
32, DequantizeLinear → MatMul, fused by ONNX Runtime into MatMulNBits), written by
`OnnxQuantExporter`:

* direct: every routed expert's input projections as codes of their own weights;
* delta: every routed expert's input projections as codes of W_e − Ŵ_meta, the expert adding the
  meta expert's pre-activation (what `quantize --format onnx` writes for the experts where the
  delta wins; here all of them, whatever the error, since only the cost is measured).

Both run the whole decoder: ONNX Runtime decode tok/s of one image and question, greedy with EOS
ignored, each run in its own process (`runtimes_bench.measure`), the two bundles alternating,
median of --reps. The fused MatMulNBits of each bundle's decoder are counted, so a lost fusion
shows up as such rather than as a cost of the coding.

    python benchmarks/delta_decode.py [--model proxy|demo] [--reps 5] [--decode 32] [--work DIR] [--no-doc]

`--model proxy` is the real-dimension StableLM proxy of `runtimes_bench.make_proxy` (4 decoder
layers at StableLM-2-1.6B sizes, 4 experts + meta on layers 0 and 2). Writes docs/QUANTIZATION.md
(the block between its markers) and prints the table.
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

DOC = ROOT / "docs" / "QUANTIZATION.md"


def codes_for(loaded, delta: bool) -> dict:
    """int4 RTN codes (block 32) of every linear matrix of the decoder and projector; with `delta`,
    every routed expert's input projections as codes of their difference from the meta expert's codes."""
    import torch

    from medmoe_edge.calibration.collect import quantizable_linears
    from medmoe_edge.delta_coding import expert_inputs
    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.quantizer import DeltaQTensor, QuantizerConfig, quantize

    cfg = QuantizerConfig(4, 32, QuantMethod.RTN)
    state = loaded.model.lm.state_dict()
    codes = {k: quantize(state[k].float(), cfg) for k in quantizable_linears(loaded)}
    if delta:
        for _layer, _e, pairs in expert_inputs(loaded):
            for k, m in pairs:
                base = codes[m].dequantize()
                d = quantize(state[k].float() - base, cfg)
                codes[k] = DeltaQTensor(d.codes, d.scales, d.zeros, d.bits, d.block, d.symmetric, d.method, base=base, base_key=m)
    return codes


def write_bundle(model_dir: Path, out: Path, delta: bool) -> None:
    from medmoe_edge.checkpoint import load_model
    from medmoe_edge.export.onnx_quant import OnnxQuantExporter
    from medmoe_edge.quant_plan import QuantMethod, QuantPlan, QuantRule, QuantSpec
    from medmoe_edge.quantizer import DeltaQTensor
    from medmoe_edge.tensor_ids import checkpoint_id
    from medmoe_edge.vocab import Precision

    codes = codes_for(load_model(model_dir), delta)
    rules = [QuantRule(str(checkpoint_id(k)), QuantSpec(Precision.INT4, QuantMethod.RTN, 32, base=str(checkpoint_id(q.base_key)))) for k, q in codes.items() if isinstance(q, DeltaQTensor)]
    rules += [QuantRule(str(checkpoint_id(k).group), QuantSpec(Precision.INT4, QuantMethod.RTN, 32)) for k in codes]
    plan = QuantPlan(QuantSpec(Precision.FP32), tuple({r.pattern: r for r in rules}.values()))
    OnnxQuantExporter(codes).export(model_dir, out, OnnxQuantExporter.request({}, plan=plan))


def fused(bundle: Path) -> int:
    """MatMulNBits nodes ONNX Runtime makes of the bundle's decoder."""
    import onnx
    import onnxruntime as ort

    from medmoe_edge.tensor_ids import _all_nodes

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(bundle / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "MatMulNBits" for n in _all_nodes(onnx.load(so.optimized_model_filepath, load_external_data=False).graph))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("proxy", "demo"), default="proxy")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory, reused between runs [default: a temporary one]")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    t0 = time.time()

    import onnxruntime

    from runtimes_bench import dir_size, make_proxy, measure

    from medmoe_edge.checkpoint import resolve_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if a.model == "proxy":
            model_dir = work / "proxy-stablelm-4e"
            if not (model_dir / "config.json").is_file():
                make_proxy(model_dir, 4)
        else:
            model_dir = resolve_model_dir("demo")
        bundles = {name: work / f"{a.model}-int4-{name}" for name in ("direct", "delta")}
        for name, path in bundles.items():
            if not (path / "manifest.json").is_file():
                print("writing", path, flush=True)
                write_bundle(model_dir, path, name == "delta")
        nodes = {name: fused(path) for name, path in bundles.items()}
        runs: dict[str, list[dict]] = {name: [] for name in bundles}
        for _ in range(a.reps):
            for name, path in bundles.items():  # alternating: both see the same machine state
                runs[name].append(measure("onnxruntime", path, a.decode, 2))
                print(name, runs[name][-1], flush=True)
        tok = {k: statistics.median(r["decode_tok_s"] for r in v) for k, v in runs.items()}
        size = {k: dir_size(p) for k, p in bundles.items()}

    what = (
        "the real-dimension StableLM proxy (`runtimes_bench.make_proxy`: hidden 2048, FFN 5632, vocab 100352, CLIP ViT-L/14-336, 4 decoder layers, 4 experts + meta on layers 0 and 2; random weights)"
        if a.model == "proxy"
        else "the demo model"
    )
    lines = [
        f"Command: `python benchmarks/delta_decode.py --model {a.model} --reps {a.reps} --decode {a.decode}` (onnxruntime {onnxruntime.__version__}; {what}; "
        f"2 threads; {(time.time() - t0) / 60:.1f} min). Every planned matrix int4 RTN (block 32, DequantizeLinear → MatMul); the routed experts' input projections "
        f"direct or as the delta from the meta expert's codes; ONNX Runtime decode of one image and question, {a.decode} greedy steps, median of {a.reps} alternating runs, each in its own process.",
        "",
        "| experts' input projections | bundle | MatMulNBits after ONNX Runtime's fusion | decode tok/s | vs direct |",
        "|---|---|---|---|---|",
    ]
    for name in bundles:
        lines.append(f"| {name} | {size[name] / 1e6:.1f} MB | {nodes[name]} | {tok[name]:.2f} | {tok[name] / tok['direct']:.3f}x |")
    cost = tok["direct"] / tok["delta"] - 1
    lines += ["", f"Decode cost of the delta coding: **{cost:+.1%}** per token (bound: ≤ 5 %)."]
    publish_block(DOC, f"<!-- delta_decode_{a.model}:begin -->", f"<!-- delta_decode_{a.model}:end -->", lines, "Per-expert quantization", publish=not a.no_doc)


if __name__ == "__main__":
    main()
