"""`medmoe-edge bench`: warm-up + repetitions, p50/p90/p99, a threads and batch sweep, the roofline share."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from medmoe_edge.benching import bench, parse_counts, schema
from medmoe_edge.cli.app import app
from medmoe_edge.errors import InputError
from medmoe_edge.runtimes.registry import discover
from medmoe_edge.workflows import export_bundle


@pytest.fixture(scope="module")
def q4_bundle(tmp_path_factory) -> Path:
    if not discover()["llamacpp"].availability().available:
        pytest.skip("the llamacpp runtime is not built here (bash scripts/build_llamacpp.sh)")
    out = tmp_path_factory.mktemp("bench") / "gguf-q4km"
    export_bundle("gguf", "demo", out, {"--quant": "q4_k_m"}, trace_questions=0)
    return out


def _check(data: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(data, schema())
    for c in data["configs"]:
        for key in ("prefill_s", "ttft_s", "decode_step_s", "decode_tok_s"):
            t = c[key]
            assert 0 < t["p50"] <= t["p90"] <= t["p99"], (key, t)
        assert c["decode_steps"] == data["settings"]["decode_tokens"]
        assert c["decode_step_s"]["n"] == c["reps"] * c["decode_steps"]
        assert 0 < c["roofline_fraction"] < 2 and c["peak_rss_bytes"] > 50 * 2**20


def test_bench_a_gguf_bundle_with_a_thread_sweep(q4_bundle):
    r = CliRunner().invoke(app, ["bench", str(q4_bundle), "--threads", "1,2", "--batch", "1,2", "--reps", "3", "--decode-tokens", "16", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    _check(data)
    assert data["runtime"] == "llamacpp" and data["precision"] == "q4_k_m"
    assert [(c["threads"], c["batch"]) for c in data["configs"]] == [(1, 1), (2, 1)]
    # llama.cpp takes one request at a time: batch 2 is reported as skipped, not run
    assert [(s["threads"], s["batch"]) for s in data["skipped"]] == [(1, 2), (2, 2)] and "at most 1" in data["skipped"][0]["reason"]
    assert data["bandwidth"]["gbs"] > 0 and "numpy copy" in data["bandwidth"]["method"]
    assert data["decode_bytes_per_step"] > 0


def test_bench_the_torch_checkpoint_with_a_batch_sweep():
    result = bench("demo", threads=[2], batches=[1, 2], warmup=1, reps=2, decode_tokens=8)
    data = result.to_json()
    _check(data)
    one, two = data["configs"]
    assert (one["batch"], two["batch"]) == (1, 2) and not data["skipped"]
    # rows × steps / s: a batch of two produces twice the tokens of each step
    assert two["decode_tok_s"]["p50"] == pytest.approx(2 * two["decode_steps_per_s"]["p50"])


def test_table_output_and_errors(q4_bundle):
    r = CliRunner().invoke(app, ["bench", str(q4_bundle), "--reps", "1", "--warmup", "0", "--decode-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert "roofline" in r.output and "p99" in r.output and "decode (ms/step)" in r.output
    r = CliRunner().invoke(app, ["bench", str(q4_bundle), "--threads", "0"])
    assert r.exit_code == 2 and "--threads takes comma-separated positive integers" in r.output
    r = CliRunner().invoke(app, ["bench", str(q4_bundle), "--decode-tokens", "2"])
    assert r.exit_code == 2 and "at least 8" in r.output
    r = CliRunner().invoke(app, ["bench", str(q4_bundle), "--runtime", "nonesuch"])
    assert r.exit_code == 2 and "unknown runtime 'nonesuch'" in r.output


def test_parse_counts():
    assert parse_counts("1, 2,4,2", "--threads") == [1, 2, 4]
    assert parse_counts(None, "--threads") == []
    for bad in ("", "a", "1,-1", "0"):
        with pytest.raises(InputError):
            parse_counts(bad, "--threads")
