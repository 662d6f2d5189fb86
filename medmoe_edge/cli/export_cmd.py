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
    GGUF = "gguf"


def _parse_tensor_types(items: list[str]) -> dict[str, str]:
    """`--tensor-type REGEX=TYPE` values → {regex: type}, in the order given (llama.cpp takes the first match)."""
    import re

    from ..errors import InputError

    out: dict[str, str] = {}
    for item in items:
        pattern, sep, ttype = item.rpartition("=")
        if not sep or not pattern or not ttype:
            raise InputError(f"--tensor-type {item!r} is not REGEX=TYPE (e.g. 'blk\\.0\\.ffn_.*_exps=q8_0')")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"--tensor-type {item!r}: {pattern!r} is not a valid regular expression ({e})") from None
        out[pattern] = ttype.lower()
    return out


@user_errors
def export(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Bundle format.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to create (must not exist or be empty).")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, or a hub id.")] = "demo",
    precision: Annotated[str | None, typer.Option("--precision", help="ONNX: fp32 (default) or fp16.")] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="GGUF: f32 (default), f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0.")] = None,
    mmproj_dtype: Annotated[str | None, typer.Option("--mmproj-dtype", help="GGUF: f32 (default) or f16 for the vision tower + projector file.")] = None,
    tensor_types: Annotated[list[str] | None, typer.Option("--tensor-type", help="GGUF: REGEX=TYPE, a ggml type for the tensors whose names match (repeatable; first match wins), e.g. 'blk\\.0\\.ffn_.*_exps=q8_0'.")] = None,
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="ONNX: largest batch in the TensorRT optimisation profiles [default: 4].")] = None,
    check: Annotated[bool, typer.Option("--verify/--no-verify", help=f"Compare the bundle with the PyTorch reference on {EXPORT_VERIFY_LIMIT} eval questions.")] = True,
) -> None:
    """Export a checkpoint to a deployment bundle with a manifest (SHA-256 of every file)."""
    from ..errors import InputError

    if fmt is ExportFormat.ONNX:
        from medmoe_edge.export.onnx_export import OnnxPrecision, export_onnx

        gguf_only = [name for name, v in (("--quant", quant), ("--mmproj-dtype", mmproj_dtype), ("--tensor-type", tensor_types)) if v]
        if gguf_only:
            raise InputError(f"{gguf_only[0]} applies to --format gguf; ONNX bundles take --precision fp32|fp16")
        try:
            prec = OnnxPrecision(precision or "fp32")
        except ValueError:
            raise InputError(f"--precision {precision!r} is not an ONNX precision: use fp32 or fp16") from None
        with err.status(f"exporting {model} to ONNX ({prec.value})"):
            manifest = export_onnx(model, out_dir, prec, vision_tower=vision_tower, max_batch=4 if max_batch is None else max_batch)
    else:
        from medmoe_edge.export.gguf_export import GgufQuant, export_gguf

        if precision is not None or max_batch is not None:
            raise InputError(f"{'--precision' if precision is not None else '--max-batch'} applies to --format onnx; GGUF bundles take --quant f32|f16|q8_0|q4_k_m|...")
        try:
            q = GgufQuant((quant or "f32").lower())
        except ValueError:
            raise InputError(f"--quant {quant!r} is not supported: use one of {', '.join(x.value for x in GgufQuant)}") from None
        overrides = _parse_tensor_types(tensor_types or [])
        with err.status(f"exporting {model} to GGUF ({q.value})"):
            manifest = export_gguf(model, out_dir, q, mmproj_dtype=mmproj_dtype or "f32", vision_tower=vision_tower, overrides=overrides or None)
        for name, ttype in manifest.extra.get("fallbacks", {}).items():
            err.print(f"[yellow]{name}: stored as {ttype}, not {q.value} (its rows do not fit the {q.value} block size)[/]")
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
