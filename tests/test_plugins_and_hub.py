"""Runtime plugin discovery, hub-id loading from a local hub cache, tokenizer safety, DICOM through `run`."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.checkpoint import load_model
from medmoe_edge.cli.app import app
from medmoe_edge.errors import CheckpointError, RuntimeUnavailable
from medmoe_edge.presets import Preset
from medmoe_edge.runtimes import Availability, discover, get_runtime, register, unregister
from medmoe_edge.runtimes.torch_runtime import TorchRuntime


class _FloatCheckRuntime(TorchRuntime):
    """A third-party-style runtime: reuses the torch runtime under another name."""

    name = "torch-copy"
    description = "test plugin"


class _Unavailable(TorchRuntime):
    name = "needs-gpu"
    description = "test plugin that cannot run here"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, "no CUDA device")


@pytest.fixture
def plugins():
    register(_FloatCheckRuntime)
    register(_Unavailable)
    yield
    unregister(_FloatCheckRuntime.name)
    unregister(_Unavailable.name)


def test_torch_runtime_comes_from_its_entry_point():
    entry = discover()["torch"]
    assert entry.target == "medmoe_edge.runtimes.torch_runtime:TorchRuntime"
    assert entry.cls is TorchRuntime and entry.availability().available


def test_registered_plugins_are_listed_and_used(plugins, tiny_ckpts, sample_png):
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(app, ["runtimes", "--json"]).stdout)}
    assert rows["needs-gpu"]["available"] is False and rows["needs-gpu"]["reason"] == "no CUDA device"
    with pytest.raises(RuntimeUnavailable, match="runtime 'needs-gpu' is not available: no CUDA device"):
        get_runtime("needs-gpu")
    a = api.load(tiny_ckpts[Preset.TINY_PHI], runtime="torch-copy").answer(sample_png, "Is it normal?")
    b = api.load(tiny_ckpts[Preset.TINY_PHI], runtime="torch").answer(sample_png, "Is it normal?")
    assert a.token_ids == b.token_ids


def test_hub_id_loads_from_local_hub_cache(tiny_ckpts, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout (what a download leaves behind)."""
    cache = tmp_path / "hub"
    snap = cache / "models--medmoe-test--tiny-phi" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_ckpts[Preset.TINY_PHI], snap)
    (cache / "models--medmoe-test--tiny-phi" / "refs").mkdir()
    (cache / "models--medmoe-test--tiny-phi" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = load_model("medmoe-test/tiny-phi")
    assert loaded.checkpoint_dir == snap
    with pytest.raises(CheckpointError, match="is not a local directory, and as a hub id: cannot download medmoe-test/absent"):
        load_model("medmoe-test/absent")


def test_tokenizer_needing_remote_code_is_refused(tiny_ckpts, tmp_path):
    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_ckpts[Preset.TINY_STABLELM], ckpt)
    (ckpt / "tokenizer.json").unlink()
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="Arcade100kTokenizer", auto_map={"AutoTokenizer": ["tokenization_arcade100k.Arcade100kTokenizer", None]})
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    (ckpt / "tokenization_arcade100k.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CheckpointError, match="needs remote code, which medmoe-edge never runs"):
        load_model(ckpt)


def test_run_on_bundled_ct_dicom_never_prints_patient_data(tiny_ckpts):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    ds = dcmread(path)
    r = CliRunner().invoke(app, ["run", "--model", str(tiny_ckpts[Preset.TINY_PHI]), "--image", path, "--question", "Which organ?", "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["image"]["format"] == "DICOM" and obj["image"]["width"] == 128
    for field in ("PatientName", "PatientID", "InstitutionName", "StudyDate"):
        value = str(ds.get(field, "")).strip()
        if value:
            assert value not in r.output, field


def test_hub_id_with_a_subfolder_and_a_repo_without_root_config(tiny_ckpts, tmp_path, monkeypatch):
    """REPO/SUBFOLDER loads the checkpoint inside a repository (as JsST/Med-MoE keeps stage3/...);
    a repository id without a root config.json names the folders that have one."""
    cache = tmp_path / "hub"
    repo = cache / "models--medmoe-test--zoo"
    snap = repo / "snapshots" / "feedbeef"
    shutil.copytree(tiny_ckpts[Preset.TINY_PHI], snap / "stage3" / "tiny-phi")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("feedbeef")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = load_model("medmoe-test/zoo/stage3/tiny-phi")
    assert loaded.checkpoint_dir == snap / "stage3" / "tiny-phi"
    with pytest.raises(CheckpointError, match=r"medmoe-test/zoo has no config.json at its root; its checkpoints are in: stage3/tiny-phi: pass --model medmoe-test/zoo/stage3/tiny-phi"):
        load_model("medmoe-test/zoo")
