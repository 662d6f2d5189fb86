"""Deployment hardening: every failure a one-line error, checks before the model loads, honest help and JSON."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.cli.app import app
from medmoe_edge.errors import InputError
from medmoe_edge.presets import Preset

runner = CliRunner()


def _one_line_error(r, code: int = 2) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), r.stderr
    return " ".join(lines)


def _writers(tiny_ckpts, out: str) -> dict[str, list[str]]:
    ckpt = str(tiny_ckpts[Preset.TINY_PHI])
    return {
        "export": ["export", "--format", "onnx", "--model", ckpt, "--out", out, "--no-verify"],
        "make-data": ["make-data", "--out", out, "--train-per-domain", "1", "--calibration-per-domain", "1", "--eval-per-domain", "1", "--size", "32"],
        "init-random": ["init-random", "--preset", "tiny-phi", "--out", out],
        "eval": ["eval", "--model", ckpt, "--limit", "1", "--out", out],
        "trace": ["trace", "--model", ckpt, "--limit", "1", "--out", out],
        "train-demo": ["train-demo", "--data", ckpt, "--out", out],
    }


@pytest.mark.parametrize("case", ["file-in-the-way", "under-a-file", "unwritable-parent", "non-empty"])
@pytest.mark.parametrize("command", ["export", "make-data", "init-random", "eval", "trace", "train-demo"])
def test_every_writer_refuses_an_unwritable_output_path_before_any_work(command, case, tiny_ckpts, tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    out = {"file-in-the-way": blocker, "under-a-file": blocker / "sub", "unwritable-parent": Path("/proc/medmoe-edge-test/out"), "non-empty": full}[case]
    # no model is loaded, no data generated: the check comes first
    for where in ("medmoe_edge.workflows.load", "medmoe_edge.cli.eval_cmd.load"):
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("the model was loaded before the output path was checked"))
    before = sorted(p.name for p in tmp_path.iterdir())
    r = runner.invoke(app, _writers(tiny_ckpts, str(out))[command])
    msg = _one_line_error(r)
    assert str(out) in msg or str(blocker) in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    assert blocker.read_text() == "x" and (full / "keep.txt").read_text() == "mine"


def test_an_os_error_during_a_command_is_one_line_with_the_fix(tiny_ckpts, tmp_path, monkeypatch):
    import errno

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "model.safetensors"))

    monkeypatch.setattr("medmoe_edge.random_init.write_checkpoint", full_disk)
    r = runner.invoke(app, ["init-random", "--preset", "tiny-phi", "--out", str(tmp_path / "x")])
    msg = _one_line_error(r)
    assert "No space left on device" in msg and "free space or choose another location" in msg
    assert not (tmp_path / "x").exists()


def test_json_errors_are_json_objects_on_stdout(tmp_path):
    r = runner.invoke(app, ["run", "--image", str(tmp_path / "nope.png"), "--question", "q", "--json"])
    assert r.exit_code == 2
    obj = json.loads(r.stdout)
    assert obj["kind"] == "ImageError" and "not found" in obj["error"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "/nope/scan.png", "--question", "q"], "image file not found"),
        (["--image", "IMG", "--question", ""], "the question is empty"),
        (["--image", "IMG", "--question", "q", "--frame", "2"], "frame 2 is out of range"),
        (["--image", "IMG", "--question", "q", "--dtype", "int3"], "--dtype 'int3' is not supported"),
        (["--image", "IMG", "--question", "q", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_run_checks_inputs_before_the_model_loads(args, message, sample_png, monkeypatch):
    monkeypatch.setattr("medmoe_edge.cli.run_cmd.load", lambda *a, **k: pytest.fail("the model was loaded before the inputs were checked"))
    r = runner.invoke(app, ["run", *[str(sample_png) if a == "IMG" else a for a in args]])
    assert message in _one_line_error(r)


def test_help_keeps_its_defaults_and_flags_and_there_is_a_version():
    r = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert r.exit_code == 0
    assert "[default: the middle DICOM frame, else 0]" in r.stdout and "[default: the usable cores minus the other runnable tasks, at least 1]" in r.stdout
    assert "<bool>" not in r.stdout and "--json " in r.stdout
    e = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    assert "Maximum tokens per answer." in e.stdout and "--threads" in e.stdout and "--device" in e.stdout
    v = runner.invoke(app, ["--version"])
    assert v.exit_code == 0 and v.stdout.startswith("medmoe-edge ")


def test_run_json_reports_load_time_threads_memory_and_no_rate_over_one_token(tiny_ckpts, sample_png):
    r = runner.invoke(app, ["run", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--image", str(sample_png), "--question", "q", "--max-new-tokens", "2", "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    t = obj["timings"]
    assert t["load_s"] > 0 and t["threads"] == 1 and obj["memory"]["peak_rss_mb"] > 50
    assert t["decode_tokens"] <= 1 and t["decode_tokens_per_s"] is None


def test_run_peak_rss_is_its_own_not_its_parents():
    # Linux carries ru_maxrss across exec: `run` started by a 1.5 GB parent once reported >= 1.5 GB.
    import subprocess
    import sys

    ballast = b"\x01" * (1536 * 2**20)  # touched pages: the parent's RSS really is 1.5 GB
    code = "from medmoe_edge.cli.run_cmd import peak_rss_mb; print(peak_rss_mb())"
    peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert len(ballast) and 10 < peak < 1024, peak


def test_eval_takes_the_runtime_options_and_checks_them_before_loading(monkeypatch):
    monkeypatch.setattr("medmoe_edge.cli.eval_cmd.load", lambda *a, **k: pytest.fail("loaded"))
    assert "--dtype 'fp8' is not supported" in _one_line_error(runner.invoke(app, ["eval", "--limit", "1", "--dtype", "fp8"]))
    monkeypatch.undo()
    r = runner.invoke(app, ["eval", "--limit", "1", "--provider", "cuda"])
    assert "--provider cuda does not apply to the torch runtime" in _one_line_error(r)


def test_eval_out_refuses_a_non_empty_directory_and_writes_shareable_files(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "mine.txt").write_text("keep")
    r = runner.invoke(app, ["eval", "--limit", "2", "--out", str(tmp_path / "old")])
    assert "not empty" in _one_line_error(r) and (tmp_path / "old" / "mine.txt").read_text() == "keep"
    old = os.umask(0o022)
    try:
        r = runner.invoke(app, ["eval", "--limit", "2", "--out", str(tmp_path / "new"), "--json"])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    for name in ("predictions.jsonl", "summary.json", "routing.png"):
        assert stat.S_IMODE((tmp_path / "new" / name).stat().st_mode) == 0o644
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    prov = summary["provenance"]
    assert prov["runtime"] == "torch" and prov["precision"] == "fp32" and len(prov["data_set"]["sha256"]) == 64
    assert len(prov["model"]["sha256"]) == 64 and "torch" in prov["libraries"]
    assert json.loads(r.stdout)["provenance"] == prov


def test_checkpoint_given_where_a_bundle_is_expected_is_named(tiny_ckpts):
    ckpt = str(tiny_ckpts[Preset.TINY_PHI])
    for args in (["verify", ckpt], ["run", "--runtime", "onnxruntime", "--model", ckpt, "--image", "x.png", "--question", "q"]):
        r = runner.invoke(app, args)
        if args[0] == "run" and "image file not found" in r.output:
            continue  # run checks its image before it loads anything
        assert "is a checkpoint directory, not an exported bundle: run it with --runtime torch" in _one_line_error(r)


def test_api_errors_do_not_name_cli_flags(tiny_ckpts, sample_png):
    from PIL import Image

    with api.load(tiny_ckpts[Preset.TINY_PHI]) as pipe:
        with pytest.raises(InputError) as e:
            pipe.answer(sample_png, "")
        assert "--" not in str(e.value)
        a = pipe.answer(Image.open(sample_png), "Is it normal?")
        b = pipe.answer(sample_png, "Is it normal?")
    assert a.token_ids == b.token_ids


def test_a_check_that_did_not_run_reads_not_checked():
    from medmoe_edge.verify import TOLERANCES, SampleResult, VerifyReport
    from medmoe_edge.vocab import ArtifactKind, Precision

    rep = VerifyReport(TOLERANCES[(ArtifactKind.GGUF, Precision.FP32)], [SampleResult("a", "x", "x", 0.0, 1.0, 3, 3, 0, 0)], reports_routing=False)
    value, bound, ok = rep.checks["routing_agreement"]
    assert value is None and ok is None and bound == "not reported by this runtime" and rep.passed


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory):
    from medmoe_edge.workflows import export_bundle

    root = tmp_path_factory.mktemp("tamper")
    export_bundle("onnx", "demo", root / "onnx", trace_questions=2)
    export_bundle("gguf", "demo", root / "gguf", {"--quant": "q8_0"}, trace_questions=2)
    return {"onnx": (root / "onnx", "onnxruntime"), "gguf": (root / "gguf", "llamacpp")}


def _tampered(src: Path, dst: Path, edit, *, rehash: bool) -> Path:
    import hashlib
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    text = json.dumps(m, indent=2) + "\n"
    (dst / "manifest.json").write_text(text)
    if rehash:
        (dst / "manifest.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  manifest.json\n")
    return dst


_EDITS = {
    "model.num_experts": lambda m: m["model"].update(num_experts=8),
    "model.num_layers": lambda m: m["model"].update(num_layers=m["model"]["num_layers"] + 1),
    "model.hidden_size": lambda m: m["model"].update(hidden_size=m["model"]["hidden_size"] * 2),
    "precision": lambda m: m.update(precision="fp16"),
    "tensor_groups": lambda m: m["tensor_groups"][0].update(precision="q4_0"),
    "files": lambda m: m["files"][0].update(sha256="0" * 64),
}


@pytest.mark.parametrize("field", list(_EDITS))
@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_an_edited_manifest_is_refused_by_run_and_verify(fmt, field, demo_bundles, sample_png, tmp_path):
    src, runtime = demo_bundles[fmt]
    bundle = _tampered(src, tmp_path / "b", _EDITS[field], rehash=False)
    for args in (["run", "--runtime", runtime, "--model", str(bundle), "--image", str(sample_png), "--question", "q"], ["verify", str(bundle)]):
        assert "manifest.json does not match manifest.sha256: the manifest was edited or corrupted after export" in _one_line_error(runner.invoke(app, args))


@pytest.mark.parametrize("field", ["model.num_experts", "model.num_layers", "model.hidden_size", "precision", "files"])
@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_a_rehashed_manifest_that_lies_is_refused_naming_the_field(fmt, field, demo_bundles, sample_png, tmp_path):
    """Even with its digest recomputed, a manifest is checked against the graphs / GGUF metadata and the files' hashes."""
    src, runtime = demo_bundles[fmt]
    bundle = _tampered(src, tmp_path / "b", _EDITS[field], rehash=True)
    for args in (["run", "--runtime", runtime, "--model", str(bundle), "--image", str(sample_png), "--question", "q"], ["verify", str(bundle)]):
        msg = _one_line_error(runner.invoke(app, args))
        assert ("does not match its SHA-256" in msg) if field == "files" else (f"{field} is " in msg and "the manifest does not describe this bundle" in msg), msg


