"""GGUF export and the patched llama.cpp (medmoe-phi2 / medmoe-stablelm) against the PyTorch reference.

Real GGUF files written with gguf-py, real llama.cpp (llama-cpp-python built with
patches/llamacpp-0.3.36-medmoe.patch by scripts/build_llamacpp.sh, which scripts/test.sh runs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.cli.app import app
from medmoe_edge.errors import CheckpointError
from medmoe_edge.export.gguf_export import export_gguf, read_tensor_types
from medmoe_edge.export.gguf_text import write_text_gguf
from medmoe_edge.presets import DEMO, PRESETS, Preset
from medmoe_edge.tensor_ids import gguf_map
from medmoe_edge.vocab import Precision
from medmoe_edge.runtimes.torch_runtime import TorchRuntime

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: bash scripts/build_llamacpp.sh")
if "+medmoe" not in llama_cpp.__version__:
    pytest.skip("llama-cpp-python is not the patched build: bash scripts/build_llamacpp.sh", allow_module_level=True)

from medmoe_edge.runtimes.llamacpp_runtime import LlamaCppRuntime  # noqa: E402

runner = CliRunner()
IDS = [11, 42, 7, 300, 5, 99, 123, 64, 201, 17, 3, 250]


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, type_k=0, type_v=0, verbose=False, n_threads=2)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _torch_logits(src, ids: list[int]) -> torch.Tensor:
    m = TorchRuntime(src).model
    t = torch.tensor([ids])
    h = m.embed_tokens(t)
    logits, _ = m.forward_embeds(h, torch.arange(len(ids))[None], torch.ones(1, len(ids), dtype=torch.int64), None)
    return logits[0]


def _assert_f32_text_parity(src, tmp_path: Path) -> None:
    """F32 text GGUF vs the reference, teacher-forced on IDS: ≤ 2e-3 (ggml's GELU goes through an fp16 table), same argmax."""
    write_text_gguf(src, tmp_path / "m.gguf", dtype="f32")
    got = torch.from_numpy(_llama_logits(tmp_path / "m.gguf", IDS))
    ref = _torch_logits(src, IDS)
    assert (got - ref).abs().max() <= 2e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("preset", [Preset.TINY_PHI, Preset.TINY_STABLELM], ids=lambda p: p.value)
def test_f32_text_gguf_matches_reference(preset, tiny_ckpts, tmp_path):
    """Text only, F32 weights and KV cache: ≤ 2e-3 (ggml's GELU goes through an fp16 table) and the same argmax."""
    _assert_f32_text_parity(tiny_ckpts[preset], tmp_path)


def test_demo_f32_and_f16_text_gguf(tmp_path):
    ref = _torch_logits("demo", IDS)
    for dtype, tol in (("f32", 2e-3), ("f16", 1e-2)):
        write_text_gguf("demo", tmp_path / f"{dtype}.gguf", dtype=dtype)
        got = torch.from_numpy(_llama_logits(tmp_path / f"{dtype}.gguf", IDS))
        assert (got - ref).abs().max() <= tol, dtype
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    types = {name: t for name, t, _, _ in read_tensor_types(tmp_path / "f16.gguf")}
    # router, norms and biases stay F32 in an F16 file; matrices are F16
    assert types["blk.0.ffn_gate_inp.weight"] == "f32" and types["blk.0.ffn_up_exps.bias"] == "f32"
    assert types["blk.0.ffn_up_exps.weight"] == "f16" and types["blk.1.attn_q.weight"] == "f16"


def test_gguf_tensor_groups():
    """GGUF names ↔ TensorIds through the table (tests/test_tensor_ids.py covers every tensor)."""
    names = ["blk.2.ffn_up_exps.weight", "blk.2.ffn_gate_inp.bias", "blk.2.ffn_down_shexp.weight", "blk.1.ffn_up.weight", "output.weight", "token_embd.weight", "v.blk.0.ln1.bias", "mm.2.weight"]
    m = gguf_map(names, DEMO)
    groups = {n: sorted({str(i.group) for i in m.ids(n)}) for n in names}
    assert groups["blk.2.ffn_up_exps.weight"] == [f"layers.2.expert.{e}" for e in range(4)]  # stacked: one type for all experts of a layer
    assert groups["blk.2.ffn_gate_inp.bias"] == ["layers.2.router"] and groups["blk.2.ffn_down_shexp.weight"] == ["layers.2.meta"]
    assert groups["blk.1.ffn_up.weight"] == ["layers.1.ffn"] and groups["output.weight"] == ["lm_head"] and groups["token_embd.weight"] == ["embed"]
    assert groups["v.blk.0.ln1.bias"] == ["vision"] and groups["mm.2.weight"] == ["projector"]


@pytest.fixture(scope="session")
def gguf_bundles(tiny_ckpts, tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """F32 GGUF bundles of both tiny checkpoints and the demo model: name -> (source, bundle)."""
    root = tmp_path_factory.mktemp("gguf")
    srcs = {"tiny-phi": tiny_ckpts[Preset.TINY_PHI], "tiny-stablelm": tiny_ckpts[Preset.TINY_STABLELM], "demo": "demo"}
    for name, src in srcs.items():
        export_gguf(src, root / name, Precision.FP32)
    return {name: (src, root / name) for name, src in srcs.items()}


def test_gguf_tokenizer_matches_the_checkpoint_tokenizer(gguf_bundles):
    """llama.cpp's own tokenizer (for llama-cli and friends) splits prompts exactly as the HF tokenizer."""
    from medmoe_edge.prompt import build_prompt
    from medmoe_edge.tokenizer import Tokenizer

    texts = [build_prompt("Is there a lesion in the left lung?").replace("<image>\n", ""), "Hello  world\n\n 123 4567 CT/MRI x-ray's", "héllo wörld — ok"]
    for name in ("demo", "tiny-stablelm"):
        _, bundle = gguf_bundles[name]
        tok = Tokenizer.from_dir(bundle)
        llm = llama_cpp.Llama(model_path=str(bundle / "model.gguf"), n_ctx=64, vocab_only=True, verbose=False)
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), (name, text)
        llm.close()


def test_mmproj_image_rows_match_the_reference_encoder(gguf_bundles, sample_png):
    """mtmd's CLIP tower + projector (tanh GELU via an fp16 table) vs encode_images (exact erf GELU)."""
    src, bundle = gguf_bundles["demo"]
    ref, rt = TorchRuntime(src), LlamaCppRuntime(bundle)
    try:
        req, _ = api.Pipeline(ref).prepare(sample_png, "q?")
        with torch.no_grad():
            want = ref.model.encode_images(req.pixel_values)[0]
        got = torch.from_numpy(rt.encode_image(req.pixel_values[0]))
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-2
        assert torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1).min() >= 0.9999
    finally:
        rt.close()


