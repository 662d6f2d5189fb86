"""Check the import-layer contracts of pyproject.toml ([tool.importlinter]) with import-linter.

The subpackages `medmoe_edge.export`, `medmoe_edge.runtimes` and `medmoe_edge.calibration` live
in top-level folders (export/, runtimes/, calibration/) mapped in by setuptools' package-dir;
grimp, import-linter's graph builder, only walks a package's own directory and would not see
them. So this script stages the source tree as one package (copies of the .py files, nothing
imported or executed) and runs `lint-imports` on the copy.

    python scripts/check_layers.py            # exit 0 when every contract is kept
    python scripts/check_layers.py --plant medmoe_edge/bundle.py "import medmoe_edge.runtimes"
                                              # the same with one line added to a staged file
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# staged path → source folder, as [tool.setuptools] package-dir maps them
PACKAGE_DIRS = {"medmoe_edge": "medmoe_edge", "medmoe_edge/export": "export", "medmoe_edge/runtimes": "runtimes", "medmoe_edge/calibration": "calibration"}


def stage(dest: Path) -> Path:
    """Copy every .py file of the package (and its mapped subpackages) under `dest`; returns dest."""
    for target, src in PACKAGE_DIRS.items():
        for f in (ROOT / src).rglob("*.py"):
            rel = f.relative_to(ROOT / src)
            if target == "medmoe_edge" and rel.parts[0] in {Path(t).name for t in PACKAGE_DIRS if t != "medmoe_edge"}:
                continue
            out = dest / target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
    return dest


def lint(plant: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run lint-imports over a staged copy (with `plant` = (staged file, line) appended first)."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="medmoe-layers-") as tmp:
        stage(Path(tmp))
        if plant:
            path = Path(tmp) / plant[0]
            path.write_text(path.read_text() + "\n" + plant[1] + "\n")
        env = dict(os.environ, PYTHONPATH=tmp)
        return subprocess.run([str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp, env=env, capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plant", nargs=2, metavar=("FILE", "LINE"), help="append LINE to the staged FILE (to show a violation is caught)")
    a = ap.parse_args()
    r = lint(tuple(a.plant) if a.plant else None)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


if __name__ == "__main__":
    raise SystemExit(main())
