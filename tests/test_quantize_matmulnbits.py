"""`quantize --format onnx --ops matmulnbits`: ONNX Runtime's MatMulNBits nodes written directly, so a
plan can take 2-bit codes in an ONNX bundle. The packing is MatMulNBits' own, the types and bytes
read back equal the plan, ONNX Runtime at accuracy level 0 equals the PyTorch fake-quant of the same
codes, and the flag's misuse is a one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.bundle import read_manifest
from medmoe_edge.checkpoint import resolve_model_dir
from medmoe_edge.cli.app import app
from medmoe_edge.quant_plan import QuantMethod, QuantPlan
from medmoe_edge.quantization import fake_quantize, load_stats, make_plan
from medmoe_edge.runtime_contract import RuntimeOptions
from medmoe_edge.vocab import Precision

from oracle_checks import assert_equals_oracle

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

AVG_BITS = "4.5"  # below the QDQ flavour's smallest plan (5.13 bits): only int2 codes fit (the 1-question fixture's few-token floors keep some groups at 4 bits)


def test_pack_rows_is_matmulnbits_layout():
    from medmoe_edge.export.onnx_quant import pack_rows

    v = np.array([[0, 1, 2, 3, 3], [1, 0, 0, 2, 1]])
    got = pack_rows(v, 2)
    assert got.tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6, 3], [1 | 0 << 2 | 0 << 4 | 2 << 6, 1]]
    assert pack_rows(np.array([[5, 10, 15]]), 4).tolist() == [[5 | 10 << 4, 15]]


@pytest.fixture(scope="module")
def nbits_bundle(stats_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qnbits") / "b"
    r = CliRunner().invoke(app, ["quantize", "--format", "onnx", "--ops", "matmulnbits", "--stats", str(stats_dir), "--avg-bits", AVG_BITS, "--no-verify", "--out", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return out


def test_types_and_bytes_read_back_equal_the_plan_with_2_bit_groups(nbits_bundle):
    from medmoe_edge.export.onnx_quant import read_back
    from medmoe_edge.tensor_ids import _all_nodes

    m = read_manifest(nbits_bundle)
    assert m.extra["quantization"]["backend"] == "onnx-matmulnbits"
    stored = read_back(nbits_bundle)
    planned = {r.pattern: r for r in m.plan.rules if r.spec.base is None}  # delta-coded projections: their expert's type (test_quantize)
    assert set(stored) == set(planned)
    assert Precision.INT2 in {p for p, _, _ in stored.values()}
    for name, (precision, block, nbytes) in stored.items():
        assert precision is planned[name].spec.precision and block == planned[name].spec.group_size, name
        assert abs(nbytes - planned[name].note["bytes"]) <= 0.03 * planned[name].note["bytes"], name
    for g in m.tensor_groups:  # the manifest's own read-back names the same types
        if not g.precision.is_float:
            assert m.plan.spec_for(g.name).precision is g.precision
    proto = onnx.load(str(nbits_bundle / "decoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in _all_nodes(proto.graph)]
    assert "DequantizeLinear" not in ops and ops.count("MatMulNBits") > 0
    assert any(o.domain == "com.microsoft" for o in proto.opset_import)


def _at_level_0(src: Path, dst: Path) -> Path:
    """A copy of the bundle whose MatMulNBits nodes compute in fp32 (accuracy_level 0), its
    manifest re-hashed (a changed graph under the old hashes is refused as corrupt)."""
    from dataclasses import replace

    from medmoe_edge.bundle import file_entries, write_manifest
    from medmoe_edge.tensor_ids import _all_nodes

    shutil.copytree(src, dst)
    for f in dst.glob("*.onnx"):
        proto = onnx.load(str(f), load_external_data=False)
        for node in _all_nodes(proto.graph):
            for a in node.attribute:
                if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                    a.i = 0
        onnx.save(proto, str(f))
    m = read_manifest(dst)
    write_manifest(dst, replace(m, files=file_entries(dst, {e.path: e.role for e in m.files})))
    return dst


def test_onnx_runtime_at_level_0_equals_the_fake_quant_oracle_of_the_same_codes(nbits_bundle, stats_dir, tmp_path):
    m = read_manifest(nbits_bundle)
    model_dir = resolve_model_dir("demo")
    opts = RuntimeOptions(num_threads=1)
    oracle = api.load(model_dir, runtime="torch", options=opts)
    loaded = oracle.runtime.loaded
    result = make_plan(loaded, load_stats(stats_dir, model_dir, "demo"), "onnx-matmulnbits", method=QuantMethod.GPTQ, avg_bits=float(AVG_BITS), cache_dir=stats_dir, delta_from_meta=True)
    assert result.plan.to_json() == QuantPlan.from_json(m.plan.to_json()).to_json()  # the bundle's plan, so its codes
    fake_quantize(loaded, result.codes)
    bundle_rt = api.load(_at_level_0(nbits_bundle, tmp_path / "level0"), runtime="onnxruntime", options=opts)
    assert_equals_oracle(bundle_rt, oracle)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--format", "gguf", "--ops", "matmulnbits"], "--ops applies to --format onnx, not gguf: drop --ops"),
        (["--format", "onnx", "--ops", "qnnpack"], "--ops 'qnnpack' is not one of qdq, matmulnbits"),
        (["--format", "onnx", "--ops", "matmulnbits", "--block", "24"], "--block 24 is not a MatMulNBits block: use a power of two of at least 16"),
    ],
)
def test_misused_ops_is_one_line(extra, message, stats_dir, tmp_path):
    r = CliRunner().invoke(app, ["quantize", "--stats", str(stats_dir), "--avg-bits", AVG_BITS, "--out", str(tmp_path / "o"), *extra])
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert message in " ".join(r.output.split())
    assert not (tmp_path / "o").exists()
