"""Library workflows behind the CLI commands that combine layers (exporters, runtimes, data sets).

The CLI parses, calls one of these and prints; `medmoe_edge.api` is the smaller
load-and-answer API. Both sit above the core, `medmoe_edge.export`, `medmoe_edge.runtimes` and
`medmoe_edge.calibration` (the layer contracts in pyproject.toml say so and CI checks them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import Manifest
from .exporter import get_exporter
from .quant_plan import QuantPlan


def export_bundle(
    fmt: str,
    model: str | Path,
    out: Path,
    given: dict[str, Any] | None = None,
    *,
    plan: QuantPlan | None = None,
    vision_tower: Path | None = None,
    trace_questions: int = 0,
) -> Manifest:
    """Export `model` to a bundle of format `fmt` at `out`.

    Args:
        fmt: a registered exporter name (`--format`).
        given: the format's options as the user gave them, CLI flag → value (e.g. {"--quant": "q8_0"}).
        plan: a quantization plan instead of a uniform `--precision`/`--quant`.
        trace_questions: eval questions of the reference trace to embed (0: none).
    Raises:
        InputError: unknown format, an option of another format, a bad value, a non-empty `out`.
        CheckpointError / RuntimeUnavailable: as the exporter raises them.
    """
    exporter = get_exporter(fmt)
    request = exporter.request(dict(given or {}), plan=plan, vision_tower=vision_tower)
    return exporter().export(model, out, request)


__all__ = ["export_bundle"]
