"""`medmoe-edge compare`: the demo model through torch, onnxruntime and llamacpp (f32 and q4_k_m) in one run.

One comparison (3 questions, `--out` and `--json`) is shared by the module; the other tests read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from medmoe_edge.bundle import read_manifest
from medmoe_edge.cli.app import app
from medmoe_edge.comparison import Candidate, plan_rows, run_rows, schema
from medmoe_edge.perf import bundle_decode_bytes, checkpoint_decode_bytes, percentile, spread, worker_argv
from medmoe_edge.runtimes.registry import discover
from medmoe_edge.workflows import export_bundle

LIMIT = 3
RUNTIMES = "torch,onnxruntime,llamacpp,tensorrt"


def _llamacpp() -> bool:
    return discover()["llamacpp"].availability().available


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare-bundles")
    out = {"onnx fp32": root / "onnx-fp32"}
    export_bundle("onnx", "demo", out["onnx fp32"], trace_questions=0)
    if _llamacpp():
        out["gguf f32"], out["gguf q4_k_m"] = root / "gguf-f32", root / "gguf-q4km"
        export_bundle("gguf", "demo", out["gguf f32"], {"--quant": "f32"}, trace_questions=0)
        export_bundle("gguf", "demo", out["gguf q4_k_m"], {"--quant": "q4_k_m"}, trace_questions=0)
    else:  # the rows still appear, with the runtime's reason
        for name in ("gguf f32", "gguf q4_k_m"):
            out[name] = root / name.replace(" ", "-")
    return out


@pytest.fixture(scope="module")
def report(bundles, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("compare-report") / "report"
    listed = ",".join(str(bundles[k]) for k in ("onnx fp32", "gguf f32", "gguf q4_k_m") if (bundles[k] / "manifest.json").is_file())
    r = CliRunner().invoke(app, ["compare", "--bundles", listed, "--runtimes", RUNTIMES, "--limit", str(LIMIT), "--threads", "2", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), out


def _row(data: dict, label: str) -> dict:
    (row,) = [r for r in data["rows"] if r["label"] == label]
    return row


def test_every_row_is_present_and_runs(report):
    data, _ = report
    labels = [r["label"] for r in data["rows"]]
    assert labels[:2] == ["torch fp32", "onnxruntime fp32"]
    assert "tensorrt" in labels
    expected_ok = ["torch fp32", "onnxruntime fp32"] + (["llamacpp fp32", "llamacpp q4_k_m"] if _llamacpp() else [])
    for label in expected_ok:
        row = _row(data, label)
        assert row["status"] == "ok", row["reason"]
        assert row["questions"] == LIMIT
        assert row["load_s"] > 0 and row["prefill_s"]["median"] > 0 and row["ttft_s"]["median"] >= row["prefill_s"]["median"] * 0.99
        assert row["decode_tok_s"]["n"] == LIMIT and row["decode_tok_s"]["p10"] <= row["decode_tok_s"]["median"] <= row["decode_tok_s"]["p90"]
        assert row["peak_rss_bytes"] > 50 * 2**20 and row["size_bytes"] > 2**20
        assert 0 < row["roofline_fraction"] < 2
        assert row["threads"] == 2
        assert row["accuracy"]["overall"]["n_closed"] + row["accuracy"]["overall"]["n_open"] == LIMIT
    assert data["set"]["questions"] == LIMIT and data["bandwidth"]["gbs"] > 0


def test_fidelity_of_the_fp32_bundles(report):
    data, _ = report
    ref = _row(data, "torch fp32")["fidelity"]
    assert ref["answer_agreement"] == ref["token_agreement"] == ref["routing_agreement"] == 1.0 and ref["passed"] is None
    onnx = _row(data, "onnxruntime fp32")["fidelity"]
    assert onnx["answer_agreement"] == 1.0 and onnx["token_agreement"] == 1.0 and onnx["routing_agreement"] == 1.0
    assert onnx["passed"] is True and onnx["logits_max_abs"] < 1e-4 and onnx["kl_mean"] < 1e-8
    assert all(a["agrees"] for a in _row(data, "onnxruntime fp32")["answers"])
    if _llamacpp():
        f32, q4 = _row(data, "llamacpp fp32"), _row(data, "llamacpp q4_k_m")
        assert f32["fidelity"]["routing_agreement"] is None  # llama.cpp does not report routing
        assert f32["fidelity"]["passed"] is True and q4["fidelity"]["passed"] is True
        assert q4["size_bytes"] < f32["size_bytes"] / 2
        assert q4["decode_bytes_per_token"] < f32["decode_bytes_per_token"] / 3


def test_a_runtime_that_is_not_here_is_a_row_with_the_reason(report):
    data, _ = report
    trt = _row(data, "tensorrt")
    assert trt["status"] == "unavailable" and "tensorrt" in trt["reason"].lower() and trt["fidelity"] is None
    if not _llamacpp():
        assert _row(data, "llamacpp")["status"] == "unavailable"


def test_json_is_valid_against_the_schema(report):
    data, out = report
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(data, schema())
    jsonschema.validate(json.loads((out / "compare.json").read_text()), schema())


def test_report_directory_has_charts_html_table_and_trace(report):
    data, out = report
    for name in ("decode_tok_s.png", "ttft.png", "fidelity_vs_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "http://" not in page and "<link" not in page and "<script" not in page
    assert "onnxruntime fp32" in page and ("no tensorrt bundle given" in page or "no TensorRT library" in page)
    table = (out / "table.md").read_text()
    assert table.count("\n") >= len(data["rows"]) + 1 and "| tensorrt | unavailable:" in table
    assert (out / "trace" / "trace.json").is_file()


def test_rows_for_bad_bundles_and_runtimes_without_bundles(bundles, tmp_path):
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    rows = plan_rows("demo", [not_bundle], ["onnxruntime", "nonesuch"], source_sha256="0" * 64, device="cpu", threads=None, provider=None, trace_dir=None)
    by = {r.label: r for r in rows}
    assert by["? (empty)"].reason and by["? (empty)"].argv is None
    assert "no onnx bundle given" in by["onnxruntime"].reason and "--bundles" in by["onnxruntime"].reason
    assert "unknown runtime 'nonesuch'" in by["nonesuch"].reason
    # a bundle of another checkpoint is not compared with this reference
    rows = plan_rows("demo", [bundles["onnx fp32"]], ["onnxruntime"], source_sha256="0" * 64, device="cpu", threads=None, provider=None, trace_dir=None)
    assert "another checkpoint" in rows[-1].reason and rows[-1].argv is None


def test_a_worker_that_cannot_load_becomes_a_row_with_its_error(tmp_path):
    c = Candidate("torch fp32", "torch", str(tmp_path / "missing"), argv=worker_argv(tmp_path / "missing", "torch", {"device": "cpu"}))
    (res,) = run_rows([c], 1, log_dir=tmp_path)
    assert res.status == "unavailable" and "missing" in res.reason


def test_cli_errors_are_one_line(bundles, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    r = CliRunner().invoke(app, ["compare", "--out", str(full)])
    assert r.exit_code == 2 and "is not empty" in " ".join(r.output.split())  # refused before any work
    r = CliRunner().invoke(app, ["compare", "--limit", "0"])
    assert r.exit_code == 2 and "--limit must be at least 1" in r.output
    r = CliRunner().invoke(app, ["compare", "--model", str(bundles["onnx fp32"])])
    assert r.exit_code == 2 and "is a bundle" in r.output and "Traceback" not in r.output


def test_statistics_and_activated_bytes(bundles):
    assert percentile([3, 1, 2, 4], 50) == 2.5 and percentile([], 50) is None
    assert spread([1.0]) == {"median": 1.0, "p10": 1.0, "p90": 1.0, "n": 1}
    # the ONNX fp32 manifest's groups and the checkpoint's spec count the same activated weights
    assert bundle_decode_bytes(read_manifest(bundles["onnx fp32"])).weights == checkpoint_decode_bytes("demo").weights
