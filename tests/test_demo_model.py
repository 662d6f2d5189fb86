"""The committed built-in demo model: the issue's acceptance figures, checked on every CI run.

The eval set is regenerated from its seed and hash-checked (about 30 s to answer 1,600
questions on 2 cores).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.calibration.synth import Split, build_split, read_manifest
from medmoe_edge.cli.app import app
from medmoe_edge.demo import DEMO_DATA_SEED, demo_dir
from medmoe_edge.evaluate import evaluate
from medmoe_edge.info import checkpoint_info

DOMAINS = ["ct", "mri", "pathology", "xray"]


@pytest.fixture(scope="module")
def demo_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-eval")
    build_split(root, Split.EVAL, 100, DEMO_DATA_SEED)
    samples = read_manifest(root / "eval.jsonl")
    return evaluate(api.load("demo"), samples, root)


def test_demo_checkpoint_is_small_released_layout_and_k_quant_friendly():
    d = demo_dir()
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    info = checkpoint_info("demo")
    assert info.generation == "medmoe" and info.text.hidden_size % 256 == 0 and info.text.intermediate_size % 256 == 0
    assert info.moe.num_experts == 4 and info.moe.top_k == 1


def test_demo_accuracy_on_held_out_eval(demo_eval):
    s = demo_eval.summary
    for domain in DOMAINS + ["overall"]:
        assert s[domain]["closed_accuracy"] >= 90.0, (domain, s[domain])
        assert s[domain]["open_recall"] >= 60.0, (domain, s[domain])


def test_demo_routing_is_domain_specialised(demo_eval):
    shares = demo_eval.routing_image
    assert sorted(shares) == DOMAINS
    top = {d: max(range(4), key=lambda e: shares[d][e]) for d in DOMAINS}
    for d in DOMAINS:
        assert shares[d][top[d]] >= 0.5, (d, shares[d])
    assert len(set(top.values())) >= 3, top


def test_run_defaults_to_the_demo_model_on_a_real_ct_slice():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    r = CliRunner().invoke(app, ["run", "--image", path, "--question", "what modality is this?", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["model"] == "demo" and "not for clinical use" in obj["model_note"]
    assert obj["answer"]  # the answer itself is reported in docs/DEMO.md, not asserted


def test_demo_tower_is_a_transformers_clip_vision_model():
    """The demo's tower directory loads in transformers and gives our penultimate-layer features."""
    import torch
    import transformers

    hf = transformers.CLIPVisionModel.from_pretrained(str(demo_dir() / "clip-vision")).eval()
    pipe = api.load("demo")
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    ours = pipe.runtime.model.vision(px)
    assert (ours - theirs).abs().max().item() < 1e-4
