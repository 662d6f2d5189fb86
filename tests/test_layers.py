"""The import-layer contracts (pyproject.toml [tool.importlinter]) hold, and a violation is caught."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
sys.modules["check_layers"] = check_layers
spec.loader.exec_module(check_layers)


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_layer_contracts_are_kept():
    r = check_layers.lint()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    "plant,contract",
    [
        (("medmoe_edge/bundle.py", "import medmoe_edge.runtimes.torch_runtime"), "the core imports no plugin"),
        (("medmoe_edge/export/gguf_io.py", "import medmoe_edge.runtimes.llamacpp_runtime"), "layers"),
        (("medmoe_edge/runtimes/base.py", "from medmoe_edge.cli import common"), "layers"),
    ],
)
def test_a_planted_violating_import_breaks_a_contract(plant, contract):
    r = check_layers.lint(plant)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout
    broken = r.stdout.split("Broken contracts")[1]
    assert contract in broken


def test_every_module_of_the_package_is_in_a_contract():
    """A new top-level module must be placed in a layer or in the core list, or this fails."""
    layered = {m.strip() for c in _contracts() if c["type"] == "layers" for layer in c["layers"] for m in layer.replace("|", ":").split(":")}
    core = {m for c in _contracts() if c["type"] == "forbidden" for m in c["source_modules"]}
    assert not layered & core
    pkg = ROOT / "medmoe_edge"
    names = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"} | {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    names |= {"export", "runtimes", "calibration"}
    unplaced = sorted(f"medmoe_edge.{n}" for n in names if f"medmoe_edge.{n}" not in layered | core)
    assert not unplaced, f"place these modules in pyproject.toml's import-linter contracts: {unplaced}"
