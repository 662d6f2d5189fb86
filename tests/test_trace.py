"""Reference traces: recorded once, saved safely, replayed by `verify` with the same figures as a live reference."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.checkpoint import read_spec
from medmoe_edge.cli.app import app
from medmoe_edge.demo import demo_dir
from medmoe_edge.errors import CheckpointError, InputError
from medmoe_edge.runtime_contract import RuntimeOptions
from medmoe_edge.trace import Trace
from medmoe_edge.verify import TOLERANCES, replay
from medmoe_edge.vocab import ArtifactKind, Precision
from medmoe_edge.workflows import export_bundle, record_trace, save_trace

runner = CliRunner()
FP32 = TOLERANCES[(ArtifactKind.ONNX, Precision.FP32)]


@pytest.fixture(scope="module")
def demo_trace() -> Trace:
    # a fixed thread count on both sides: a matmul's bits depend on the threads it ran on, and the
    # load-aware default can pick different counts for the recording and the replay
    return record_trace("demo", limit=6, options=RuntimeOptions(num_threads=2))


def test_trace_records_every_step_and_round_trips(demo_trace, tmp_path):
    t = demo_trace
    image_tokens = read_spec(demo_dir())[0].image_tokens
    assert len(t.items) == 6 and t.header.full_logits and t.header.vocab_rows == 582
    for it in t.items:
        assert it.tensors["logits"].shape == (it.steps, 582)
        assert it.tensors["logits"].argmax(-1).tolist() == it.argmax
        # the last step predicts EOS unless the answer ran to max_new_tokens
        assert it.argmax[-1] == t.header.eos_id or it.steps == t.header.max_new_tokens
        prompt = it.experts("prompt_experts")
        assert prompt and all(e.shape[0] == it.request.spliced_length(image_tokens) for e in prompt.values())
    paths = save_trace(t, tmp_path / "tr")
    assert sorted(p.name for p in paths) == ["trace.json", "trace.safetensors"]
    back = Trace.load(tmp_path / "tr")
    assert back.header == t.header
    for a, b in zip(t.items, back.items):
        assert a.id == b.id and a.argmax == b.argmax and a.answer == b.answer
        assert set(a.tensors) == set(b.tensors) and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_replaying_the_reference_against_itself_is_exact(demo_trace):
    with api.load("demo", options=RuntimeOptions(num_threads=2)) as pipe:
        r = replay(pipe.runtime, demo_trace, FP32)
    m = r.metrics
    assert m["logits_max_abs"] == 0.0 and m["token_agreement"] == 1.0 and m["routing_agreement"] == 1.0 and m["answer_agreement"] == 1.0
    assert r.passed and r.logits_scope == "full"


def test_top_k_traces_compare_the_reference_top_entries(tmp_path):
    from medmoe_edge.runtime_contract import RuntimeOptions
    from medmoe_edge.trace import record
    from medmoe_edge.trace import trace_questions
    from medmoe_edge.calibration.sets import resolve_set
    from medmoe_edge.support_files import checkpoint_source_sha256

    samples, root = resolve_set("eval")
    with api.load("demo", options=RuntimeOptions()) as pipe:
        qs = trace_questions(pipe, samples[:3], root, api.PreprocessMode.PAD)
        t = record(pipe.runtime, qs, source_sha256=checkpoint_source_sha256(demo_dir()), max_new_tokens=8, preprocess="pad", set_name="eval", full_logits=False)
        assert "logits" not in t.items[0].tensors and t.items[0].tensors["topk_values"].shape[1] == 64
        r = replay(pipe.runtime, t, FP32)
    assert r.logits_scope == "top-64" and r.metrics["logits_max_abs"] == 0.0 and r.passed


def test_corrupt_or_missing_traces_are_named_errors(demo_trace, tmp_path):
    with pytest.raises(CheckpointError, match="no reference trace"):
        Trace.load(tmp_path)
    save_trace(demo_trace, tmp_path / "t")
    (tmp_path / "t" / "trace.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="is corrupt"):
        Trace.load(tmp_path / "t")
    save_trace(demo_trace, tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "trace.json").read_text())
    meta["header"]["version"] = 99
    (tmp_path / "v" / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trace version 99"):
        Trace.load(tmp_path / "v")
    with pytest.raises(InputError, match="not empty"):
        save_trace(demo_trace, tmp_path / "v")


@pytest.fixture(scope="module")
def moved_demo(tmp_path_factory):
    """An ONNX bundle exported from a copy of the demo checkpoint (16-question trace embedded), and that copy."""
    root = tmp_path_factory.mktemp("moved")
    ckpt = root / "ckpt"
    shutil.copytree(demo_dir(), ckpt)
    bundle = root / "bundle"
    export_bundle("onnx", ckpt, bundle)
    return ckpt, bundle


def _verify_json(*args: str) -> dict:
    r = runner.invoke(app, ["verify", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_verify_without_the_checkpoint_replays_the_embedded_trace_with_the_same_figures(moved_demo, tmp_path):
    ckpt, bundle = moved_demo
    assert (bundle / "trace.json").is_file() and (bundle / "trace.safetensors").is_file()
    live = _verify_json(str(bundle), "--reference", str(ckpt), "--limit", "16")
    moved = ckpt.with_name("ckpt-away")
    ckpt.rename(moved)
    try:
        embedded = _verify_json(str(bundle))
        assert embedded["against"].startswith("the embedded reference trace (16 eval questions)")
        assert embedded["metrics"] == live["metrics"] and embedded["n"] == live["n"] == 16
        r = runner.invoke(app, ["verify", str(bundle), "--limit", "64"])
        assert r.exit_code == 2 and "--reference CKPT" in r.output and "Traceback" not in r.output
    finally:
        moved.rename(ckpt)


def test_trace_cli_then_verify_with_it(moved_demo, tiny_ckpts, tmp_path):
    ckpt, bundle = moved_demo
    r = runner.invoke(app, ["trace", "--model", str(ckpt), "--limit", "3", "--out", str(tmp_path / "tr")])
    assert r.exit_code == 0, r.output
    assert "recorded 3 questions" in r.stdout
    got = _verify_json(str(bundle), "--trace", str(tmp_path / "tr"))
    assert got["n"] == 3 and got["passed"] and got["metrics"]["answer_agreement"] == 1.0
    other = runner.invoke(app, ["trace", "--model", str(next(iter(tiny_ckpts.values()))), "--limit", "1", "--out", str(tmp_path / "other")])
    assert other.exit_code == 0, other.output
    r = runner.invoke(app, ["verify", str(bundle), "--trace", str(tmp_path / "other")])
    assert r.exit_code == 2 and "recorded from another checkpoint" in r.output


def test_export_embeds_as_many_trace_questions_as_asked_and_checks_on_them(tmp_path):
    bundle = tmp_path / "b3"
    r = runner.invoke(app, ["export", "--format", "onnx", "--trace-questions", "3", "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    assert "fidelity vs the PyTorch reference (3 eval questions" in r.stdout  # the check replayed them
    assert len(json.loads((bundle / "trace.json").read_text())["items"]) == 3
    none = tmp_path / "b0"
    r = runner.invoke(app, ["export", "--format", "onnx", "--trace-questions", "0", "--no-verify", "--out", str(none)])
    assert r.exit_code == 0, r.output
    assert not (none / "trace.json").exists() and "reference-trace" not in (none / "manifest.json").read_text()
