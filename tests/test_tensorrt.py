"""TensorRT: the If-per-expert graphs, real engine builds with TensorRT-RTX (no GPU needed), the
manifest's build facts, and the runtime's refusals before any engine is deserialized.

Running an engine needs an NVIDIA GPU: that test skips with the reason when there is none, and the
engines' graphs are checked against the reference through ONNX Runtime on the CPU instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from medmoe_edge.bundle import read_manifest, sha256_file, write_manifest
from medmoe_edge.cli.app import app
from medmoe_edge.errors import InputError, RuntimeUnavailable
from medmoe_edge.exporter import registered
from medmoe_edge.presets import PRESETS, Preset
from medmoe_edge.random_init import write_random_checkpoint
from medmoe_edge.runtime_contract import RuntimeOptions
from medmoe_edge.spec import MoESpec
from medmoe_edge.tensorrt_lib import EngineFacts, TrtLibrary, TrtTarget, engine_mismatch, gpu_compute_capability, parse_compute_capabilities
from medmoe_edge.workflows import export_bundle, verify_bundle

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'medmoe-edge[tensorrt]'")

runner = CliRunner()
MOE_FORMS = {"top1": MoESpec(layers=(0, 2)), "top2": MoESpec(layers=(0, 2), top_k=2), "residual": MoESpec(layers=(0, 2), use_residual=True)}
FORMS = [(p, f) for p in (Preset.TINY_PHI, Preset.TINY_STABLELM) for f in MOE_FORMS]


def _nodes(graph) -> list:
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.HasField("g"):
                out += _nodes(attr.g)
    return out


def _export(src, out: Path, **flags) -> None:
    given = {"--precision": "fp32", "--max-context": 256} | {f"--{k.replace('_', '-')}": v for k, v in flags.items()}
    export_bundle("tensorrt", src, out, given)


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    """The demo model as fp32 engines (built once for this module)."""
    out = tmp_path_factory.mktemp("trt") / "demo"
    _export("demo", out, max_context=1024)
    return out


@pytest.mark.parametrize(("preset", "form"), FORMS, ids=[f"{p.value}-{f}" for p, f in FORMS])
def test_engines_build_and_the_graphs_equal_the_reference(preset, form, tmp_path):
    """Both variants, top-1/top-2/use_residual: TensorRT-RTX parses and builds every graph, fp32 and
    fp16; the graphs have no NonZero, one If per routed expert, and equal the PyTorch reference on
    ONNX Runtime CPU (fp32 ≤ 1e-4 with identical routing; fp16 within its tolerances)."""
    src = write_random_checkpoint(replace(PRESETS[preset], moe=MOE_FORMS[form]), tmp_path / "ckpt", seed=3)
    _export(src, tmp_path / "trt")
    b = tmp_path / "trt"
    m = read_manifest(b)
    dec = onnx.load(str(b / "decoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in _nodes(dec.graph)]
    assert "NonZero" not in ops and ops.count("If") == len(m.model.moe_layers) * m.model.num_experts
    assert m.model.layout["moe_dispatch"] == "if-per-expert"
    report = verify_bundle(b, runtime="onnxruntime", limit=3, explicit_set=True).report
    assert report.checks["logits_max_abs"][0] <= 1e-4 and report.checks["routing_agreement"][0] == 1.0
    assert report.passed
    # fp16 engines of the same checkpoint: built, and the fp16 graphs within the fp16 tolerances
    _export(src, tmp_path / "trt16", precision="fp16")
    assert read_manifest(tmp_path / "trt16").precision.value == "fp16"
    assert verify_bundle(tmp_path / "trt16", runtime="onnxruntime", limit=3, explicit_set=True).report.passed


def test_manifest_lists_engines_hashes_library_and_profiles(demo_bundle):
    m = read_manifest(demo_bundle)
    files = {f.path: f for f in m.files}
    facts = m.extra["tensorrt"]
    assert facts["library"] == "tensorrt_rtx_bindings" and facts["version"] == trt.__version__ and facts["target"] == "rtx"
    assert facts["compute_capabilities"] == ["8.6", "8.9"] and facts["max_context"] == 1024 and facts["max_batch"] == 1
    for graph, engine in facts["engines"].items():
        assert files[engine].role == "engine" and files[engine].sha256 == sha256_file(demo_bundle / engine)
        assert (demo_bundle / engine).stat().st_size > 100_000  # a real serialized engine
        assert files[m.graphs[graph].file].role == "graph"
    prof = m.extra["tensorrt_profiles"]["decoder"]
    assert prof["batch"] == [1, 1, 1] and prof["total"][2] == 1024 and prof["new"][1] == m.model.image_tokens + 64
    assert m.toolchain["tensorrt"] == trt.__version__
    assert all(g.precision.value == "fp32" for g in m.tensor_groups)


def test_engines_are_streamed_into_their_files(demo_bundle, tmp_path):
    """TensorRT-RTX streams each engine into its file instead of holding it whole beside the
    builder's copy of the weights (what lets a full-size checkpoint build on 24 GB: docs/TENSORRT.md).
    The streamed engine is the one the in-memory build serializes: the same size, and as close to it
    as two in-memory builds are to each other. TensorRT-RTX's builds are not bit-reproducible: two
    builds of the fp32 demo decoder (31 MB) differ in 3,000-7,000 bytes (0.02 %), streamed or not; a
    lost or misplaced chunk would change the size or most bytes after it."""
    import numpy as np

    from medmoe_edge.export.tensorrt_export import EngineBuilder

    m = read_manifest(demo_bundle)
    facts = EngineFacts.from_json(m.extra["tensorrt"])
    engines = []
    for stream in (True, False, False):
        builder = EngineBuilder(trt, facts)
        assert builder.stream  # TensorRT-RTX has build_serialized_network_to_stream
        builder.stream = stream
        out = tmp_path / f"{len(engines)}.engine"
        builder.build(demo_bundle / "decoder.onnx", m.graphs["decoder"], m.extra["tensorrt_profiles"]["decoder"], out)
        engines.append(np.fromfile(out, dtype=np.uint8))
    streamed, whole, again = engines
    assert len(streamed) == len(whole) == len(again) > 1_000_000
    assert (streamed != whole).mean() <= 1e-3 and (whole != again).mean() <= 1e-3


def test_the_model_weights_are_released_before_the_engines_are_built(tmp_path):
    """The builder makes its own copy of a graph's weights (12 GB for a full-size Phi-2 Med-MoE's
    fp16 decoder), so the exporter moves the torch model to the meta device once the graphs are written."""
    from medmoe_edge.export.tensorrt_export import TensorRTExporter

    exporter = TensorRTExporter()
    request = exporter.request({"--precision": "fp32", "--max-context": 256})
    loaded = exporter.load("demo", request)
    (tmp_path / "b").mkdir()
    parts = exporter.write(loaded, tmp_path / "b", request)
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
    assert all((tmp_path / "b" / f).stat().st_size > 100_000 for f in parts.extra["tensorrt"]["engines"].values())


def test_fp16_engines_from_the_cli(tmp_path):
    """The default precision is fp16; without a GPU the export's own check runs the graphs on the CPU and says so."""
    r = runner.invoke(app, ["export", "--format", "tensorrt", "--model", "demo", "--max-context", "768", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "b")
    assert m.precision.value == "fp16" and {e for e in m.extra["tensorrt"]["engines"].values()} <= {f.path for f in m.files}
    if gpu_compute_capability() is None:
        assert "no GPU to run the engines here: checking the ONNX graphs" in r.output
    assert "answer_agreement" in r.output and "FAIL" not in r.output


def test_bf16_engines_are_built_and_marked_unverified_without_a_gpu(tmp_path):
    """bf16: graphs in bf16 (no complex Cast left by the TorchScript exporter), engines built; without a
    GPU nothing can run them, and the export and `verify` say so instead of failing obscurely."""
    b = tmp_path / "b"
    r = runner.invoke(app, ["export", "--format", "tensorrt", "--model", "demo", "--precision", "bf16", "--max-context", "256", "--out", str(b)])
    assert r.exit_code == 0, r.output
    m = read_manifest(b)
    stored = {g.name: g.precision.value for g in m.tensor_groups}  # read back from the graphs: bf16, the routers fp32
    assert m.precision.value == "bf16" and {n for n, p in stored.items() if p != "bf16"} == {f"layers.{i}.router" for i in m.model.moe_layers}
    assert m.graphs["decoder"].inputs[0].dtype == "bfloat16" and m.graphs["vision"].outputs[0].dtype == "bfloat16"
    for graph in m.graphs.values():
        casts = [a.i for n in _nodes(onnx.load(str(b / graph.file), load_external_data=False).graph) if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
        assert onnx.TensorProto.COMPLEX128 not in casts
    for engine in m.extra["tensorrt"]["engines"].values():
        assert (b / engine).stat().st_size > 100_000
    if gpu_compute_capability() is None:
        assert "UNVERIFIED: no GPU to run the bf16 engines here" in " ".join(r.output.split())
        v = runner.invoke(app, ["verify", str(b), "--runtime", "onnxruntime"])
        assert v.exit_code != 0 and "computes in bfloat16, which the onnxruntime runtime does not run" in " ".join(v.output.split()) and "Traceback" not in v.output
    with pytest.raises(InputError, match=r"--precision bf16 needs compute capability 8\.0 or later \(Ampere\); 7\.5 has no bf16"):
        export_bundle("tensorrt", "demo", tmp_path / "c", {"--precision": "bf16", "--compute-capability": "7.5,8.6"})
    assert not (tmp_path / "c").exists()


def test_a_mismatched_engine_is_refused_with_the_rebuild_command(demo_bundle, tmp_path, sample_png):
    """Another library version in the manifest: `run` refuses before deserializing, naming the rebuild."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(demo_bundle, b)
    m = read_manifest(b)
    write_manifest(b, replace(m, extra=m.extra | {"tensorrt": m.extra["tensorrt"] | {"version": "1.0.0.1"}}))
    r = runner.invoke(app, ["run", "--model", str(b), "--image", str(sample_png), "--question", "What modality is this?", "--runtime", "tensorrt", "--device", "cuda"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = " ".join(r.output.split())
    assert f"built with TensorRT-RTX 1.0.0.1 and this machine has {trt.__version__}" in line
    assert "rebuild: medmoe-edge export --format tensorrt --model" in line


def test_mismatch_rules():
    """The check the runtime makes before deserializing: version, then the GPU's compute capability."""
    facts = EngineFacts(TrtLibrary.RTX, "1.7.1.116", TrtTarget.RTX, ("8.6", "8.9"))
    assert engine_mismatch(facts, "1.7.1.116", "8.9", "CMD") is None
    assert "compute capability 8.6, 8.9 and this GPU is 9.0: rebuild for it: CMD" in engine_mismatch(facts, "1.7.1.116", "9.0", "CMD")
    assert "version that built them; rebuild: CMD" in engine_mismatch(facts, "1.8.0", "8.9", "CMD")
    assert "not installed here" in engine_mismatch(facts, None, "8.9", "CMD")
    assert parse_compute_capabilities(["sm86,8.9", "120"]) == ("8.6", "8.9", "12.0")
    with pytest.raises(InputError, match=r"--compute-capability '8\.7' is not one TensorRT-RTX builds for.*--target jetson"):
        parse_compute_capabilities(["8.7"])


@pytest.mark.skipif(gpu_compute_capability() is not None, reason="this machine has a GPU: the engines run (test_engines_run_on_the_gpu)")
def test_without_a_gpu_the_runtime_says_what_is_missing(demo_bundle, sample_png):
    r = runner.invoke(app, ["run", "--model", str(demo_bundle), "--image", str(sample_png), "--question", "What modality is this?", "--runtime", "tensorrt", "--device", "cuda"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = " ".join(r.output.split())
    assert "needs an NVIDIA GPU of compute capability 8.6, 8.9" in line and "--runtime onnxruntime" in line
    r = runner.invoke(app, ["run", "--model", str(demo_bundle), "--image", str(sample_png), "--question", "What modality is this?", "--runtime", "tensorrt"])
    assert r.exit_code != 0 and "--device cpu is not supported by the tensorrt runtime: use cuda" in " ".join(r.output.split())


def test_the_bundle_graphs_run_with_onnxruntime(demo_bundle, sample_png):
    """The ONNX graphs the engines were built from run on the CPU, with the reference's answer."""
    args = ["--image", str(sample_png), "--question", "What modality is this?", "--json"]
    ours = runner.invoke(app, ["run", "--model", str(demo_bundle), "--runtime", "onnxruntime", *args])
    ref = runner.invoke(app, ["run", "--model", "demo", *args])
    assert ours.exit_code == 0 and ref.exit_code == 0, ours.output + ref.output
    assert json.loads(ours.stdout)["answer"] == json.loads(ref.stdout)["answer"]


@pytest.mark.skipif(gpu_compute_capability() not in ("8.6", "8.9"), reason="running TensorRT-RTX engines needs an NVIDIA GPU of compute capability 8.6 or 8.9 (the engines' targets); none here")
def test_engines_run_on_the_gpu(demo_bundle):
    report = verify_bundle(demo_bundle, limit=8, explicit_set=True, options=RuntimeOptions(device="cuda")).report
    assert report.passed, report.checks


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"--compute-capability": "9.0"}, r"--compute-capability '9\.0' is not one TensorRT-RTX builds for"),
        ({"--target": "orin"}, r"--target 'orin' is not one of rtx, jetson"),
        ({"--max-context": 60}, r"--max-context 60 cannot hold one image \(64 positions\)"),
        ({"--max-context": 100}, r"--max-context 100 cannot hold one image \(64 positions\) and a question with its answer: use at least 128"),
        ({"--max-context": 99999}, r"--max-context 99999 is above the model's context length"),
        ({"--target": "jetson", "--compute-capability": "8.6"}, r"--compute-capability is for --target rtx"),
        ({"--quant": "q4_k_m"}, r"--quant does not apply to --format tensorrt"),
    ],
)
def test_bad_options_are_one_line_errors(flags, message, tmp_path):
    with pytest.raises((InputError, RuntimeUnavailable), match=message):
        export_bundle("tensorrt", "demo", tmp_path / "b", flags)
    assert not (tmp_path / "b").exists()


def test_jetson_target_without_a_gpu_names_the_fix(tmp_path):
    if gpu_compute_capability() is not None:
        pytest.skip("this machine has a GPU")
    r = runner.invoke(app, ["export", "--format", "tensorrt", "--model", "demo", "--target", "jetson", "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = " ".join(r.output.split())
    assert re.search(r"standard TensorRT|TensorRT is not installed", line)
    assert not (tmp_path / "b").exists()


def test_registered():
    assert registered()["tensorrt"].flags() == ("--precision", "--target", "--max-batch", "--max-context", "--compute-capability")
