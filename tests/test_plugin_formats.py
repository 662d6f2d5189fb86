"""A third-party exporter and runtime, each in one file (tests/plugins/), installed through the
entry-point groups: `export`, `run`, `verify` and `runtimes` use them with no other change."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmoe_edge.bundle import read_manifest
from medmoe_edge.cli.app import app
from medmoe_edge.presets import Preset
from medmoe_edge.vocab import ArtifactKind

from plugin_dist import install_entry_points

runner = CliRunner()


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    install_entry_points(tmp_path, monkeypatch, "medmoe_edge.exporters", "ckpt-bundle", "plugins.checkpoint_bundle_exporter:CheckpointBundleExporter")
    install_entry_points(tmp_path, monkeypatch, "medmoe_edge.runtimes", "ckpt-bundle", "plugins.checkpoint_bundle_runtime:CheckpointBundleRuntime")


def test_plugin_exporter_and_runtime_through_export_run_verify_and_runtimes(plugins, tiny_ckpts, sample_png, tmp_path):
    src = tiny_ckpts[Preset.TINY_PHI]
    bundle = tmp_path / "bundle"
    r = runner.invoke(app, ["export", "--format", "ckpt-bundle", "--model", str(src), "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    m = read_manifest(bundle)
    assert m.format is ArtifactKind.PLUGIN and m.runtime == "ckpt-bundle" and m.toolchain["exporter"] == "ckpt-bundle"
    assert "answer_agreement" in r.stdout and "pass" in r.stdout  # export's own check ran through the plugin runtime

    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["runtimes", "--json"]).stdout)}
    assert rows["ckpt-bundle"]["available"] and rows["ckpt-bundle"]["loads"] == "plugin"
    assert rows["ckpt-bundle"]["plugin"] == "plugins.checkpoint_bundle_runtime:CheckpointBundleRuntime"

    args = ["--image", str(sample_png), "--question", "Is it normal?", "--max-new-tokens", "8", "--json"]
    plug = runner.invoke(app, ["run", "--runtime", "ckpt-bundle", "--model", str(bundle), *args])
    ref = runner.invoke(app, ["run", "--model", str(src), *args])
    assert plug.exit_code == 0 and ref.exit_code == 0, plug.output + ref.output
    assert json.loads(plug.stdout)["token_ids"] == json.loads(ref.stdout)["token_ids"]

    v = runner.invoke(app, ["verify", str(bundle), "--limit", "4", "--json"])
    assert v.exit_code == 0, v.output
    got = json.loads(v.stdout)
    assert got["runtime"] == "ckpt-bundle" and got["passed"] and got["metrics"]["logits_max_abs"] == 0.0


def test_an_option_of_another_format_is_refused_for_the_plugin_format(plugins, tiny_ckpts, tmp_path):
    r = runner.invoke(app, ["export", "--format", "ckpt-bundle", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--quant", "q8_0", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--quant does not apply to --format ckpt-bundle" in r.output and "gguf" in r.output
    assert not (tmp_path / "x").exists()
