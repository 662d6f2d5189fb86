"""ONNX export, the bundle manifest, and the onnxruntime runtime against the PyTorch reference.

Real exports (torch.onnx) and real ONNX Runtime sessions on the tiny random checkpoints
of both variants and on the built-in demo model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, open_bundle, read_manifest, sha256_file
from medmoe_edge.cli.app import app
from medmoe_edge.errors import CheckpointError, InputError, RuntimeUnavailable
from medmoe_edge.export import onnx_export
from medmoe_edge.export.onnx_export import OPSET, export_onnx
from medmoe_edge.presets import Preset
from medmoe_edge.tensor_ids import checkpoint_id
from medmoe_edge.vocab import Precision
from medmoe_edge.runtimes.base import ArtifactKind, RuntimeOptions
from medmoe_edge.runtimes.onnxruntime_runtime import OnnxRuntimeRuntime
from medmoe_edge.runtimes.torch_runtime import TorchRuntime

runner = CliRunner()
MODELS = ["tiny-phi", "tiny-stablelm", "demo"]


@pytest.fixture(scope="session")
def fp32_bundles(tiny_ckpts, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name → (source checkpoint, fp32 ONNX bundle)."""
    root = tmp_path_factory.mktemp("onnx")
    sources = {"tiny-phi": tiny_ckpts[Preset.TINY_PHI], "tiny-stablelm": tiny_ckpts[Preset.TINY_STABLELM], "demo": "demo"}
    out = {}
    for name, src in sources.items():
        export_onnx(src, root / name)
        out[name] = (Path(api.load(src).runtime.loaded.checkpoint_dir) if src == "demo" else src, root / name)
    return out


def _requests(pipe, image, questions):
    return [pipe.prepare(image, q)[0] for q in questions]


def test_manifest_lists_every_file_groups_and_interfaces(fp32_bundles):
    src, bundle = fp32_bundles["demo"]
    m = open_bundle(bundle, ArtifactKind.ONNX)
    files = {f.path: f for f in m.files}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, MANIFEST_DIGEST_NAME)}
    assert set(files) == on_disk
    for rel, f in files.items():
        assert f.sha256 == sha256_file(bundle / rel) and f.bytes == (bundle / rel).stat().st_size
    assert {"decoder.onnx", "decoder.onnx.data", "vision.onnx", "embed.onnx", "tokenizer.json", "config.json"} <= set(files)
    assert m.toolchain["opset"] == OPSET and m.precision is Precision.FP32
    groups = {g.name: g for g in m.tensor_groups}
    # one group per routed expert and per meta expert of every MoE layer (ready for per-expert precision plans)
    for layer in m.model.moe_layers:
        assert {f"layers.{layer}.expert.{e}" for e in range(4)} | {f"layers.{layer}.router", f"layers.{layer}.meta"} <= set(groups)
    assert {"vision", "projector", "embed", "lm_head", "final_norm", "layers.1.ffn", "layers.1.attn"} <= set(groups)
    n_params = sum(p.numel() for p in TorchRuntime(src).model.parameters())
    assert sum(g.params for g in m.tensor_groups) == n_params
    assert all(g.precision is Precision.FP32 for g in m.tensor_groups)
    assert len(groups) == len(m.tensor_groups)  # one type per group
    assert m.model.layout == {"dtype": "float32", "moe_dispatch": "nonzero-gather-scatternd"}
    # the TensorRT optimisation profile bounds every dynamic input of the decoder
    mins, opts, maxs = m.graphs["decoder"].profile_shapes(m.extra["tensorrt_profiles"]["decoder"])
    assert mins["inputs_embeds"] == [1, 1, 256] and maxs["past_key_0"] == [4, 8, 2048, 32]
    assert opts["inputs_embeds"][1] == m.model.image_tokens + 64
    assert m.source["sha256"] and m.prompt["template"].endswith("ASSISTANT:")


def test_tensor_group_names():
    """Groups come from the TensorId table (medmoe_edge.tensor_ids; tests/test_tensor_ids.py covers every tensor)."""
    group = lambda key: str(checkpoint_id(key).group)  # noqa: E731
    assert group("model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight") == "layers.2.expert.3"
    assert group("model.layers.2.mlp.deepspeed_moe.gate.wg.bias") == "layers.2.router"
    assert group("model.layers.2.mlp.meta_moe.down_proj.weight") == "layers.2.meta"
    assert group("model.layers.1.mlp.fc2.bias") == "layers.1.ffn"
    assert group("model.layers.1.post_attention_layernorm.weight") == "layers.1.attn"
    assert group("vision_model.pre_layrnorm.weight") == "vision"