@pytest.mark.parametrize("name", ["demo", "tiny-phi", "tiny-stablelm"])
def test_f32_bundle_with_the_image_matches_the_reference(name, gguf_bundles):
    """Image through mtmd (the projector's exact erf GELU, selected by the mmproj key the patch adds) and
    text through llama.cpp: with an F32 KV cache, logits within 2e-3 of the reference on the export
    check's 16 eval questions; with the default KV type too, every tolerance of that check passes."""
    from gguf import GGUFReader

    from medmoe_edge.export.gguf_mmproj import PROJ_GELU_ERF_KEY
    from medmoe_edge.runtimes.base import KvType, RuntimeOptions
    from medmoe_edge.workflows import verify_bundle

    _, bundle = gguf_bundles[name]
    field = GGUFReader(str(bundle / "mmproj.gguf")).fields[PROJ_GELU_ERF_KEY]
    assert bool(field.parts[field.data[0]][0]) is True
    for kv in (KvType.F32, None):  # F32 KV: nothing rounded; None: the default, as `export` checks
        rep = verify_bundle(bundle, limit=16, options=RuntimeOptions(kv_type=kv)).report
        assert len(rep.samples) == 16 and rep.passed
        if kv is KvType.F32:
            assert rep.metrics["logits_max_abs"] <= 2e-3, rep.metrics
            assert rep.metrics["logits_cosine_min"] >= 0.99999 and rep.metrics["token_agreement"] == 1.0


