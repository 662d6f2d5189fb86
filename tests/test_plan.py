"""`medmoe-edge plan`: device profiles and the itemised memory plan, checked against a hand calculation.

The two released variants are planned from real-dimension config files only (config.json and the
CLIP tower's config.json, no weights), and every candidate's total is recomputed here from the
parameter counts of spec §6 and the formulas written out below.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmoe_edge.cli.app import app
from medmoe_edge.devices import PROFILES, FigureKind, MemoryKind, get_profile, match_profile
from medmoe_edge.errors import InputError
from medmoe_edge.hfconfig import text_config_dict, vision_config_dict
from medmoe_edge.planning import CUDA_CONTEXT_GIB, DECODE_EFFICIENCY, MARGIN, PROCESS_BASE_GIB, PROMPT_TOKENS, RUNTIME_LIBRARY_GIB, model_sizes, plan, resolve_model
from medmoe_edge.presets import PRESETS, Preset
from medmoe_edge.vocab import DeviceKind, Precision

GIB = 2**30

# spec §6 (../shared/reference/medmoe-spec.md): LLM total, activated per token (k=1 + meta),
# embedding table, CLIP parameters used (23 of 24 layers, no post-LN), projector; and the dimensions
HAND = {
    Preset.PHI: dict(total=6_136_058_944, activated=3_618_862_144, embed=51200 * 2560, vision=290_909_184, projector=9_180_160, layers=32, kv_heads=32, head_dim=80, hidden=2560, ffn=10240, heads=32, vocab=51200),
    Preset.STABLELM: dict(total=3_305_558_064, activated=2_059_849_776, embed=100352 * 2048, vision=290_909_184, projector=6_295_552, layers=24, kv_heads=32, head_dim=64, hidden=2048, ffn=5632, heads=32, vocab=100352),
}
CLIP = dict(rows=577, hidden=1024, ffn=4096, heads=16)


def write_config_only(preset: Preset, out):
    """A checkpoint directory with the configs of a preset and no weights."""
    spec = PRESETS[preset]
    out.mkdir()
    cfg = text_config_dict(spec.text, spec.moe, mm_image_tower="clip-vision", mm_hidden_size=spec.mm_hidden_size, dtype="bfloat16", eos_id=0, pad_id=0)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "clip-vision").mkdir()
    (out / "clip-vision" / "config.json").write_text(json.dumps(vision_config_dict(spec.vision)))
    return out


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {p: write_config_only(p, root / p.value) for p in (Preset.PHI, Preset.STABLELM)}


def hand_total(h: dict, runtime: str, precision: Precision, profile, context: int) -> float:
    """The itemised total of planning.py's docstring, written out from the spec's numbers."""
    bits = precision.bits
    gguf = runtime == "llamacpp"
    vision_bits = (32 if precision is Precision.FP32 else 16) if gguf else bits
    kv_bytes = 2 if gguf else bits / 8
    act = 4 if gguf else bits / 8
    weights = h["total"] * bits / 8
    vision = (h["vision"] + h["projector"]) * vision_bits / 8
    kv = 2 * h["layers"] * h["kv_heads"] * h["head_dim"] * context * kv_bytes
    p = 576 + PROMPT_TOKENS
    logits = p * h["vocab"] * (4 + act) if runtime == "torch" else h["vocab"] * 4
    llm_act = p * (4 * h["hidden"] + 2 * h["ffn"]) * act + h["heads"] * p * p * 4 + logits
    vis_act = CLIP["rows"] * (4 * CLIP["hidden"] + 2 * CLIP["ffn"]) * (4 if gguf else vision_bits / 8) + CLIP["heads"] * CLIP["rows"] ** 2 * 4
    if profile.memory_kind is MemoryKind.DISCRETE:
        runtime_mem = CUDA_CONTEXT_GIB[MemoryKind.DISCRETE] * GIB
    else:
        runtime_mem = (PROCESS_BASE_GIB + RUNTIME_LIBRARY_GIB[runtime] + (CUDA_CONTEXT_GIB[profile.memory_kind] if profile.device_kind is DeviceKind.CUDA else 0)) * GIB
    return weights + vision + kv + llm_act + vis_act + runtime_mem


@pytest.mark.parametrize("preset", [Preset.PHI, Preset.STABLELM])
def test_counts_from_config_alone_are_those_of_spec_section_6(config_dirs, preset):
    _label, spec, is_preset = resolve_model(str(config_dirs[preset]))
    assert not is_preset and spec == PRESETS[preset]
    s, h = model_sizes(spec), HAND[preset]
    assert (s.counts.llm_total, s.counts.llm_activated, s.embed, s.counts.vision_used, s.counts.projector) == (h["total"], h["activated"], h["embed"], h["vision"], h["projector"])


@pytest.mark.parametrize("preset", [Preset.PHI, Preset.STABLELM])
@pytest.mark.parametrize("device", list(PROFILES))
def test_plan_total_matches_the_hand_calculation(config_dirs, preset, device):
    label, spec, _ = resolve_model(str(config_dirs[preset]))
    profile = get_profile(device)
    p = plan(spec, profile, model=label, context=1536)
    assert p.candidates, "every profile runs at least llama.cpp"
    for c in p.candidates:
        names = [i.name for i in c.items]
        assert names == ["LLM weights", "vision tower + projector", "KV cache", "activations", "runtime"]
        expected = hand_total(HAND[preset], c.runtime, c.precision, profile, 1536)
        assert c.total_bytes == pytest.approx(expected, rel=0.01), c.label
        usable = (profile.memory.value - profile.os_reserve.value) * GIB
        assert c.fits == (c.total_bytes * (1 + MARGIN) <= usable)
    if p.chosen is not None:
        assert p.chosen.fits
        assert p.chosen.tier == min(c.tier for c in p.candidates if c.fits)
        assert "fits" in p.summary and p.commands()
    else:
        assert p.summary.startswith(f"nothing fits {device}")


def test_decode_estimate_is_the_roofline_times_the_measured_efficiency():
    profile = get_profile("orin-nano-8gb")
    h = HAND[Preset.STABLELM]
    p = plan(PRESETS[Preset.STABLELM], profile, context=2048, runtimes=("llamacpp",), precisions=(Precision.Q8_0,))
    (c,) = p.candidates
    kv = 2 * 24 * 32 * 64 * 2048 * 2
    per_token = (h["activated"] - h["embed"]) * 8.5 / 8 + kv  # routed + meta expert only, no embedding table
    assert c.decode_tok_s == pytest.approx(DECODE_EFFICIENCY[("llamacpp", Precision.Q8_0)] * 68e9 / per_token, rel=1e-6)
    assert 0 < c.ttft_s and c.ttft_s == pytest.approx(c.ttft_vision_s + c.ttft_prefill_s)


def test_big_devices_take_a_full_precision_and_small_ones_a_quantised_one():
    phi, stablelm = PRESETS[Preset.PHI], PRESETS[Preset.STABLELM]
    for device in ("agx-orin-64gb", "rtx-4090"):
        assert plan(phi, get_profile(device)).chosen.precision in (Precision.FP16, Precision.BF16, Precision.FP32)
    small = plan(stablelm, get_profile("orin-nano-8gb")).chosen
    assert small is not None and not small.precision.is_float


def test_fp32_phi_is_refused_on_an_8gb_orin_nano_with_the_reason(config_dirs):
    r = CliRunner().invoke(app, ["plan", "--model", str(config_dirs[Preset.PHI]), "--device", "orin-nano-8gb", "--precision", "fp32"], env={"COLUMNS": "200"})
    assert r.exit_code == 1, r.output
    assert "nothing fits orin-nano-8gb" in r.output and "does not fit" in r.output and "usable" in r.output
    r = CliRunner().invoke(app, ["plan", "--model", "phi", "--device", "orin-nano-8gb", "--precision", "fp32", "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["fits"] is False and d["chosen"] is None and d["candidates"]
    assert all(c["precision"] == "fp32" and not c["fits"] for c in d["candidates"])
    smallest = min(d["candidates"], key=lambda c: c["total_bytes"])
    assert smallest["total_gib"] > 22  # 6.14 B parameters × 4 bytes = 22.9 GiB of weights alone
    assert "does not fit" in d["summary"] and "8 GiB" in d["summary"] and smallest["reason"] in d["summary"]


def test_plan_json_itemises_the_chosen_candidate():
    r = CliRunner().invoke(app, ["plan", "--model", "stablelm", "--device", "rtx-3060-12gb", "--context", "1024", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    ch = d["chosen"]
    assert d["fits"] and d["context"] == 1024 and ch["fits"]
    assert sum(i["bytes"] for i in ch["memory"]) == ch["total_bytes"]
    assert {i["name"] for i in ch["memory"]} == {"LLM weights", "vision tower + projector", "KV cache", "activations", "runtime"}
    assert ch["host_ram_gib"] and ch["estimated_decode_tok_s"] > 0 and d["commands"]
    assert d["device"]["bandwidth_gbs"]["value"] == 360 and d["device"]["bandwidth_gbs"]["source"]


def test_plan_table_on_the_demo_model():
    r = CliRunner().invoke(app, ["plan", "--device", "cpu-x86"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "chosen" in r.output and "KV cache" in r.output and "medmoe-edge" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--device", "jetson-nano"], "is not a device profile: use one of orin-nano-8gb"),
        ([], "--device is required: use one of"),
        (["--device", "cpu-x86", "--context", "100000"], "--context 100000 is outside"),
        (["--device", "cpu-x86", "--model", "phi", "--context", "100"], "--context 100 is outside 577..2048"),
        (["--device", "cpu-x86", "--precision", "q3"], "--precision 'q3' is not supported here"),
        (["--device", "cpu-x86", "--runtime", "mlx"], "--runtime 'mlx' is not one plan knows"),
        (["--device", "cpu-x86", "--model", "./no-such-checkpoint"], "or name a preset: phi, stablelm"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(args, message):
    r = CliRunner().invoke(app, ["plan", *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.strip().startswith("error:")
    assert len(r.output.strip().splitlines()) == 1
    assert message in r.output


def test_bad_input_with_json_is_also_a_json_error():
    r = CliRunner().invoke(app, ["plan", "--device", "nowhere", "--json"])
    assert r.exit_code == 2
    d = json.loads(r.stdout)
    assert d["kind"] == "InputError" and "is not a device profile" in d["error"]
    assert "is not a device profile" in r.stderr


def test_profiles_are_data_with_a_source_for_every_figure():
    assert set(PROFILES) == {"orin-nano-8gb", "orin-nano-super", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb", "xavier-nx", "rtx-3060-12gb", "rtx-4090", "cpu-x86", "raspberry-pi-5"}
    for p in PROFILES.values():
        figures = [p.memory, p.bandwidth, p.fp32_tflops, p.os_reserve] + ([p.fp16_tflops] if p.fp16_tflops else [])
        assert all(f.value > 0 and f.source and isinstance(f.kind, FigureKind) for f in figures), p.name
        assert (p.compute_capability is None) == (p.device_kind is DeviceKind.CPU)
        assert "llamacpp" in p.runtimes and all(isinstance(x, Precision) for x in p.precisions)
        json.dumps(p.to_json())
    assert PROFILES["orin-nano-8gb"].bandwidth.value == 68 and "datasheet" in PROFILES["orin-nano-8gb"].bandwidth.source
    assert PROFILES["cpu-x86"].bandwidth.kind is FigureKind.MEASURED
    assert Precision.BF16 not in PROFILES["xavier-nx"].precisions  # SM72 has no bf16
    with pytest.raises(InputError, match="use one of"):
        get_profile("tx2")


def test_doctor_findings_map_to_profiles():
    assert match_profile(jetson_model="NVIDIA Jetson Orin Nano Developer Kit", memory_gib=7.4) == "orin-nano-8gb"
    assert match_profile(jetson_model="NVIDIA Jetson AGX Orin Developer Kit", memory_gib=61.4) == "agx-orin-64gb"
    assert match_profile(jetson_model="NVIDIA Jetson Xavier NX Developer Kit") == "xavier-nx"
    assert match_profile(gpu_name="NVIDIA GeForce RTX 4090", machine="x86_64") == "rtx-4090"
    assert match_profile(board_model="Raspberry Pi 5 Model B Rev 1.0", machine="aarch64") == "raspberry-pi-5"
    assert match_profile(machine="x86_64") == "cpu-x86"
    assert match_profile(gpu_name="NVIDIA H200", machine="x86_64") is None
