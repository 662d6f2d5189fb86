"""`medmoe-edge quantize --format tensorrt`: a per-group int4/fp16 plan copied into the If-dispatch
graphs as symmetric blocked DequantizeLinear, real TensorRT-RTX engine builds (no GPU needed),
the engines' weights really stored packed (engine bytes), and the codes TensorRT would fold refused.

Running the engines needs an NVIDIA GPU (tests/test_tensorrt.py runs them where there is one); the
bundle's own check runs the graphs they were built from with ONNX Runtime at accuracy level 0
(weight-only, fp16 activations, as the engines compute).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge.bundle import read_manifest
from medmoe_edge.cli.app import app
from medmoe_edge.errors import InputError
from medmoe_edge.quant_plan import QuantMethod
from medmoe_edge.quantizer import QuantizerConfig, quantize
from medmoe_edge.vocab import Precision
from medmoe_edge.workflows import export_bundle

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'medmoe-edge[tensorrt]'")

AVG_BITS = "6"  # int4 (4.5 bits with its fp16 scale) and fp16 groups mixed


@pytest.fixture(scope="module")
def bundles(stats_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """(the quantized TensorRT bundle, the fp16 TensorRT export of the same model and options, the CLI's output)."""
    root = tmp_path_factory.mktemp("trtq")
    out = root / "q"
    r = CliRunner().invoke(app, ["quantize", "--format", "tensorrt", "--stats", str(stats_dir), "--avg-bits", AVG_BITS, "--out", str(out)])
    assert r.exit_code == 0, r.output  # the bundle's own fidelity check passed (exit 1 otherwise)
    fp16 = root / "fp16"
    export_bundle("tensorrt", "demo", fp16, {})
    return out, fp16, r.output


def test_plan_is_int4_blocks_and_fp16_and_the_graphs_hold_it_symmetric(bundles):
    import onnx

    from medmoe_edge.export.onnx_quant import read_back
    from medmoe_edge.tensor_ids import _all_nodes

    out, _, output = bundles
    m = read_manifest(out)
    assert m.format.value == "tensorrt" and m.precision is Precision.FP16
    assert m.plan.default.precision is Precision.FP16
    assert {r.spec.precision for r in m.plan.rules} == {Precision.INT4}
    assert all(r.spec.group_size == 32 and r.spec.method is QuantMethod.GPTQ for r in m.plan.rules)
    assert m.extra["quantization"]["symmetric"] is True
    stored = read_back(out)
    assert set(stored) == {r.pattern for r in m.plan.rules}
    for rule in m.plan.rules:
        precision, block, nbytes = stored[rule.pattern]
        assert precision is Precision.INT4 and block == 32
        assert abs(nbytes - rule.note["bytes"]) <= 0.03 * rule.note["bytes"], rule.pattern
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    inits = {i.name: i for g in [graph, *(a.g for n in _all_nodes(graph) for a in n.attribute if a.HasField("g"))] for i in g.initializer}
    dqs = [n for n in _all_nodes(graph) if n.op_type == "DequantizeLinear"]
    assert dqs and all(len(n.input) == 2 for n in dqs)  # no zero point: TensorRT's Q/DQ is symmetric
    assert {inits[n.input[0]].data_type for n in dqs} == {onnx.TensorProto.INT4}
    assert {inits[n.input[1]].data_type for n in dqs} == {onnx.TensorProto.FLOAT16}  # fp16 scales in the fp16 network
    assert "written against" in " ".join(output.split())


def test_the_engines_keep_the_int4_weights_packed(bundles):
    """TensorRT folds weights it cannot run packed into fp16 at build time; the decoder engine
    shrinks by most of what the plan saves only when the int4 weights stay int4."""
    out, fp16, _ = bundles
    m = read_manifest(out)
    decoder_rules = [r for r in m.plan.rules if r.pattern != "projector"]
    predicted_saving = sum(2 * r.note["params"] - r.note["bytes"] for r in decoder_rules)
    saved = (fp16 / "decoder.engine").stat().st_size - (out / "decoder.engine").stat().st_size
    assert predicted_saving > 1e6
    assert saved >= 0.6 * predicted_saving, (saved, predicted_saving)
    assert m.extra["tensorrt"]["engine_bytes"]["decoder"] == (out / "decoder.engine").stat().st_size


@pytest.mark.parametrize(
    "cfg,message",
    [
        (QuantizerConfig(4, 32, QuantMethod.RTN, symmetric=False), "takes symmetric codes only"),
        (QuantizerConfig(8, 32, QuantMethod.RTN, symmetric=True), "not 8-bit codes (weight-only int8 is folded into fp16): plan int4 or fp16"),
        (QuantizerConfig(4, 64, QuantMethod.RTN, symmetric=True), "folds int4 weights with one scale per row into fp16"),
    ],
)
def test_codes_tensorrt_would_fold_are_refused(cfg, message):
    from medmoe_edge.export.tensorrt_quant import TensorRTQuantExporter

    q = quantize(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), cfg)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TensorRTQuantExporter({"model.layers.0.mlp.fc1.weight": q})
