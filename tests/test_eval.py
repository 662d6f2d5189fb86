"""`medmoe-edge eval` end to end on a tiny random checkpoint and a small generated set."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from medmoe_edge.calibration.synth import Split, build_split
from medmoe_edge.cli.app import app
from medmoe_edge.presets import Preset


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_split(root, Split.EVAL, 2, seed=5)
    return root


def test_eval_scores_every_domain_and_writes_routing_report(tiny_ckpts, small_eval, tmp_path):
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--set", "eval", "--data", str(small_eval), "--max-new-tokens", "4", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert set(summary["summary"]) == {"ct", "mri", "pathology", "xray", "overall"}
    n = sum(1 for _ in (small_eval / "eval.jsonl").open())
    assert summary["n"] == n
    assert summary["summary"]["overall"]["n_closed"] + summary["summary"]["overall"]["n_open"] == n
    for domain, shares in summary["routing_image_share"].items():
        assert sum(shares) == pytest.approx(1.0) and len(shares) == 4, domain
    preds = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert len(preds) == n and {"prediction", "reference", "domain"} <= set(preds[0])
    with Image.open(out / "routing.png") as im:
        assert im.width > 200 and im.height > 100


def test_eval_bad_set_is_one_line_error(tiny_ckpts):
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--set", "validation"])
    assert r.exit_code == 2 and "--set 'validation' is not a split" in r.stderr
