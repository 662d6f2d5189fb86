"""Install a plugin for one test exactly as a package installs it: through an entry-point group.

`install_entry_points` writes a throwaway distribution (a `*.dist-info` directory with METADATA and
entry_points.txt) into a temporary site directory and puts that directory on sys.path, so
`importlib.metadata.entry_points(group=...)`, and with it medmoe-edge's plugin registries, find
the plugin with no other change. `monkeypatch` takes the directory off sys.path after the test.
"""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

import pytest


def install_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: str, name: str, target: str) -> Path:
    """Register `target` ("module:Class", importable from the tests directory) as plugin `name` of
    entry-point `group` for this test. Several calls (other groups or names) add to the same site.

    Returns:
        The site directory on sys.path.
    """
    site = tmp_path / "plugin-site"
    dist = site / "medmoe_edge_test_plugins-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: medmoe-edge-test-plugins\nVersion: 0.0.0\n")
    eps = configparser.ConfigParser(delimiters=("=",))
    eps.optionxform = str  # entry point names are case-sensitive
    eps.read(dist / "entry_points.txt")
    if not eps.has_section(group):
        eps.add_section(group)
    eps.set(group, name, target)
    with open(dist / "entry_points.txt", "w") as f:
        eps.write(f)
    if str(site) not in sys.path:
        monkeypatch.syspath_prepend(str(site))
    return site