def test_graphs_are_standard_opset_and_expert_sparse(fp32_bundles):
    _, bundle = fp32_bundles["tiny-phi"]
    for name in ("vision.onnx", "embed.onnx", "decoder.onnx"):
        g = onnx.load(str(bundle / name), load_external_data=False)
        assert {o.domain for o in g.opset_import} <= {"", "ai.onnx"} and g.opset_import[0].version == OPSET
        assert all(n.domain in ("", "ai.onnx") for n in g.graph.node), "no contrib ops (TensorRT must parse the graph)"
    dec = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    names = [n.name for n in dec.graph.node]
    # deterministic per-layer / per-expert names
    fc1 = {e: [n for n in dec.graph.node if f"/layers.0/mlp/deepspeed_experts.{e}/fc1/" in n.name and n.op_type in ("Gemm", "MatMul")] for e in range(4)}
    assert all(len(v) == 1 for v in fc1.values()), fc1
    assert sum(op == "NonZero" for op in (n.op_type for n in dec.graph.node)) == 2 * 4  # one per expert per MoE layer
    assert len(names) == len(set(names))


def test_only_the_selected_expert_sees_each_token(fp32_bundles, sample_png, tmp_path):
    """Expose each expert's fc1 output of layer 0: its row count must be the number of tokens routed to it."""
    src, bundle = fp32_bundles["tiny-phi"]
    dec = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    taps = {}
    for e in range(4):
        node = next(n for n in dec.graph.node if f"/layers.0/mlp/deepspeed_experts.{e}/fc1/" in n.name and n.op_type in ("Gemm", "MatMul"))
        taps[e] = node.output[0]
        dec.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    onnx.save(dec, str(work / "decoder.onnx"))
    sess = ort.InferenceSession(str(work / "decoder.onnx"), providers=["CPUExecutionProvider"])
    ref = TorchRuntime(src)
    req = api.Pipeline(ref).prepare(sample_png, "Describe the image.")[0]
    out = ref.prefill([req], 1)
    experts = out.prompt_experts[0][0, :, 0]
    rt = OnnxRuntimeRuntime(bundle)
    # the same prefill inputs the runtime builds, fed to the instrumented graph
    m = ref.model
    rows = m.splice(req.token_ids, m.encode_images(req.pixel_values))
    batch = m.make_batch([rows])
    feeds = {"inputs_embeds": batch.embeds.numpy(), "attention_mask": batch.mask.numpy(), "position_ids": batch.positions.numpy(), "last_index": torch.tensor([rows.shape[0] - 1]).numpy()}
    kv, d = rt.kv_shape
    for i in range(rt.n_layers):
        feeds[f"past_key_{i}"] = feeds[f"past_value_{i}"] = torch.zeros(1, kv, rows.shape[0], d).numpy()
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    counts = torch.bincount(experts, minlength=4).tolist()
    assert [got[taps[e]].shape[0] for e in range(4)] == counts
    assert sum(counts) == rows.shape[0] and max(counts) < rows.shape[0]  # routing is spread, so sparsity is visible


def test_export_is_deterministic(tiny_ckpts, tmp_path):
    a = export_onnx(tiny_ckpts[Preset.TINY_STABLELM], tmp_path / "a")
    b = export_onnx(tiny_ckpts[Preset.TINY_STABLELM], tmp_path / "b")
    assert [(f.path, f.sha256) for f in a.files] == [(f.path, f.sha256) for f in b.files]


