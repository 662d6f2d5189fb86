"""The CLI end to end through Typer's runner: exit codes, JSON output, one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmoe_edge.cli.app import app
from medmoe_edge.presets import Preset

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_run_json_has_answer_tokens_timings_and_experts(tiny_ckpts, sample_png):
    r = _run("run", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--image", str(sample_png), "--question", "Is there a lesion?", "--max-new-tokens", "5", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert len(obj["token_ids"]) == 5 and isinstance(obj["answer"], str)
    assert obj["routing"]["moe_layers"] == [0, 2]
    assert len(obj["routing"]["generated"]) == 5 and set(obj["routing"]["generated"][0]) == {"0", "2"}
    assert obj["timings"]["time_to_first_token_s"] > 0
    assert obj["image"] == {"format": "PNG", "width": 48, "height": 40, "frame": None, "frames": 1}
    assert obj["preprocess"] == "pad"


def test_run_streams_text(tiny_ckpts, sample_png):
    args = ["run", "--model", str(tiny_ckpts[Preset.TINY_STABLELM]), "--image", str(sample_png), "--question", "Which organ?", "--max-new-tokens", "4"]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    j = json.loads(_run(*args, "--json").stdout)
    assert r.stdout.strip() == j["answer"]


def test_crop_and_pad_differ_on_non_square_image(tiny_ckpts, sample_png):
    base = ["run", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--image", str(sample_png), "--question", "Which organ?", "--max-new-tokens", "1", "--json"]
    pad = json.loads(_run(*base).stdout)
    crop = json.loads(_run(*base, "--preprocess", "crop").stdout)
    assert pad["routing"]["prompt"] != crop["routing"]["prompt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png"], "image file not found"),
        (["--runtime", "nope"], "unknown runtime 'nope'; installed runtimes: llamacpp, onnxruntime, tensorrt, torch"),
        (["--temperature", "-2"], "--temperature must be in"),
        (["--device", "cuda:7"], "--device"),
        (["--question", "   "], "the question is empty"),
    ],
)
def test_run_bad_input_is_one_line_error(tiny_ckpts, sample_png, args, message):
    base = {"--model": str(tiny_ckpts[Preset.TINY_PHI]), "--image": str(sample_png), "--question": "Is it normal?"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = _run("run", *[x for kv in base.items() for x in kv])
    assert r.exit_code == 2
    assert message in r.stderr
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) <= 2  # one logical line (rich may wrap)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["quantize", "--format", "onnx", "--out", "x"], "error: Missing option '--stats': Statistics directory written by `medmoe-edge calibrate`"),
        (["run", "--image"], "error: Option '--image' requires an argument (see `medmoe-edge run --help`)"),
        (["plan", "show", "--bogus"], "error: No such option: --bogus (see `medmoe-edge plan show --help`)"),
        (["eval", "--limit", "many"], "error: Invalid value for '--limit'"),
        (["exprot"], "error: No such command 'exprot'"),
    ],
)
def test_usage_errors_are_one_line_naming_the_help(args, line):
    """click's own parse errors follow the same contract as ours: one line, exit 2, no usage block."""
    r = _run(*args)
    assert r.exit_code == 2
    assert r.stderr.startswith(line), r.stderr
    assert "Usage:" not in r.output and len(r.stderr.strip().splitlines()) == 1


def test_no_arguments_still_print_the_help():
    r = _run()
    assert "Usage:" in r.output and "quantize" in r.output


def test_info_json(tiny_ckpts):
    r = _run("info", str(tiny_ckpts[Preset.TINY_STABLELM]), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["variant"] == "stablelm" and d["generation"] == "medmoe"
    assert d["moe"] == {"layers": [0, 2], "experts": 4, "top_k": 1, "meta_expert": True, "use_residual": False}
    # 3 of 4 routed experts are skipped per token in each of the 2 MoE layers: 3·2·(3·64·128).
    assert d["parameters"]["llm_total"] - d["parameters"]["llm_activated_per_token"] == 3 * 2 * 3 * 64 * 128


def test_init_random_and_info_table(tmp_path):
    out = tmp_path / "ck"
    r = _run("init-random", "--preset", "tiny-phi", "--out", str(out), "--seed", "7")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").is_file() and (out / "clip-vision" / "config.json").is_file()
    r = _run("info", str(out))
    assert r.exit_code == 0 and "top-1 + meta expert" in r.stdout
    r = _run("init-random", "--preset", "tiny-phi", "--out", str(out))
    assert r.exit_code == 2 and "already exists and is not empty" in r.stderr


def test_runtimes_lists_torch():
    r = _run("runtimes", "--json")
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["torch"]["available"] is True and rows["torch"]["loads"] == "checkpoint"
