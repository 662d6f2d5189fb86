"""Third-party exporters join through the `medmoe_edge.exporters` entry-point group, each in one file,
and `medmoe-edge export --format NAME` uses them with no other change."""

from __future__ import annotations

import pytest
import torch
from plugin_dist import install_entry_points
from safetensors.torch import load_file
from typer.testing import CliRunner

from medmoe_edge.bundle import open_bundle
from medmoe_edge.cli.app import app
from medmoe_edge.exporter import ENTRY_POINT_GROUP, get_exporter, registered
from medmoe_edge.presets import PRESETS, Preset
from medmoe_edge.tensor_ids import model_groups
from medmoe_edge.vocab import ArtifactKind, Precision

runner = CliRunner()
ECHO = "plugins.echo_exporter:EchoExporter"


def test_builtin_exporters_are_entry_points():
    assert {"onnx", "gguf"} <= set(registered())
    assert get_exporter("gguf").precision_flag == "--quant" and get_exporter("onnx").precisions == (Precision.FP32, Precision.FP16)


def test_an_exporter_plugin_is_used_by_export(tiny_ckpts, tmp_path, monkeypatch):
    src = tiny_ckpts[Preset.TINY_STABLELM]
    with monkeypatch.context() as mp:
        install_entry_points(tmp_path, mp, ENTRY_POINT_GROUP, "echo", ECHO)
        assert "echo" in registered() and get_exporter("echo").__module__ == "plugins.echo_exporter"
        out = tmp_path / "echo-bundle"
        r = runner.invoke(app, ["export", "--format", "echo", "--precision", "fp16", "--model", str(src), "--out", str(out), "--no-verify"])
        assert r.exit_code == 0, r.output
        assert "tensors.safetensors" in r.output
        m = open_bundle(out, ArtifactKind.CHECKPOINT)  # the one manifest builder: hashes, model facts, plan
        assert m.precision is Precision.FP16 and m.toolchain["exporter"] == "echo" and m.model.variant == "stablelm"
        assert [g.name for g in m.tensor_groups] == [str(g) for g in model_groups(PRESETS[Preset.TINY_STABLELM])]
        assert {f.role for f in m.files} >= {"weights", "config", "tokenizer"}
        weights = load_file(str(out / "tensors.safetensors"))
        assert weights["model.embed_tokens.weight"].dtype == torch.float16
        # an option of another format is still a one-line error naming the format it belongs to
        r = runner.invoke(app, ["export", "--format", "echo", "--quant", "q8_0", "--model", str(src), "--out", str(tmp_path / "x"), "--no-verify"])
        assert r.exit_code == 2 and "--quant does not apply to --format echo (it applies to --format gguf)" in r.output
        assert not (tmp_path / "x").exists()
    assert "echo" not in registered()
    r = runner.invoke(app, ["export", "--format", "echo", "--model", str(src), "--out", str(tmp_path / "y"), "--no-verify"])
    assert r.exit_code == 2 and "--format 'echo' is not an installed format: use one of" in r.output


@pytest.mark.parametrize("target", ["plugins.echo_exporter:Missing", "plugins.no_such_module:X"])
def test_a_broken_exporter_plugin_is_reported_not_fatal(target, tiny_ckpts, tmp_path, monkeypatch):
    install_entry_points(tmp_path, monkeypatch, ENTRY_POINT_GROUP, "broken", target)
    assert "broken" not in registered() and "onnx" in registered()
    r = runner.invoke(app, ["export", "--format", "broken", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--out", str(tmp_path / "b"), "--no-verify"])
    assert r.exit_code == 2 and "the broken exporter plugin failed to import" in r.output