def test_cli_export_reports_fidelity_and_run_answers_like_reference(tmp_path):
    out = tmp_path / "demo-onnx"
    r = runner.invoke(app, ["export", "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "logits_max_abs" in r.output and "answer_agreement" in r.output and "FAIL" not in r.output
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm", download=False)
    args = ["run", "--image", ct, "--question", "What modality is this?", "--json", "--max-new-tokens", "8"]
    a = runner.invoke(app, args)
    b = runner.invoke(app, args + ["--runtime", "onnxruntime", "--model", str(out)])
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["answer"] == jb["answer"] and ja["token_ids"] == jb["token_ids"] and ja["routing"] == jb["routing"]


def test_verify_cli_json(fp32_bundles):
    _, bundle = fp32_bundles["demo"]
    r = runner.invoke(app, ["verify", str(bundle), "--limit", "8", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["n"] == 8
    assert rep["metrics"]["logits_max_abs"] <= 1e-4 and rep["metrics"]["routing_agreement"] == 1.0


def _corrupt(bundle: Path, tmp_path: Path, rel: str) -> Path:
    work = tmp_path / "corrupt"
    shutil.copytree(bundle, work)
    p = work / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return work


@pytest.mark.parametrize("rel", ["decoder.onnx.data", "tokenizer.json"])
def test_one_flipped_byte_is_refused_by_run_and_verify(rel, fp32_bundles, sample_png, tmp_path):
    _, bundle = fp32_bundles["tiny-phi"]
    work = _corrupt(bundle, tmp_path, rel)
    r = runner.invoke(app, ["run", "--runtime", "onnxruntime", "--model", str(work), "--image", str(sample_png), "--question", "q?"])
    assert r.exit_code == 2 and f"bundle file {rel} does not match its SHA-256" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["verify", str(work), "--reference", str(fp32_bundles["tiny-phi"][0])])
    assert r.exit_code == 2 and f"bundle file {rel} does not match its SHA-256" in r.output


def _rewrite_manifest(work: Path, text: str) -> None:
    """Replace the manifest and its digest together (an edit of the manifest alone is refused first)."""
    (work / MANIFEST_NAME).write_text(text)
    (work / MANIFEST_DIGEST_NAME).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST_NAME}\n")


def test_incomplete_or_mismatched_bundles_are_refused(fp32_bundles, tmp_path):
    _, bundle = fp32_bundles["tiny-phi"]
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    (work / MANIFEST_NAME).unlink()
    (work / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json: it is not a complete bundle"):
        read_manifest(work)
    shutil.rmtree(work)
    shutil.copytree(bundle, work)
    (work / "embed.onnx.data").unlink()
    with pytest.raises(CheckpointError, match="bundle file embed.onnx.data is missing"):
        OnnxRuntimeRuntime(work)
    shutil.copyfile(bundle / "embed.onnx.data", work / "embed.onnx.data")
    man = json.loads((work / MANIFEST_NAME).read_text())
    man["format"] = "gguf"
    (work / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="does not match manifest.sha256"):
        read_manifest(work)
    _rewrite_manifest(work, json.dumps(man))
    with pytest.raises(CheckpointError, match="is a bundle of kind gguf, not onnx"):
        OnnxRuntimeRuntime(work)
    man["format"], man["version"] = "onnx", 99
    _rewrite_manifest(work, json.dumps(man))
    with pytest.raises(CheckpointError, match="manifest version 99"):
        read_manifest(work)
    _rewrite_manifest(work, "{not json")
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_manifest(work)


def test_verify_refuses_a_reference_that_is_not_the_source(fp32_bundles):
    _, bundle = fp32_bundles["tiny-phi"]
    r = runner.invoke(app, ["verify", str(bundle), "--reference", str(fp32_bundles["tiny-stablelm"][0])])
    assert r.exit_code == 2 and "is not the checkpoint this bundle was exported from" in r.output


def test_interrupted_export_leaves_no_bundle(tiny_ckpts, tmp_path, monkeypatch):
    real = onnx_export._export

    def fail_on_decoder(module, args, path, *rest, **options):
        if path.name == "decoder.onnx":
            raise KeyboardInterrupt
        return real(module, args, path, *rest, **options)

    monkeypatch.setattr(onnx_export, "_export", fail_on_decoder)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_ckpts[Preset.TINY_PHI], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_non_empty_out_and_bad_precision(tiny_ckpts, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(InputError, match="already exists and is not empty"):
        export_onnx(tiny_ckpts[Preset.TINY_PHI], tmp_path / "x")
    r = runner.invoke(app, ["export", "--format", "onnx", "--precision", "int3", "--out", str(tmp_path / "y"), "--model", str(tiny_ckpts[Preset.TINY_PHI])])
    assert r.exit_code == 2 and "--precision 'int3' is not supported here: use one of fp32, fp16" in r.output and not (tmp_path / "y").exists()
    assert (tmp_path / "x" / "f").read_text() == "keep"


def test_provider_and_option_errors_are_explicit(fp32_bundles):
    _, bundle = fp32_bundles["tiny-phi"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeUnavailable, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
            OnnxRuntimeRuntime(bundle, RuntimeOptions(provider="cuda"))
    with pytest.raises(InputError, match="--provider 'rocm' is not supported"):
        OnnxRuntimeRuntime(bundle, RuntimeOptions(provider="rocm"))
    with pytest.raises(InputError, match="this bundle computes in float32"):
        OnnxRuntimeRuntime(bundle, RuntimeOptions(dtype=Precision.FP16))
    with pytest.raises(InputError, match="is an exported bundle, not a checkpoint: run it with --runtime onnxruntime"):
        TorchRuntime(bundle)


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16])
def test_demo_bundle_on_the_whole_eval_split(precision, fp32_bundles, tmp_path):
    """fp32: answers identical and routing 100 % on all 1,600 questions; fp16: answers ≥ 98 %."""
    from medmoe_edge.cli.verify_cmd import run_verify
    from medmoe_edge.imaging import PreprocessMode

    bundle = fp32_bundles["demo"][1] if precision is Precision.FP32 else tmp_path / "fp16"
    if precision is Precision.FP16:
        export_onnx("demo", bundle, precision)
    rep = run_verify(bundle, reference=None, set_name="eval", data=None, limit=None, provider=None, threads=None, max_new_tokens=32, preprocess=PreprocessMode.PAD)
    m = rep.metrics
    assert len(rep.samples) == 1600
    if precision is Precision.FP32:
        assert m["answer_agreement"] == 1.0 and m["routing_agreement"] == 1.0 and m["token_agreement"] == 1.0
        assert m["logits_max_abs"] <= 1e-4
    else:
        assert m["answer_agreement"] >= 0.98
    assert rep.passed


def test_tensorrt_provider_options_come_from_the_manifest(fp32_bundles, tmp_path, monkeypatch):
    """The TensorRT path cannot run here; its provider options (profiles, fp16, cache) are checked instead."""
    monkeypatch.setenv("MEDMOE_EDGE_TRT_CACHE", str(tmp_path))
    _, bundle = fp32_bundles["demo"]
    rt = OnnxRuntimeRuntime(bundle)
    opts = rt._trt_options("decoder")
    mins = dict(item.split(":") for item in opts["trt_profile_min_shapes"].split(","))
    maxs = dict(item.split(":") for item in opts["trt_profile_max_shapes"].split(","))
    assert mins["inputs_embeds"] == "1x1x256" and maxs["inputs_embeds"] == "4x2048x256"
    assert maxs["past_key_3"] == "4x8x2048x32" and mins["last_index"] == "1"
    assert opts["trt_fp16_enable"] is False and opts["trt_engine_cache_enable"] is True
    assert Path(opts["trt_engine_cache_path"]).parent == tmp_path and Path(opts["trt_engine_cache_path"]).name == rt.manifest.bundle_id
    vis = rt._trt_options("vision")
    assert vis["trt_profile_max_shapes"] == "pixel_values:4x3x64x64"


def test_grouped_query_attention_reads_the_buffer_without_repeating_kv(tmp_path, sample_png):
    """num_kv_heads < num_heads: the export groups queries instead of repeating K/V; logits still match."""
    from dataclasses import replace

    from medmoe_edge.presets import PRESETS
    from medmoe_edge.random_init import write_random_checkpoint

    base = PRESETS[Preset.TINY_STABLELM]
    spec = replace(base, text=replace(base.text, num_kv_heads=2))
    src = write_random_checkpoint(spec, tmp_path / "gqa", seed=1)
    export_onnx(src, tmp_path / "gqa-onnx")
    ref, rt = TorchRuntime(src), OnnxRuntimeRuntime(tmp_path / "gqa-onnx")
    assert rt.kv_shape == (2, 16)
    reqs = _requests(api.Pipeline(ref), sample_png, ["What is shown?", "Is the left lung clear of any opacity?"])
    a, b = ref.prefill(reqs, 4), rt.prefill(reqs, 4)
    assert (a.logits - b.logits).abs().max() <= 1e-4
    for _ in range(3):
        tok = a.logits.argmax(-1)
        a, b = ref.decode(tok), rt.decode(tok)
        assert (a.logits - b.logits).abs().max() <= 1e-4


def test_onnx_takes_one_precision_and_its_own_options(tiny_ckpts, tmp_path):
    from medmoe_edge.export.onnx_export import OnnxExporter
    from medmoe_edge.quant_plan import QuantPlan, QuantRule, QuantSpec
    from medmoe_edge.workflows import export_bundle

    plan = QuantPlan(QuantSpec(Precision.FP32), (QuantRule("layers.*.expert.*", QuantSpec(Precision.FP16)),))
    with pytest.raises(InputError, match=r"the plan gives layers.0.expert.0.fc1 fp16 .*ONNX bundles take one precision for every group"):
        export_bundle("onnx", tiny_ckpts[Preset.TINY_PHI], tmp_path / "p", plan=plan)
    assert not (tmp_path / "p").exists()
    with pytest.raises(InputError, match="--precision and a quantization plan contradict each other"):
        OnnxExporter.request({"--precision": "fp16"}, plan=plan)
    with pytest.raises(InputError, match="plan's default precision q8_0 is not one --format onnx writes"):
        OnnxExporter.request({}, plan=QuantPlan.uniform(Precision.Q8_0))
    with pytest.raises(InputError, match="--max-batch must be at least 1, got 0"):
        OnnxExporter.request({"--max-batch": 0})
    assert OnnxExporter.request({"--precision": "float16"}).precision is Precision.FP16