def test_ctrl_c_during_the_export_check_says_the_bundle_is_complete(tiny_ckpts, tmp_path, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("medmoe_edge.cli.verify_cmd.run_verify", interrupted)
    out = tmp_path / "b"
    r = runner.invoke(app, ["export", "--format", "onnx", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--out", str(out)])
    msg = _one_line_error(r, code=130)
    assert f"the bundle in {out} is complete: run `medmoe-edge verify {out}`" in msg
    assert (out / "manifest.json").is_file()
    r = runner.invoke(app, ["verify", str(out), "--limit", "2", "--json"])
    assert r.exit_code == 0, r.output
    prov = json.loads(r.stdout)["provenance"]  # verify's JSON says what was compared, by hash
    assert prov["model"]["kind"] == "onnx" and len(prov["model"]["bundle_id"]) == 16 and prov["precision"] == "fp32"
    assert prov["trace_source_sha256"] == prov["model"]["source_sha256"] and "onnxruntime" in prov["libraries"]


def test_the_default_thread_count_leaves_room_for_other_work(monkeypatch):
    from medmoe_edge import runtime_contract as rc

    monkeypatch.setattr(rc, "usable_cores", lambda: 4)
    monkeypatch.setattr(rc, "other_runnable", lambda: 0)
    assert rc.DEFAULT_THREAD_POLICY == "load-aware" and rc.default_threads() == 4  # an idle machine: every core
    monkeypatch.setattr(rc, "other_runnable", lambda: 3)
    assert rc.default_threads() == 1  # three other runnable tasks on four cores
    monkeypatch.setattr(rc, "other_runnable", lambda: 9)
    assert rc.default_threads() == 1 and rc.choose_threads("all") == 4 and rc.choose_threads("all-1") == 3
    with pytest.raises(InputError, match="thread policy 'most' is not one of all, all-1, physical, load-aware"):
        rc.choose_threads("most")


def test_messages_name_the_right_runtime_and_describe_bundles(demo_bundles, sample_png):
    import onnxruntime as ort

    onnx_bundle, gguf_bundle = demo_bundles["onnx"][0], demo_bundles["gguf"][0]
    r = runner.invoke(app, ["run", "--runtime", "llamacpp", "--model", str(onnx_bundle), "--image", str(sample_png), "--question", "q"])
    assert "is a bundle of kind onnx, not gguf: run it with --runtime onnxruntime" in _one_line_error(r)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = runner.invoke(app, ["run", "--runtime", "onnxruntime", "--device", "cuda", "--model", str(onnx_bundle), "--image", str(sample_png), "--question", "q"])
        msg = _one_line_error(r)
        assert msg.startswith("error: --device cuda: this onnxruntime build has no CUDAExecutionProvider") and "or use --device cpu" in msg and "--provider" not in msg
    info = json.loads(runner.invoke(app, ["info", str(gguf_bundle), "--json"]).stdout)
    assert info["format"] == "gguf" and info["precision"] == "q8_0" and info["runtime"] == "llamacpp" and info["embedded_trace"]
    assert sum(info["parameters_by_precision"].values()) > 1_000_000
    table = runner.invoke(app, ["info", str(onnx_bundle)], terminal_width=200)
    assert table.exit_code == 0 and "run it with --runtime onnxruntime" in table.stdout and "no weights" not in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "--format", "onnx", "--trace-questions", "-1"], "--trace-questions must be 0 (embed no reference trace) or more, got -1"),
        (["export", "--format", "onnx", "--trace-questions", "5000"], "--trace-questions 5000 is more than the 1600 questions of the eval split: use --trace-questions 1600 or fewer"),
        (["quantize", "--format", "onnx", "--stats", "STATS", "--avg-bits", "4", "--trace-questions", "5000"], "--trace-questions 5000 is more than the 1600 questions of the eval split"),
        (["trace", "--limit", "5000"], "--limit 5000 is more than the 1600 questions of the eval set: use --limit 1600 or fewer"),
    ],
)
def test_a_trace_longer_than_its_set_is_refused_before_any_work(args, message, tmp_path, monkeypatch):
    # never a trace of fewer questions than asked passing for the one asked
    for where in ("medmoe_edge.workflows.load", "medmoe_edge.quantization.load_model"):
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("the model was loaded before --trace-questions was checked"))
    out = tmp_path / "out"
    r = runner.invoke(app, [a.replace("STATS", str(tmp_path / "stats")) for a in args] + ["--out", str(out)])
    assert message in _one_line_error(r)
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "compare", "verify", "verify --trace"])
def test_a_limit_above_the_set_is_refused_not_cut(command, demo_bundles, tmp_path, monkeypatch):
    """A user's --limit is the number of questions run: more than the set (or trace) holds is an
    error naming the largest, never a shorter run reported as the one asked for."""
    from medmoe_edge.trace import Trace

    bundle = demo_bundles["onnx"][0]
    for where in ("medmoe_edge.workflows.load", "medmoe_edge.cli.eval_cmd.load"):
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("a model was loaded before --limit was checked"))
    held = len(Trace.load(bundle).items)
    args, message = {
        "eval": (["eval", "--limit", "5000"], "--limit 5000 is more than the 1600 questions of the eval set: use --limit 1600 or fewer"),
        "compare": (["compare", "--limit", "5000", "--out", str(tmp_path / "cmp")], "--limit 5000 is more than the 1600 questions of the eval set: use --limit 1600 or fewer"),
        "verify": (["verify", str(bundle), "--limit", "5000"], "--limit 5000 is more than the 1600 questions of the eval set: use --limit 1600 or fewer"),
        "verify --trace": (["verify", str(bundle), "--trace", str(bundle), "--limit", str(held + 1)], f"--limit {held + 1} is more than the {held} questions of the trace in {bundle}: use --limit {held} or fewer"),
    }[command]
    r = runner.invoke(app, args)
    assert message in _one_line_error(r)
    assert not (tmp_path / "cmp").exists()
