"""`medmoe-edge export`: a checkpoint → a deployment bundle, then its fidelity against the reference."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..exporter import ENTRY_POINT_GROUP
from ..vocab import ArtifactKind, Precision
from .common import err, out, user_errors
from ..workflows import EMBEDDED_TRACE_QUESTIONS, export_bundle
from .verify_cmd import check_written_bundle, print_report

# the embedded trace's default size, so export's check replays it instead of re-running the reference;
# with --trace-questions N the check replays those N, with 0 it runs the checkpoint on this many
EXPORT_VERIFY_LIMIT = EMBEDDED_TRACE_QUESTIONS


def tensorrt_check_runtime() -> tuple[str, str, str]:
    """(runtime, device, what to tell the user) for the export's own check of a TensorRT bundle.

    The engines run where the tensorrt runtime is available (a GPU they target); elsewhere the
    check runs the ONNX graphs the engines were built from with ONNX Runtime on the CPU, and says so.
    """
    from ..runtimes.registry import discover

    from ..tensorrt_lib import gpu_compute_capability

    entry = discover().get("tensorrt")
    if entry is not None and entry.availability().available and gpu_compute_capability() is not None:
        return "tensorrt", "cuda", "checking the engines on this GPU"
    return "onnxruntime", "cpu", "no GPU to run the engines here: checking the ONNX graphs they were built from with onnxruntime on the CPU (run `medmoe-edge verify BUNDLE --device cuda` on the target GPU)"


def _installed_formats() -> str:
    """The installed exporters' names, read from their entry points without importing them."""
    return ", ".join(sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})) or "none"


@user_errors
def export(
    fmt: Annotated[str, typer.Option("--format", help=f"Bundle format, an installed exporter: {_installed_formats()}.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to create (must not exist or be empty).")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, or a hub id.")] = "demo",
    precision: Annotated[str | None, typer.Option("--precision", help="ONNX: fp32 (default) or fp16; TensorRT: fp16 (default), fp32 or bf16 (Ampere or later).")] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="GGUF: f32 (default), f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0.")] = None,
    mmproj_dtype: Annotated[str | None, typer.Option("--mmproj-dtype", help="GGUF: f32 or f16 for the vision tower + projector file [default: f16 for a quantized --quant, else f32].")] = None,
    tensor_types: Annotated[list[str] | None, typer.Option("--tensor-type", help="GGUF: REGEX=TYPE, a ggml type for the tensors whose names match (repeatable; first match wins), e.g. 'blk\\.0\\.ffn_.*_exps=q8_0'.")] = None,
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="ONNX/TensorRT: largest batch in the TensorRT optimisation profiles [default: 4 for onnx, 1 for tensorrt].")] = None,
    target: Annotated[str | None, typer.Option("--target", help="TensorRT: 'rtx' (TensorRT-RTX, builds here ahead of time, RTX/A100-class GPUs; default) or 'jetson' (standard TensorRT, build on the device itself).")] = None,
    max_context: Annotated[int | None, typer.Option("--max-context", help="TensorRT: most positions (prompt + answer) the engines take [default: the model's context length].")] = None,
    compute_capability: Annotated[list[str] | None, typer.Option("--compute-capability", help="TensorRT rtx: GPU compute capabilities to build for, e.g. 8.6,8.9 (the default), 7.5, 8.0, 12.0.")] = None,
    moe_dispatch: Annotated[str | None, typer.Option("--moe-dispatch", help="ONNX: 'scatter' (NonZero per expert; fastest prefill on ONNX Runtime) or 'if' (an If per expert; no data-dependent shapes, what TensorRT builds) [default: scatter].")] = None,
    trace_questions: Annotated[
        int,
        typer.Option("--trace-questions", help="Eval questions of the reference trace the bundle embeds, so `verify BUNDLE` works without the checkpoint; 0 embeds none. A full-size checkpoint takes minutes per question on a small CPU."),
    ] = EMBEDDED_TRACE_QUESTIONS,
    check: Annotated[bool, typer.Option("--verify/--no-verify", help=f"Compare the bundle with the PyTorch reference on the embedded trace's questions (with --trace-questions 0: against the checkpoint, on {EXPORT_VERIFY_LIMIT} questions).")] = True,
) -> None:
    """Export a checkpoint to a deployment bundle with a manifest (SHA-256 of every file)."""
    # The format's own flags, as given: the exporter checks them (an option of another format is an error naming it).
    flags = {"--precision": precision, "--quant": quant, "--mmproj-dtype": mmproj_dtype, "--tensor-type": tensor_types or None, "--max-batch": max_batch, "--moe-dispatch": moe_dispatch, "--target": target, "--max-context": max_context, "--compute-capability": compute_capability or None}
    given = {flag: value for flag, value in flags.items() if value is not None}
    with err.status(f"exporting {model} to {fmt}"):
        manifest = export_bundle(fmt, model, out_dir, given, vision_tower=vision_tower, trace_questions=trace_questions)
    for name, ttype in manifest.extra.get("fallbacks", {}).items():
        err.print(f"[yellow]{name}: stored as {ttype}, not {manifest.precision.value} (its rows do not fit the {manifest.precision.value} block size)[/]")
    t = Table(title=f"{out_dir} ({manifest.format.value}, {manifest.precision.value})")
    t.add_column("file")
    t.add_column("role")
    t.add_column("MiB", justify="right")
    t.add_column("sha256")
    for f in manifest.files:
        t.add_row(f.path, f.role, f"{f.bytes / 2**20:.2f}", f.sha256[:16])
    out.print(t)
    if not check:
        return
    runtime, device = None, "cpu"
    if manifest.format is ArtifactKind.TENSORRT:
        runtime, device, why = tensorrt_check_runtime()
        if runtime != "tensorrt" and manifest.precision is Precision.BF16:
            # the bundle is complete; only its numbers are unchecked, and that needs the GPU
            err.print(f"[bold yellow]UNVERIFIED: no GPU to run the bf16 engines here, and ONNX Runtime's CPU kernels have no bf16: run `medmoe-edge verify {out_dir} --device cuda` on the target GPU (Ampere or later)[/]")
            return
        err.print(f"[yellow]{why}[/]")
    report = check_written_bundle(out_dir, trace_questions or EXPORT_VERIFY_LIMIT, runtime=runtime, device=device)
    print_report(report, f"fidelity vs the PyTorch reference ({len(report.samples)} eval questions; `medmoe-edge verify {out_dir}` for more)")
    if not report.passed:
        err.print(f"[bold red]the bundle was written to {out_dir} but is outside its fidelity tolerances[/]")
        raise typer.Exit(1)
