"""How to express the expert-sparse MoE FFN in ONNX: candidates measured side by side.

One Med-MoE FFN block (router + routed experts + meta expert) at Phi-2 size
(hidden 2560, FFN 10240, GELU experts with biases, top-1), random weights, fp32, run with
ONNX Runtime on the CPU. For 4 and 8 experts:

* `dispatch`   - what `medmoe-edge export` emits: per expert NonZero → Gather tokens →
                 expert → ScatterND (MoEFFN._dispatch_static traced by torch.onnx).
* `gather`     - gather each token's expert *weights* by index and batch-multiply.
                 Decode only: for N tokens it materialises N copies of an expert
                 (at N=512 about 100 GB), so it cannot prefill.
* `ort-moe`    - ONNX Runtime's `com.microsoft.MoE` contrib op (k=1, no renormalisation,
                 router bias added before it) + the meta expert in standard ops.
* `if`         - what `medmoe-edge export --moe-dispatch if` (and `--format tensorrt`) emits:
                 every expert weighted by its per-row routing weight (MoEFFN._dispatch_masked),
                 each expert inside an ONNX `If` that runs it only when some row chose it
                 (export/onnx_moe_cond.py). No NonZero, no data-dependent shape: TensorRT builds it.
* `dense`      - every expert on every token, combined with one-hot weights: the
                 non-sparse form the graph must avoid, as the yardstick.

Reported: decode latency (1 token), prefill latency (512 tokens), and max |Δ| against
the PyTorch reference block. Writes docs/MOE_DISPATCH.md.

    python benchmarks/moe_candidates.py [--threads 2] [--hidden 2560 --ffn 10240]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docblock import publish_block  # noqa: E402

from medmoe_edge.export.onnx_moe_cond import wrap_experts_in_if
from medmoe_edge.model.moe import Dispatch, MoEFFN
from medmoe_edge.spec import MoESpec, TextSpec, Variant

DOC = Path(__file__).resolve().parents[1] / "docs" / "MOE_DISPATCH.md"
BEGIN, END = "<!-- moe_candidates:begin -->", "<!-- moe_candidates:end -->"
NOTES = {
    "dispatch": "ONNX default: standard ops, expert-sparse; NonZero, which TensorRT-RTX cannot build",
    "if": "TensorRT graphs: expert-sparse in decode, every chosen expert on all rows in prefill",
    "gather": "decode only: prefill would copy an expert per token",
    "ort-moe": "ORT contrib op: TensorRT cannot parse it",
    "dense": "all experts on all tokens: not expert-sparse",
}


def make_block(hidden: int, ffn: int, experts: int, seed: int) -> MoEFFN:
    text = TextSpec(Variant.PHI, 512, hidden, ffn, 2, 32, 32, partial_rotary_factor=0.4)
    torch.manual_seed(seed)
    m = MoEFFN(text, MoESpec(layers=(0,), num_experts=experts)).eval().requires_grad_(False)
    for name, p in m.named_parameters():
        if "gate.wg" in name:
            p.normal_(0, hidden**-0.5 if name.endswith("weight") else 0.5)
        else:
            p.normal_(0, 0.02)
    return m


class _Dispatch(nn.Module):
    def __init__(self, m: MoEFFN) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)[0]


class _Gather(nn.Module):
    """y = w·Expert_e(x) + Meta(x) with the expert's weights gathered per token."""

    def __init__(self, m: MoEFFN) -> None:
        super().__init__()
        self.m = m
        ex = m.experts
        self.w1 = nn.Parameter(torch.stack([e.fc1.weight for e in ex]), requires_grad=False)  # [E, I, H]
        self.b1 = nn.Parameter(torch.stack([e.fc1.bias for e in ex]), requires_grad=False)
        self.w2 = nn.Parameter(torch.stack([e.fc2.weight for e in ex]), requires_grad=False)  # [E, H, I]
        self.b2 = nn.Parameter(torch.stack([e.fc2.bias for e in ex]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wg = self.m.deepspeed_moe.gate.wg
        p = torch.softmax(x @ wg.weight.T + wg.bias, dim=-1)
        e = p.argmax(-1)  # [N]
        w = p.gather(-1, e[:, None])
        h = torch.bmm(self.w1[e], x[:, :, None])[..., 0] + self.b1[e]
        h = nn.functional.gelu(h, approximate="tanh")
        y = torch.bmm(self.w2[e], h[:, :, None])[..., 0] + self.b2[e]
        return y * w + self.m.meta_moe(x)


class _Dense(nn.Module):
    def __init__(self, m: MoEFFN) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wg = self.m.deepspeed_moe.gate.wg
        p = torch.softmax(x @ wg.weight.T + wg.bias, dim=-1)
        onehot = nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(x.dtype) * p
        outs = torch.stack([ex(x) for ex in self.m.experts], dim=1)
        return (onehot[..., None] * outs).sum(1) + self.m.meta_moe(x)


def export(module: nn.Module, hidden: int, path: Path, rewrite=None) -> None:
    torch.onnx.export(module, (torch.randn(3, hidden),), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    proto = onnx.load(str(path))
    if rewrite is not None:
        rewrite(proto)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")


def ort_moe_graph(m: MoEFFN, path: Path) -> None:
    """Router (standard ops) → com.microsoft.MoE (k=1, raw probability) + meta expert."""
    ex = m.experts
    inits = {
        "wg_t": m.deepspeed_moe.gate.wg.weight.T.contiguous(),
        "bg": m.deepspeed_moe.gate.wg.bias,
        "fc1_w": torch.stack([e.fc1.weight for e in ex]),  # [E, I, H] (schema: fc1 [E, I, H])
        "fc1_b": torch.stack([e.fc1.bias for e in ex]),
        "fc2_w": torch.stack([e.fc2.weight for e in ex]),  # [E, H, I]
        "fc2_b": torch.stack([e.fc2.bias for e in ex]),
        "m1_t": m.meta_moe.fc1.weight.T.contiguous(),
        "m1_b": m.meta_moe.fc1.bias,
        "m2_t": m.meta_moe.fc2.weight.T.contiguous(),
        "m2_b": m.meta_moe.fc2.bias,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wg_t"], ["gl0"]),
        helper.make_node("Add", ["gl0", "bg"], ["gate_logits"]),
        helper.make_node("MoE", ["x", "gate_logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"], ["routed"], domain="com.microsoft", k=1, activation_type="gelu", normalize_routing_weights=0),
        helper.make_node("MatMul", ["x", "m1_t"], ["h0"]),
        helper.make_node("Add", ["h0", "m1_b"], ["h1"]),
        helper.make_node("Gelu", ["h1"], ["h2"], approximate="tanh"),
        helper.make_node("MatMul", ["h2", "m2_t"], ["h3"]),
        helper.make_node("Add", ["h3", "m2_b"], ["meta"]),
        helper.make_node("Add", ["routed", "meta"], ["y"]),
    ]
    h = m.deepspeed_moe.gate.wg.weight.shape[1]
    g = helper.make_graph(
        nodes,
        "ort_moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", h])],
        [numpy_helper.from_array(t.numpy(), k) for k, t in inits.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")


def timed(sess: ort.InferenceSession, x: np.ndarray, reps: int) -> float:
    sess.run(None, {"x": x})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--ffn", type=int, default=10240)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=DOC)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    so.log_severity_level = 3
    rows = []
    for n_exp in (4, 8):
        block = make_block(a.hidden, a.ffn, n_exp, seed=n_exp)
        xs = {"decode": torch.randn(1, a.hidden), "prefill": torch.randn(a.prefill, a.hidden)}
        with torch.no_grad():
            refs = {k: block(v[None])[0][0] for k, v in xs.items()}
        for name in ("dispatch", "if", "gather", "ort-moe", "dense"):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.onnx"
                try:
                    if name == "ort-moe":
                        ort_moe_graph(block, path)
                    else:
                        block.dispatch = Dispatch.MASKED if name == "if" else Dispatch.SCATTER
                        export({"dispatch": _Dispatch, "if": _Dispatch, "gather": _Gather, "dense": _Dense}[name](block), a.hidden, path, wrap_experts_in_if if name == "if" else None)
                        block.dispatch = Dispatch.EAGER
                    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                except Exception as e:  # report a candidate that does not run here instead of stopping
                    rows.append((n_exp, name, None, None, None, f"does not run: {str(e).splitlines()[0][:120]}"))
                    continue
                res = {}
                for phase, x in xs.items():
                    if name == "gather" and phase == "prefill":
                        res[phase] = None
                        continue
                    y = sess.run(None, {"x": x.numpy()})[0]
                    err = float(np.abs(y - refs[phase].numpy()).max())
                    res[phase] = (timed(sess, x.numpy(), a.reps if phase == "decode" else max(3, a.reps // 5)), err)
                errs = [r[1] for r in res.values() if r]
                rows.append((n_exp, name, res["decode"][0], res["prefill"][0] if res["prefill"] else None, max(errs), NOTES[name]))
                del sess
                print(rows[-1], flush=True)
    write_doc(a, rows)


def write_doc(a, rows) -> None:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.1f}"

    base = {(n, "dispatch"): (d, p) for n, name, d, p, _, _ in rows if name == "dispatch"}
    lines = [
        f"One MoE FFN block at Phi-2 size (hidden {a.hidden}, FFN {a.ffn}, GELU experts with biases, top-1 + meta expert), random weights, "
        f"fp32, ONNX Runtime {ort.__version__} CPU, {a.threads} threads, median of {a.reps} decode / {max(3, a.reps // 5)} prefill runs, all candidates in one process run.",
        "",
        f"Command: `python benchmarks/moe_candidates.py --threads {a.threads} --hidden {a.hidden} --ffn {a.ffn}`",
        "",
        f"| experts | candidate | decode 1 token (ms) | prefill {a.prefill} tokens (ms) | decode vs dispatch | max abs vs PyTorch | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, name, d, p, err, note in rows:
        ratio = "-" if d is None else f"{d / base[(n, 'dispatch')][0]:.2f}×"
        lines.append(f"| {n} | {name} | {ms(d)} | {ms(p)} | {ratio} | {'-' if err is None else f'{err:.1e}'} | {note} |")
    for cand in ("dispatch", "if"):
        d4, d8 = (next(d for n, name, d, *_ in rows if n == k and name == cand) for k in (4, 8))
        lines += ["", f"`{cand}` decode with 8 experts / with 4: **{d8 / d4:.2f}×** (activated parameters are the same; total parameters nearly double)."]
    publish_block(a.out, BEGIN, END, lines, "Expert-sparse MoE in ONNX: the candidates")


if __name__ == "__main__":
    main()
