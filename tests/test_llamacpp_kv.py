"""`--kv-type` of the llamacpp runtime, and what `run --json` reports about a llama.cpp load.

Real demo bundles and the patched llama.cpp (scripts/build_llamacpp.sh); the whole eval split per KV
type is `benchmarks/gguf_kv_types.py` (table in docs/GGUF.md).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmoe_edge.cli.app import app
from medmoe_edge.export.gguf_export import export_gguf
from medmoe_edge.runtimes.base import KvType, RuntimeOptions
from medmoe_edge.vocab import Precision
from medmoe_edge.workflows import verify_bundle

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: bash scripts/build_llamacpp.sh")
if "+medmoe" not in llama_cpp.__version__:
    pytest.skip("llama-cpp-python is not the patched build: bash scripts/build_llamacpp.sh", allow_module_level=True)

from medmoe_edge.runtimes.llamacpp_runtime import DEFAULT_KV_TYPE, LlamaCppRuntime  # noqa: E402

runner = CliRunner()
SUBSET = 96  # eval questions per bundle and KV type (the whole split: benchmarks/gguf_kv_types.py)


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory) -> dict[Precision, object]:
    """F32 and F16 demo bundles: precision -> bundle directory."""
    root = tmp_path_factory.mktemp("kv")
    out = {}
    for q in (Precision.FP32, Precision.FP16):
        export_gguf("demo", root / q.value, q)
        out[q] = root / q.value
    return out


@pytest.mark.parametrize("quant", [Precision.FP32, Precision.FP16], ids=lambda q: q.value)
def test_default_kv_type_answers_like_f32_kv(quant, demo_bundles):
    """The default KV type gives the F32 cache's answer on every question of an eval subset."""
    bundle = demo_bundles[quant]
    f32 = verify_bundle(bundle, limit=SUBSET, options=RuntimeOptions(kv_type=KvType.F32)).report
    default = verify_bundle(bundle, limit=SUBSET, options=RuntimeOptions()).report
    assert len(f32.samples) == len(default.samples) == SUBSET
    assert [s.bundle_answer for s in default.samples] == [s.bundle_answer for s in f32.samples]
    assert default.passed and default.metrics["token_agreement"] == 1.0


def test_kv_types_set_the_cache_and_record_it(demo_bundles):
    """Each type is what llama.cpp allocates (KV bytes follow the type), q8_0 turns flash attention on."""
    sizes = {}
    for kv in KvType:
        rt = LlamaCppRuntime(demo_bundles[Precision.FP32], RuntimeOptions(kv_type=kv))
        try:
            s = rt.settings()
            assert s["kv_type"] == kv.value and s["flash_attn"] is (kv is KvType.Q8_0)
            sizes[kv] = rt.kv_cache_bytes
            assert set(rt.timings.load_parts_s) == {"library_s", "bundle_check_s", "text_model_s", "context_s", "mmproj_s"}
        finally:
            rt.close()
    assert sizes[KvType.F32] == 2 * sizes[KvType.F16] and sizes[KvType.Q8_0] == sizes[KvType.F16] * 17 // 32
    assert LlamaCppRuntime.resolve_options(RuntimeOptions()).kv_type is None and DEFAULT_KV_TYPE is KvType.F16


def test_q8_0_kv_stays_within_the_bundle_tolerances(demo_bundles):
    rep = verify_bundle(demo_bundles[Precision.FP32], limit=16, options=RuntimeOptions(kv_type=KvType.Q8_0)).report
    assert rep.passed and rep.metrics["logits_max_abs"] <= 0.25, rep.metrics


def test_run_json_reports_kv_type_load_parts_and_peak_rss(demo_bundles, sample_png):
    args = ["run", "--runtime", "llamacpp", "--model", str(demo_bundles[Precision.FP16]), "--image", str(sample_png), "--question", "q?", "--json", "--max-new-tokens", "4"]
    r = runner.invoke(app, args + ["--kv-type", "q8_0"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["runtime_settings"]["kv_type"] == "q8_0" and j["runtime_settings"]["flash_attn"] is True
    assert j["timings"]["load_s"] >= sum(j["timings"]["load_parts_s"].values()) > 0
    assert j["memory"]["peak_rss_mb"] > 0
    j = json.loads(runner.invoke(app, args).stdout)
    assert j["runtime_settings"]["kv_type"] == DEFAULT_KV_TYPE.value
    assert j["runtime_settings"]["repack_weights"] is False  # docs/GGUF.md: load time and memory over ~10 % q4_k_m decode


def test_bad_kv_type_is_a_one_line_error(demo_bundles, sample_png):
    r = runner.invoke(app, ["run", "--runtime", "llamacpp", "--model", str(demo_bundles[Precision.FP32]), "--image", str(sample_png), "--question", "q?", "--kv-type", "q4"])
    assert r.exit_code == 2 and "--kv-type 'q4' is not a KV cache type: use one of f32, f16, q8_0" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["run", "--image", str(sample_png), "--question", "q?", "--kv-type", "f16"])
    assert r.exit_code == 2 and "--kv-type f16 does not apply to the torch runtime: --kv-type is an option of the llamacpp runtime" in r.output
