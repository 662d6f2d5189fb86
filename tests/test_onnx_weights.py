"""ONNX graphs traced on stand-ins, their weights written one at a time afterwards
(`export/onnx_weights.py`): the same graphs and weights as a trace on the weights themselves, for
fp32, fp16 and a bf16 checkpoint kept as stored, and a weight that traces back to nothing refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from medmoe_edge.errors import CheckpointError  # noqa: E402
from medmoe_edge.export import onnx_export  # noqa: E402
from medmoe_edge.export.onnx_export import OnnxExporter, export_onnx  # noqa: E402
from medmoe_edge.export.onnx_weights import ExternalData, as_placeholders, fill, stand_ins, weight_sources  # noqa: E402
from medmoe_edge.model.linear import Linear  # noqa: E402


class Toy(nn.Module):
    """What the Med-MoE graphs fold: a Linear on 3-D rows (MatMul reads Wᵀ), one on 2-D rows (Gemm
    reads W), a Sequential's child, a router-like `.float()` of a weight, and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rows = Linear(8, 6)
        self.proj = nn.Sequential(Linear(6, 6), nn.GELU())
        self.gate = nn.Linear(6, 3)
        self.head = Linear(6, 5, bias=False)
        self.tied = Linear(6, 5, bias=False)
        self.tied.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.proj(self.rows(x))  # [B, T, 6]: MatMul
        flat = h.reshape(-1, 6)
        gate = nn.functional.linear(flat.float(), self.gate.weight.float(), self.gate.bias.float())
        return self.head(flat), gate, self.tied(flat[:1])


def _weights_read(path: Path) -> list[tuple[str, list]]:
    """Per node (Identity nodes looked through): its op and the arrays of the initializers it reads."""
    proto = onnx.load(str(path))
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return [(n.op_type, [inits.get(alias.get(x, x)) for x in n.input]) for n in proto.graph.node if n.op_type != "Identity"]


def _assert_same_reads(a: Path, b: Path) -> None:
    ra, rb = _weights_read(a), _weights_read(b)
    assert [op for op, _ in ra] == [op for op, _ in rb]
    for (op, xs), (_, ys) in zip(ra, rb):
        for x, y in zip(xs, ys):
            assert (x is None) == (y is None), op
            if x is not None:
                assert x.dtype == y.dtype and np.array_equal(x, y), op


def test_stand_ins_take_no_memory_and_put_the_parameters_back():
    m = Toy()
    before = {k: p for k, p in m.named_parameters(remove_duplicate=False)}
    with stand_ins(m, torch.float16) as real:
        assert real.keys() == before.keys() and all(real[k] is before[k] for k in real)
        for p in m.parameters():
            assert p.dtype == torch.float16 and set(p.stride()) <= {0} and float(p.abs().max()) == 0.0
        assert m.tied.weight is m.head.weight  # a tied weight keeps one stand-in
    assert all(p is before[k] for k, p in m.named_parameters(remove_duplicate=False))


def test_a_weightless_trace_writes_what_a_trace_on_the_weights_writes(tmp_path):
    m = Toy().eval()
    x = torch.randn(2, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(tmp_path / "ref.onnx"), dynamo=False, opset_version=17, input_names=["x"], do_constant_folding=True)
    onnx_export._export(m, (x,), tmp_path / "toy.onnx", ["x"], ["head", "gate", "tied"], {}, dtype=torch.float32)
    _assert_same_reads(tmp_path / "ref.onnx", tmp_path / "toy.onnx")
    folded = [i.name for i in onnx.load(str(tmp_path / "toy.onnx"), load_external_data=False).graph.initializer if i.name.startswith("onnx::")]
    assert folded  # the Wᵀ of the MatMuls and the gate's cast: traced back through their readers
    ort = pytest.importorskip("onnxruntime")
    got = ort.InferenceSession(str(tmp_path / "toy.onnx")).run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = m(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)


def test_a_graph_input_that_traces_back_to_nothing_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "onnx::Add_7"], ["y"], name="/block/Add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("onnx::Add_7", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    as_placeholders(graph, ["x"])
    params = {"block.bias": torch.zeros(4)}
    sources = weight_sources(graph, params)
    assert sources == {}  # an Add's constant is no fold this module knows
    with ExternalData(tmp_path / "g.onnx.data") as data, pytest.raises(CheckpointError, match="neither a parameter nor folded from one"):
        fill(graph, sources, params, data)


def test_a_bf16_checkpoint_kept_as_stored_exports_what_a_whole_fp32_load_exports(bf16_demo, tmp_path, monkeypatch):
    kept_dtypes = []
    real_load = OnnxExporter.load

    def spy(self, model, request):
        loaded = real_load(self, model, request)
        kept_dtypes.extend({p.dtype for p in loaded.model.lm.parameters()})
        return loaded

    monkeypatch.setattr(OnnxExporter, "load", spy)
    export_onnx(bf16_demo, tmp_path / "kept")
    assert torch.bfloat16 in kept_dtypes  # the matrices stayed bf16 while it exported
    from medmoe_edge.checkpoint import load_model

    monkeypatch.setattr(OnnxExporter, "load", lambda self, model, request: load_model(model, vision_tower=request.vision_tower))
    export_onnx(bf16_demo, tmp_path / "whole")
    for graph in ("vision", "embed", "decoder"):
        _assert_same_reads(tmp_path / "whole" / f"{graph}.onnx", tmp_path / "kept" / f"{graph}.onnx")
        inits = onnx.load(str(tmp_path / "kept" / f"{graph}.onnx"), load_external_data=False).graph.initializer
        assert {i.data_type for i in inits} == {onnx.TensorProto.FLOAT}  # widened when written: an fp32 graph


def test_an_fp16_export_casts_each_weight_as_the_fp16_model_holds_it(tmp_path):
    export_onnx("demo", tmp_path / "b", precision="fp16")
    from medmoe_edge.checkpoint import load_model

    lm = load_model("demo", dtype=torch.float16).model.lm.state_dict()
    proto = onnx.load(str(tmp_path / "b" / "decoder.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    reader = next(n for n in proto.graph.node if n.name == "/text/layers.0/self_attn/q_proj/MatMul")
    np.testing.assert_array_equal(inits[reader.input[1]], lm["model.layers.0.self_attn.q_proj.weight"].t().numpy())
    gate = next(n for n in proto.graph.node if n.op_type == "Gemm" and n.name == "/text/layers.0/mlp/Gemm")
    assert inits[gate.input[1]].dtype == np.float32  # the router's .float(), folded and written in fp32
    np.testing.assert_array_equal(inits[gate.input[1]], lm["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"].float().numpy())


def test_a_matrix_two_matmuls_read_is_stored_once(tmp_path):
    """Constant folding makes a Wᵀ copy for each MatMul (a top-2 expert is called twice): one is kept."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.lin(2 * x)

    m = Twice().eval()
    x = torch.randn(1, 2, 4)
    onnx_export._export(m, (x,), tmp_path / "t.onnx", ["x"], ["y"], {}, dtype=torch.float32)
    graph = onnx.load(str(tmp_path / "t.onnx"), load_external_data=False).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and matmuls[0].input[1] == matmuls[1].input[1]
    assert [list(i.dims) for i in graph.initializer].count([4, 4]) == 1
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "t.onnx")).run(None, {"x": x.numpy()})[0], m(x).numpy(), rtol=1e-6, atol=1e-6)
