"""Shared fixtures: tiny seeded checkpoints written by `init-random` in the released layout, and the
demo checkpoint stored in bf16."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmoe_edge.presets import PRESETS, Preset
from medmoe_edge.random_init import write_random_checkpoint

TINY = [Preset.TINY_PHI, Preset.TINY_STABLELM]


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[Preset, Path]:
    """One random tiny checkpoint per variant (seed 0), shared by the whole session (read-only)."""
    root = tmp_path_factory.mktemp("ckpts")
    return {p: write_random_checkpoint(PRESETS[p], root / p.value, seed=0) for p in TINY}


@pytest.fixture(params=TINY, ids=lambda p: p.value)
def tiny_ckpt(request, tiny_ckpts) -> Path:
    return tiny_ckpts[request.param]


@pytest.fixture(scope="session")
def stats_dir(tmp_path_factory) -> Path:
    """Calibration statistics of the demo model, one question per domain (quick), shared by the
    quantize tests; each backend caches its measured sensitivities there under its own name."""
    from medmoe_edge.quantization import calibrate

    out = tmp_path_factory.mktemp("qstats") / "stats"
    calibrate("demo", out, per_domain=1, sensitivity_per_domain=1)
    return out


@pytest.fixture(scope="session")
def sample_png(tmp_path_factory) -> Path:
    """A deterministic 48×40 RGB test image (non-square, so pad and crop differ)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "sample.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.fixture
def level0(monkeypatch):
    """ONNX Runtime sessions with the fused MatMulNBits at accuracy level 0 (fp32 activations; the
    default 4 quantizes activations to int8)."""
    import onnxruntime as ort

    base = ort.SessionOptions

    class Level0(base):
        def __init__(self) -> None:
            super().__init__()
            self.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")

    monkeypatch.setattr(ort, "SessionOptions", Level0)
    return Level0


@pytest.fixture(scope="session")
def bf16_demo(tmp_path_factory) -> Path:
    """The demo checkpoint stored in bf16, as Med-MoE's released checkpoints are (torch_dtype bfloat16)."""
    import torch
    from safetensors.torch import load_file, save_file

    from medmoe_edge.demo import demo_dir

    out = tmp_path_factory.mktemp("bf16") / "demo-bf16"
    shutil.copytree(demo_dir(), out)
    for f in out.glob("model-*.safetensors"):
        t = load_file(f)
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.items()}, f, metadata={"format": "pt"})
    return out
