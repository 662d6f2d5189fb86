"""The built-in demo model: a miniature Med-MoE trained on synthetic images (`medmoe-edge train-demo`).

DEMO ONLY: trained on generated pictures that imitate CT, MRI, X-ray and pathology, not on
patient data. Its answers about real scans mean nothing clinically. Not for clinical use.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "assets" / "demo-medmoe"
DEMO_LABEL = "built-in demo (miniature Med-MoE trained on synthetic images; not for clinical use)"
# The data the demo was trained on is regenerated from this seed (`medmoe-edge make-data`).
DEMO_DATA_SEED = 0


def demo_dir() -> Path:
    """The packaged demo checkpoint directory.

    Raises:
        CheckpointError: the package was installed without its demo model.
    """
    if not (DEMO_DIR / "config.json").is_file():
        raise CheckpointError(f"the built-in demo model is missing from {DEMO_DIR}: reinstall medmoe-edge, or train it with `medmoe-edge train-demo`")
    return DEMO_DIR


def is_demo(model: str | Path) -> bool:
    return str(model) == DEMO_NAME