def test_cli_export_and_run_answer_like_the_reference(tmp_path):
    from pydicom.data import get_testdata_file

    out = tmp_path / "demo-gguf"
    r = runner.invoke(app, ["export", "--format", "gguf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "answer_agreement" in r.output and "FAIL" not in r.output
    ct = get_testdata_file("CT_small.dcm", download=False)
    args = ["run", "--image", ct, "--question", "What modality is this?", "--json", "--max-new-tokens", "8"]
    a = runner.invoke(app, args)
    b = runner.invoke(app, args + ["--runtime", "llamacpp", "--model", str(out)])
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["answer"] == jb["answer"] and ja["token_ids"] == jb["token_ids"]


@pytest.mark.parametrize("rel", ["model.gguf", "mmproj.gguf"])
def test_one_flipped_byte_is_refused(rel, gguf_bundles, sample_png, tmp_path):
    src, bundle = gguf_bundles["tiny-phi"]
    work = tmp_path / "corrupt"
    shutil.copytree(bundle, work)
    p = work / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    r = runner.invoke(app, ["run", "--runtime", "llamacpp", "--model", str(work), "--image", str(sample_png), "--question", "q?"])
    assert r.exit_code == 2 and f"bundle file {rel} does not match its SHA-256" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["verify", str(work), "--reference", str(src)])
    assert r.exit_code == 2 and f"bundle file {rel} does not match its SHA-256" in r.output


def test_quantized_export_reports_types_fallbacks_and_overrides(tiny_ckpts, tmp_path):
    """q4_k_m on a 64-wide tiny model: k-quants need rows of 256, so llama.cpp falls back, and the manifest says so."""
    src = tiny_ckpts[Preset.TINY_PHI]
    m = export_gguf(src, tmp_path / "q4", Precision.Q4_K_M)
    # a quantized bundle's mmproj defaults to f16 (docs/GGUF.md "Load time and memory"); asked for, f32 stays
    assert m.extra["mmproj_dtype"] == "f16"
    assert {t for n, t, _, shape in read_tensor_types(tmp_path / "q4" / "mmproj.gguf") if len(shape) == 2 and n.startswith("mm.")} == {"f16"}
    from medmoe_edge.export.gguf_export import GgufExporter

    assert GgufExporter.request({"--quant": "q4_k_m", "--mmproj-dtype": "f32"}).options["mmproj_dtype"] == "f32"
    assert GgufExporter.request({"--quant": "f16"}).options["mmproj_dtype"] == "f32" and GgufExporter.request({}).options["mmproj_dtype"] == "f32"
    fb = m.extra["fallbacks"]
    assert fb and all(t not in ("q4_k", "q5_k", "q6_k") for t in fb.values())
    types = {n: t for n, t, _, _ in read_tensor_types(tmp_path / "q4" / "model.gguf")}
    assert types["blk.0.ffn_gate_inp.weight"] == "f32" and types["blk.0.ffn_up_exps.bias"] == "f32"
    r = runner.invoke(app, ["export", "--format", "gguf", "--quant", "q4_k_m", "--model", str(src), "--out", str(tmp_path / "cli"), "--no-verify"])
    assert r.exit_code == 0 and "not q4_k_m" in r.output, r.output
    # per-tensor overrides (the hook for per-expert precision plans)
    m = export_gguf("demo", tmp_path / "ov", Precision.Q4_K_M, overrides={r"blk\.0\.ffn_(up|down)_exps\.weight": "q8_0"})
    types = {n: t for n, t, _, _ in read_tensor_types(tmp_path / "ov" / "model.gguf")}
    assert types["blk.0.ffn_up_exps.weight"] == "q8_0" and types["blk.2.ffn_up_exps.weight"] in ("q4_k", "q6_k")
    assert m.extra["fallbacks"] == {}  # the demo's 256/512 rows fit every k-quant; overridden tensors got their type
    # one group per expert; a stacked tensor's type is every expert's (GGUF types are per layer x projection)
    for e in range(4):
        assert {g.precision for g in m.tensor_groups if g.name == f"layers.0.expert.{e}" and g.precision is not Precision.FP32} == {Precision.Q8_0}
    assert m.precision is Precision.Q4_K_M and m.extra["tensor_overrides"] == {r"blk\.0\.ffn_(up|down)_exps\.weight": "q8_0"}
    # the same from the CLI, and the overrides' errors
    r = runner.invoke(app, ["export", "--format", "gguf", "--quant", "q4_k_m", "--tensor-type", r"blk\.2\.ffn_down_exps\.weight=q6_k", "--out", str(tmp_path / "cli-ov"), "--no-verify"])
    assert r.exit_code == 0, r.output
    assert {n: t for n, t, _, _ in read_tensor_types(tmp_path / "cli-ov" / "model.gguf")}["blk.2.ffn_down_exps.weight"] == "q6_k"
    for args, msg in (
        (["--quant", "f32", "--tensor-type", "blk=q8_0"], "tensor type overrides need a quantized --quant"),
        (["--quant", "q8_0", "--tensor-type", "blk=q9_9"], "tensor type 'q9_9' for 'blk' is not a ggml type"),
        (["--quant", "q8_0", "--tensor-type", "blk"], "--tensor-type 'blk' is not REGEX=TYPE"),
        (["--quant", "q8_0", "--tensor-type", "blk[=q8_0"], "is not a valid regular expression"),
    ):
        r = runner.invoke(app, ["export", "--format", "gguf", "--model", str(src), "--out", str(tmp_path / "bad"), *args])
        assert r.exit_code == 2 and msg in r.output and not (tmp_path / "bad").exists(), r.output


def test_bad_options_are_one_line_errors(gguf_bundles, tiny_ckpts, tmp_path):
    src = tiny_ckpts[Preset.TINY_PHI]
    r = runner.invoke(app, ["export", "--format", "gguf", "--quant", "q3_xs", "--model", str(src), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--quant 'q3_xs' is not supported" in r.output and not (tmp_path / "a").exists()
    r = runner.invoke(app, ["export", "--format", "gguf", "--precision", "fp16", "--model", str(src), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--precision does not apply to --format gguf (it applies to --format onnx / tensorrt)" in r.output
    r = runner.invoke(app, ["export", "--format", "onnx", "--mmproj-dtype", "f16", "--model", str(src), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--mmproj-dtype does not apply to --format onnx (it applies to --format gguf)" in r.output and not (tmp_path / "c").exists()
    r = runner.invoke(app, ["export", "--format", "gguf", "--mmproj-dtype", "q8_0", "--model", str(src), "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--mmproj-dtype 'q8_0' is not f32 or f16" in r.output and not (tmp_path / "d").exists()
    _, bundle = gguf_bundles["tiny-phi"]
    from medmoe_edge.errors import InputError
    from medmoe_edge.runtimes.base import RuntimeOptions

    if not llama_cpp.llama_supports_gpu_offload():
        with pytest.raises(InputError, match="built without GPU support.*build_llamacpp.sh cuda"):
            LlamaCppRuntime(bundle, RuntimeOptions(device="cuda"))
    with pytest.raises(CheckpointError, match="is a bundle of kind gguf, not onnx"):
        from medmoe_edge.runtimes.onnxruntime_runtime import OnnxRuntimeRuntime

        OnnxRuntimeRuntime(bundle)


def test_unpatched_library_is_refused_with_the_build_command():
    """A llama.cpp library without the medmoe arch names (here: the patched build's own ggml, which has none)."""
    from medmoe_edge import llamacpp_lib as lr

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = next(p for p in sorted(lib_dir.iterdir()) if p.name.startswith("libggml-base"))
    ok, _ = lr.library_has_archs(str(ggml))
    assert not ok
    msg = lr.unpatched_message("0.3.36")
    assert "lacks the Med-MoE architectures" in msg and "bash scripts/build_llamacpp.sh" in msg
    assert lr.library_has_archs(lr.loaded_library_path())[0]


@pytest.mark.parametrize("quant,min_answers", [(Precision.FP32, 0.95), (Precision.Q8_0, 0.95), (Precision.Q4_K_M, 0.85)])
def test_demo_gguf_on_the_whole_eval_split(quant, min_answers, gguf_bundles, tmp_path):
    """Image through mtmd + text through llama.cpp vs the reference on all 1,600 eval questions."""
    from medmoe_edge.cli.verify_cmd import run_verify
    from medmoe_edge.imaging import PreprocessMode

    bundle = gguf_bundles["demo"][1] if quant is Precision.FP32 else tmp_path / quant.value
    if quant is not Precision.FP32:
        export_gguf("demo", bundle, quant)
    rep = run_verify(bundle, reference=None, set_name="eval", data=None, limit=None, provider=None, threads=None, max_new_tokens=32, preprocess=PreprocessMode.PAD)
    m = rep.metrics
    assert len(rep.samples) == 1600
    assert m["answer_agreement"] >= min_answers and m["routing_agreement"] is None
    assert rep.passed


def _build_script_copy(tmp_path: Path, patch_text: str) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "patches").mkdir()
    shutil.copy(Path(__file__).parents[1] / "scripts" / "build_llamacpp.sh", root / "scripts")
    (root / "patches" / "llamacpp-0.3.36-medmoe.patch").write_text(patch_text)
    return root / "scripts" / "build_llamacpp.sh"


def test_build_script_refuses_a_patch_that_does_not_apply(tmp_path):
    import os
    import subprocess
    import sys

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medmoe-edge" / "llama_cpp_python-0.3.36.tar.gz"
    if not cache.is_file():
        pytest.skip("the pinned sdist is not cached (scripts/build_llamacpp.sh downloads it)")
    patch = (Path(__file__).parents[1] / "patches" / "llamacpp-0.3.36-medmoe.patch").read_text()
    # change a context line, as an upstream edit of llama-arch.cpp would
    broken = patch.replace('     { LLM_ARCH_POCKETTTS,        "pockettts"        },', '     { LLM_ARCH_POCKETTTS,        "pocket-tts"       },', 1)
    assert broken != patch
    script = _build_script_copy(tmp_path, broken)
    env = dict(os.environ, PYTHON=sys.executable, REBUILD="1")
    r = subprocess.run(["bash", str(script), "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert "llamacpp-0.3.36-medmoe.patch does not apply to llama-cpp-python 0.3.36" in r.stderr
    r = subprocess.run(["bash", str(script), "rocm"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "unknown target 'rocm': use cpu, native, cuda or jetson" in r.stderr


@pytest.mark.parametrize("preset", [Preset.TINY_PHI, Preset.TINY_STABLELM], ids=lambda p: p.value)
def test_top2_checkpoint_matches_reference(preset, tmp_path):
    """k = 2: llama.cpp's top-2 with weights renormalised over the pair = the reference's deterministic top-2 (§2.3.4)."""
    from dataclasses import replace

    from medmoe_edge.random_init import write_random_checkpoint

    spec = PRESETS[preset]
    src = write_random_checkpoint(replace(spec, moe=replace(spec.moe, top_k=2)), tmp_path / "ckpt", seed=1)
    _assert_f32_text_parity(src, tmp_path)


def test_residual_moe_is_refused_with_the_alternative(tmp_path):
    from dataclasses import replace

    from medmoe_edge.errors import UnsupportedCheckpoint
    from medmoe_edge.random_init import write_random_checkpoint

    spec = PRESETS[Preset.TINY_PHI]
    src = write_random_checkpoint(replace(spec, moe=replace(spec.moe, use_residual=True)), tmp_path / "ckpt", seed=0)
    with pytest.raises(UnsupportedCheckpoint, match="use_residual=True.*use the torch or ONNX runtimes"):
        export_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_checkpoint_exports_exact_weights_with_one_load(tmp_path):
    """A bf16 release is loaded once in bf16 (exact for the LM); the tower is read again in fp32 from its own files."""
    import gguf

    from medmoe_edge.checkpoint import load_model
    from medmoe_edge.random_init import write_random_checkpoint

    src = write_random_checkpoint(PRESETS[Preset.TINY_STABLELM], tmp_path / "ckpt", seed=3, dtype="bfloat16")
    export_gguf(src, tmp_path / "out")
    ref = load_model(src)  # fp32 everywhere
    mm = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "out" / "mmproj.gguf")).tensors}
    tower_q = ref.model.vision.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(mm["v.blk.0.attn_q.weight"], tower_q)
    txt = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "out" / "model.gguf")).tensors}
    assert np.array_equal(txt["blk.1.attn_q.weight"], ref.model.lm.model.layers[1].self_attn.q_proj.weight.detach().numpy())


def test_precision_plans_become_per_tensor_types(tmp_path):
    """A plan's rules over TensorIds: float types written directly, quantized ones as llama.cpp overrides;
    what GGUF cannot store (experts of one stack apart, quantized rules in an f32 file) is refused before writing."""
    from medmoe_edge.errors import InputError
    from medmoe_edge.quant_plan import QuantPlan, QuantRule, QuantSpec
    from medmoe_edge.workflows import export_bundle

    def plan(default, *rules):
        return QuantPlan(QuantSpec(default), tuple(QuantRule(p, QuantSpec(q)) for p, q in rules))

    def types(bundle):
        return {n: t for n, t, _, _ in read_tensor_types(bundle / "model.gguf")}

    m = export_bundle("gguf", "demo", tmp_path / "q", plan=plan(Precision.Q4_K_M, ("layers.0.expert.*", Precision.Q8_0), ("layers.2.meta", Precision.FP16)))
    t = types(tmp_path / "q")
    assert t["blk.0.ffn_up_exps.weight"] == t["blk.0.ffn_down_exps.weight"] == "q8_0" and t["blk.2.ffn_up_shexp.weight"] == "f16"
    assert t["blk.2.ffn_up_exps.weight"] in ("q4_k", "q6_k") and t["blk.0.ffn_gate_inp.weight"] == "f32" and m.extra["fallbacks"] == {}
    assert m.plan.rules and {g.precision for g in m.tensor_groups if g.name == "layers.0.expert.3"} == {Precision.Q8_0, Precision.FP32}  # + F32 biases
    m = export_bundle("gguf", "demo", tmp_path / "f16", plan=plan(Precision.FP16, ("layers.*.expert.*.fc2", Precision.FP32)))
    t = types(tmp_path / "f16")
    assert t["blk.0.ffn_down_exps.weight"] == "f32" and t["blk.0.ffn_up_exps.weight"] == "f16" and t["blk.1.ffn_down.weight"] == "f16"
    for p, msg in (
        (plan(Precision.Q8_0, ("layers.0.expert.1", Precision.Q4_0)), "the plan gives the experts of layer 0 q4_0, q8_0 for blk.0.ffn_up_exps.weight"),
        (plan(Precision.FP32, ("layers.*.meta", Precision.Q8_0)), "per-tensor quantized types need a quantized default"),
        (plan(Precision.Q8_0, ("lm_head", Precision.Q4_K_M)), "q4_k_m, which is not a ggml tensor type"),
        (plan(Precision.Q8_0, ("vision", Precision.Q8_0)), "written without llama.cpp, in f32 or f16"),
    ):
        with pytest.raises(InputError, match=msg):
            export_bundle("gguf", "demo", tmp_path / "bad", plan=p)
        assert not (tmp_path / "bad").exists()
