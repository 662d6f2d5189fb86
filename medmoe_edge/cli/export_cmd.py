"""`medmoe-edge export`: a checkpoint → a deployment bundle, then its fidelity against the reference."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..imaging import PreprocessMode
from .common import err, out, user_errors
from .verify_cmd import print_report, run_verify

EXPORT_VERIFY_LIMIT = 16


class ExportFormat(str, Enum):
    """Bundle formats `export` writes."""

    ONNX = "onnx"


@user_errors
def export(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Bundle format.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to create (must not exist or be empty).")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, or a hub id.")] = "demo",
    precision: Annotated[str, typer.Option("--precision", help="fp32 or fp16 (ONNX).")] = "fp32",
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch in the TensorRT optimisation profiles.")] = 4,
    check: Annotated[bool, typer.Option("--verify/--no-verify", help=f"Compare the bundle with the PyTorch reference on {EXPORT_VERIFY_LIMIT} eval questions.")] = True,
) -> None:
    """Export a checkpoint to a deployment bundle with a manifest (SHA-256 of every file)."""
    from ..errors import InputError

    if fmt is ExportFormat.ONNX:
        from medmoe_edge.export.onnx_export import OnnxPrecision, export_onnx

        try:
            prec = OnnxPrecision(precision)
        except ValueError:
            raise InputError(f"--precision {precision!r} is not an ONNX precision: use fp32 or fp16") from None
        with err.status(f"exporting {model} to ONNX ({prec.value})"):
            manifest = export_onnx(model, out_dir, prec, vision_tower=vision_tower, max_batch=max_batch)
    t = Table(title=f"{out_dir} ({manifest.format.value}, {manifest.precision})")
    t.add_column("file")
    t.add_column("role")
    t.add_column("MiB", justify="right")
    t.add_column("sha256")
    for f in manifest.files:
        t.add_row(f.path, f.role, f"{f.bytes / 2**20:.2f}", f.sha256[:16])
    out.print(t)
    if not check:
        return
    report = run_verify(out_dir, reference=None, set_name="eval", data=None, limit=EXPORT_VERIFY_LIMIT, provider=None, threads=None, max_new_tokens=32, preprocess=PreprocessMode.PAD)
    print_report(report, f"fidelity vs the PyTorch reference ({len(report.samples)} eval questions; `medmoe-edge verify {out_dir}` for more)")
    if not report.passed:
        err.print(f"[bold red]the bundle was written to {out_dir} but is outside its fidelity tolerances[/]")
        raise typer.Exit(1)
