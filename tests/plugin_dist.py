"""Install test plugins the way a separate package does: a dist-info directory with entry points.

`install_entry_points` writes `<tmp>/medmoe_test_plugins-0.0.dist-info/` with an entry_points.txt
naming classes in tests/plugins/, and puts `<tmp>` and tests/plugins on sys.path for the test, so
`importlib.metadata.entry_points(group=...)`, which medmoe-edge's plugin discovery reads, finds them
with no other change to the tool.
"""

from __future__ import annotations

from pathlib import Path

PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"


def install_entry_points(tmp_path: Path, monkeypatch, entries: dict[str, dict[str, str]]) -> Path:
    """Register {group: {name: "module:Class"}} for the duration of a test; returns the dist-info dir.

    Modules are looked up in tests/plugins/ (e.g. "checkpoint_bundle_runtime:CheckpointBundleRuntime").
    """
    site = tmp_path / "site"
    dist = site / "medmoe_test_plugins-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: medmoe-test-plugins\nVersion: 0.0\n")
    lines = []
    for group, names in entries.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in names.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))
    monkeypatch.syspath_prepend(str(site))
    return dist
