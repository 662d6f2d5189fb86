"""Delta-from-meta coding of the routed experts' fc1 (issue: per-expert quantization, item 5).

Med-MoE's routed experts are upcycled from the same FFN as the always-on meta expert (spec §2.3),
and on the demo they sit within a few tens of percent of it. The meta expert's fc1 is computed on
every token anyway, so a routed expert's fc1 could be stored as a low-bit *delta*

    fc1_e(x) = x·Ŵ_metaᵀ + x·D̂ᵀ,   D = W_e − Ŵ_meta

where Ŵ_meta is the meta expert's own quantized fc1 (already in the bundle) and D̂ is GPTQ on D
with the expert's own routed-token Hessian H_e. At equal bytes (D̂ has the shape and width of a
direct code of W_e) it wins when the delta is small enough. Measured here:

1. per MoE layer and expert: ‖W_e − W_meta‖/‖W_e‖, and the output error sqrt(tr(ΔW H_e ΔWᵀ) /
   tr(W H_e Wᵀ)) of direct GPTQ at 2/3/4 bits against delta GPTQ at the same bits (meta fc1 at
   int4 GPTQ on its own Hessian);
2. end to end on the demo (PyTorch fake-quant, teacher-forced replay of a domain-balanced eval
   subset against the fp32 trace): every routed expert's fc1 direct against delta, at each width,
   the rest of the model in fp32: KL, top-1 tokens, routing, answers;
3. the decode cost in ONNX Runtime at real StableLM-2-1.6B dimensions (hidden 2048, FFN 5632, one
   token): the meta fc1 and one routed expert's fc1 as int4 DequantizeLinear → MatMul (fused to
   MatMulNBits), direct against delta (the same MatMul on D̂ plus an Add of the meta's output),
   side by side in one process, median of interleaved repetitions.

    python benchmarks/delta_from_meta.py [--calib-per-domain 16] [--per-domain 25] [--no-doc]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the tables.
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
EXPERT = "model.layers.{l}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"
META = "model.layers.{l}.mlp.meta_moe.fc1.weight"
WIDTHS = (2, 3, 4)


def _codes(stats, state, moe_layers, n_experts, bits: int, delta: bool) -> tuple[dict, dict]:
    """(checkpoint key → dequantized fc1 of every routed expert, key → output error) at `bits`."""
    import torch

    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.quantizer import QuantizerConfig, quantize

    out, err = {}, {}
    for layer in moe_layers:
        meta_key = META.format(l=layer)
        meta_hat = quantize(state[meta_key], QuantizerConfig(4, 32, QuantMethod.GPTQ), stats.hessians[meta_key], stats.tokens[meta_key]).dequantize()
        for e in range(n_experts):
            key = EXPERT.format(l=layer, e=e)
            w, h = state[key], stats.hessians[key]
            target = w - meta_hat if delta else w
            q = quantize(target, QuantizerConfig(bits, 32, QuantMethod.GPTQ), h, stats.tokens[key])
            w_hat = q.dequantize() + (meta_hat if delta else 0)
            d, hd = w.double() - w_hat.double(), h.double()  # output error on the expert's own tokens (quantizer.relative_error's form)
            err[key] = float(((d @ hd * d).sum() / (w.double() @ hd * w.double()).sum()).sqrt())
            out[key] = w_hat.to(torch.float32)
    return out, err


def _ort_cost(reps: int) -> tuple[float, float]:
    """Median seconds per decode step of meta fc1 + one expert fc1 at StableLM-2-1.6B dimensions:
    (direct, delta), int4 DQ → MatMul, both checked fused by ONNX Runtime into MatMulNBits."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    hidden, ffn = 2048, 5632
    rng = np.random.default_rng(0)

    def dq(name: str):
        codes = rng.integers(-8, 8, (hidden, ffn))
        flat = codes.reshape(-1).astype(np.int16) & 15
        raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        scales = (rng.random((hidden // 32, ffn)) * 0.01).astype(np.float32)
        return [helper.make_tensor(name + ".c", T.INT4, [hidden, ffn], raw, raw=True), numpy_helper.from_array(scales, name + ".s")], helper.make_node(
            "DequantizeLinear", [name + ".c", name + ".s"], [name + ".w"], axis=0, block_size=32
        )

    def graph(delta: bool):
        mi, mdq = dq("meta")
        ei, edq = dq("expert")
        nodes = [mdq, edq, helper.make_node("MatMul", ["x", "meta.w"], ["meta_out"]), helper.make_node("MatMul", ["x", "expert.w"], ["e_mm"])]
        nodes.append(helper.make_node("Add", ["e_mm", "meta_out"], ["expert_out"]) if delta else helper.make_node("Identity", ["e_mm"], ["expert_out"]))
        g = helper.make_graph(
            nodes,
            "fc1",
            # [batch, tokens, hidden] as in the decoder: with 2-D activations ONNX Runtime first fuses
            # MatMul + Add(meta's output) into a Gemm, and the DQ → MatMulNBits fusion is lost (12x slower)
            [helper.make_tensor_value_info("x", T.FLOAT, [1, 1, hidden])],
            [helper.make_tensor_value_info("meta_out", T.FLOAT, [1, 1, ffn]), helper.make_tensor_value_info("expert_out", T.FLOAT, [1, 1, ffn])],
            mi + ei,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / f"fc1-{delta}.onnx")
        session = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        fused = sum(n.op_type == "MatMulNBits" for n in onnx.load(so.optimized_model_filepath).graph.node)
        if fused != 2:  # a timing of an unfused graph would measure ONNX Runtime's dequantization, not the coding
            raise SystemExit(f"ONNX Runtime fused {fused} of 2 DequantizeLinear -> MatMul into MatMulNBits ({'delta' if delta else 'direct'})")
        return session

    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"direct": graph(False), "delta": graph(True)}
    x = {"x": rng.standard_normal((1, 1, hidden)).astype(np.float32)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(20):
            s.run(None, x)
    for _ in range(reps):
        for name, s in sessions.items():  # interleaved: both see the same machine state
            t0 = time.perf_counter()
            for _ in range(20):
                s.run(None, x)
            times[name].append((time.perf_counter() - t0) / 20)
    return statistics.median(times["direct"]), statistics.median(times["delta"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-per-domain", type=int, default=16)
    ap.add_argument("--per-domain", type=int, default=25, help="eval questions per domain in the reference trace")
    ap.add_argument("--reps", type=int, default=30, help="interleaved repetitions of the ONNX Runtime timing")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    t0 = time.time()

    import torch

    from medmoe_edge import api
    from medmoe_edge.checkpoint import resolve_model_dir
    from medmoe_edge.quantization import calibrate, restore
    from medmoe_edge.calibration.sensitivity import swap
    from medmoe_edge.runtime_contract import RuntimeOptions
    from medmoe_edge.verify import QUANTIZED_TOLERANCES, replay
    from medmoe_edge.vocab import ArtifactKind

    from quantization_report import _trace  # the same domain-balanced teacher-forced trace

    torch.set_num_threads(2)
    model_dir = resolve_model_dir("demo")
    trace = _trace(model_dir, args.per_domain)
    tol = QUANTIZED_TOLERANCES[ArtifactKind.ONNX]
    with tempfile.TemporaryDirectory() as tmp:
        stats, _ = calibrate("demo", Path(tmp) / "stats", per_domain=args.calib_per_domain)
    oracle = api.load(model_dir, runtime="torch", options=RuntimeOptions(num_threads=2))
    loaded = oracle.runtime.loaded
    spec = loaded.spec
    moe_layers, n_experts = tuple(sorted(spec.moe.layers)), spec.moe.num_experts
    state = {k: v.detach().clone() for k, v in loaded.model.lm.state_dict().items()}

    distance = {}
    for layer in moe_layers:
        meta = state[META.format(l=layer)]
        for e in range(n_experts):
            w = state[EXPERT.format(l=layer, e=e)]
            distance[(layer, e)] = float((w - meta).norm() / w.norm())

    recon: dict[tuple[int, bool], dict] = {}
    e2e: dict[tuple[int, bool], object] = {}
    for bits in WIDTHS:
        for delta in (False, True):
            weights, err = _codes(stats, state, moe_layers, n_experts, bits, delta)
            recon[(bits, delta)] = err
            old = swap(loaded, weights)
            try:
                e2e[(bits, delta)] = replay(oracle.runtime, trace, tol).metrics
            finally:
                restore(loaded, old)
            print(bits, "delta" if delta else "direct", e2e[(bits, delta)], flush=True)
    oracle.close()
    direct_s, delta_s = _ort_cost(args.reps)

    import onnxruntime

    keys = [EXPERT.format(l=layer, e=e) for layer in moe_layers for e in range(n_experts)]
    lines = [
        f"Command: `python benchmarks/delta_from_meta.py --calib-per-domain {args.calib_per_domain} --per-domain {args.per_domain} --reps {args.reps}` "
        f"(torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; demo model, {len(trace.items)} eval questions teacher-forced against one fp32 trace; "
        f"{(time.time() - t0) / 60:.1f} min). Every routed expert's fc1 coded by GPTQ (block 32, 4-bit zero point, fp16 scale: equal bytes at equal width), "
        "directly or as the delta from the meta expert's int4 GPTQ fc1; everything else fp32.",
        "",
        "Distance of each routed expert's fc1 from the meta expert's, ‖W_e − W_meta‖/‖W_e‖: "
        + ", ".join(f"layer {layer} expert {e} {d:.2f}" for (layer, e), d in distance.items())
        + ".",
        "",
        "| fc1 coding | bits | output error (mean over experts) | worst expert | KL (mean) | top-1 tokens | routing | answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bits in WIDTHS:
        for delta in (False, True):
            err, m = recon[(bits, delta)], e2e[(bits, delta)]
            lines.append(
                f"| {'delta from meta' if delta else 'direct'} | {bits} | {statistics.mean(err[k] for k in keys):.4f} | {max(err[k] for k in keys):.4f} | "
                f"{m['kl_mean']:.2e} | {m['token_agreement']:.2%} | {m['routing_agreement']:.2%} | {m['answer_agreement']:.2%} |"
            )
    lines += [
        "",
        f"ONNX Runtime decode cost at StableLM-2-1.6B dimensions (one token, meta fc1 + one expert fc1, int4 DQ → MatMulNBits, 2 threads, median of {args.reps} interleaved "
        f"repetitions of 20 steps): direct {direct_s * 1e3:.3f} ms, delta {delta_s * 1e3:.3f} ms, ratio {delta_s / direct_s:.3f}.",
    ]
    publish_block(DOC, "<!-- delta_from_meta:begin -->", "<!-- delta_from_meta:end -->", lines, "Per-expert quantization", publish=not args.no_doc)


if __name__ == "__main__":
    main()
