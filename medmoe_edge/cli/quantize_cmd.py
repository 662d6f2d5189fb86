"""`medmoe-edge quantize`: calibration statistics → a per-group quantization plan → a bundle that carries it."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..calibration.routing import MAX_KL_COST
from ..calibration.sensitivity import SensitivityMode
from ..quantization import METHODS, ROUTER_GUARD, check_block, check_delta, check_ops, check_request, check_types, parse_gib, parse_method, parse_sensitivity, quantize_bundle
from ..quantizer import DEFAULT_BLOCK
from .common import err, out, progress_bar, user_errors
from .export_cmd import tensorrt_check_runtime
from .verify_cmd import check_written_bundle, print_report

# A quantized bundle is judged by answers kept ≥ 95 % (verify.QUANTIZED_TOLERANCES): on the 16
# questions an export embeds that bound allows no differing answer at all (15/16 = 93.75 %), so a
# bundle keeping 99.5 % on the whole split failed its own check. 40 questions allow two.
QUANTIZE_VERIFY_LIMIT = 40


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@user_errors
def quantize_cmd(
    fmt: Annotated[str, typer.Option("--format", help="Bundle format: onnx (DequantizeLinear → MatMul, int4/int8 per TensorId), gguf (ggml types q2_k…q8_0 per layer × projection, each expert rounded with its own imatrix) or tensorrt (fp16 engines with symmetric blocked int4 weights per TensorId, built with TensorRT-RTX).")],
    stats_dir: Annotated[Path, typer.Option("--stats", help="Statistics directory written by `medmoe-edge calibrate` for this model (measured sensitivities are cached there).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to create (must not exist or be empty).")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, or a hub id.")] = "demo",
    budget_mb: Annotated[float | None, typer.Option("--budget-mb", help="Bytes (10^6) for the planned matrices (LLM matrices and projector, scales included).")] = None,
    avg_bits: Annotated[float | None, typer.Option("--avg-bits", help="Average bits per weight of the planned matrices, scales included (give this or --budget-mb).")] = None,
    method: Annotated[str | None, typer.Option("--method", help=f"How codes are chosen: {', '.join(METHODS)} (gguf: gptq packs GPTQ codes into q4_0/q8_0, k-quants stay imatrix-rtn) [default: gptq for onnx/tensorrt, imatrix-rtn for gguf].")] = None,
    set_name: Annotated[str | None, typer.Option("--set", help="Calibration set the statistics must come from [default: the one they record, checked unchanged].")] = None,
    block: Annotated[int | None, typer.Option("--block", help=f"Weights per scale block of the integer codes (onnx; tensorrt's int4: 32, 64 or 128) [default: {DEFAULT_BLOCK}].")] = None,
    moe_dispatch: Annotated[str | None, typer.Option("--moe-dispatch", help="ONNX: 'scatter' (NonZero per expert) or 'if' (an If per expert, what TensorRT builds) [default: scatter].")] = None,
    ops: Annotated[str | None, typer.Option("--ops", help="ONNX: qdq (DequantizeLinear → MatMul: standard ONNX, int4/int8; ONNX Runtime fuses it into MatMulNBits) or matmulnbits (ONNX Runtime's MatMulNBits nodes written directly: int2 too, ONNX Runtime only) [default: qdq].")] = None,
    sensitivity: Annotated[str | None, typer.Option("--sensitivity", help="measured: one end-to-end probe per group and type (the demo: about a minute); proxy: tr(ΔW H ΔWᵀ) from the calibration Hessians, scaled by one probe per layer and component (for real-dimension models) [default: measured].")] = None,
    delta_from_meta: Annotated[bool | None, typer.Option("--delta-from-meta/--no-delta-from-meta", help="ONNX: store a quantized routed expert's input projections (fc1; gate/up) as codes of their difference from the meta expert's, where that adds less output error at the same bytes; the meta expert's pre-activation, computed for every token anyway, is reused [default: on for onnx].", show_default=False)] = None,
    types: Annotated[str | None, typer.Option("--types", help="Quantized types the plan may choose from, comma-separated (e.g. q4_k,q6_k,q8_0: llama.cpp on a CPU reads q3_k at about half the bandwidth of the others, docs/QUANTIZATION.md); floating point is always allowed [default: every type of the format].")] = None,
    codes_memory: Annotated[
        float | None,
        typer.Option("--codes-memory", help="GiB the candidate codes (every group at every type, made once) may hold at once; past it they wait in a temporary folder beside --out and are read back, with the same plan [default: half of the free memory less the model's weights]."),
    ] = None,
    trace_questions: Annotated[
        int,
        typer.Option("--trace-questions", help="Eval questions of the reference trace the bundle embeds, so `verify BUNDLE` works without the checkpoint; 0 embeds none. The check's answer bound (≥ 95 % kept) allows one differing answer per 20 questions."),
    ] = QUANTIZE_VERIFY_LIMIT,
    check: Annotated[bool, typer.Option("--verify/--no-verify", help=f"Compare the bundle with the PyTorch reference on the embedded trace's questions (with --trace-questions 0: against the checkpoint, on {QUANTIZE_VERIFY_LIMIT} questions).")] = True,
) -> None:
    """Quantize each expert (and every other weight group) to its own precision from measured sensitivities, under a byte budget."""
    check_request(fmt, budget_mb=budget_mb, avg_bits=avg_bits)
    q_method = parse_method(method, fmt)
    mode = parse_sensitivity(sensitivity)
    backend = check_ops(fmt, ops)
    shown_block = check_block(fmt, block, backend)  # checked before any work; quantize_bundle takes the flags as given
    allowed = check_types(fmt, types, backend)
    check_delta(fmt, delta_from_meta)
    codes_bytes = parse_gib(codes_memory, "--codes-memory")
    took: dict[str, float] = {}
    with progress_bar() as bar:
        task = bar.add_task("measuring sensitivities", total=None)
        manifest, result = quantize_bundle(
            model, fmt, stats_dir, out_dir, budget_mb=budget_mb, avg_bits=avg_bits, method=q_method, block=block, set_name=set_name, moe_dispatch=moe_dispatch, ops=ops, sensitivity=mode, delta_from_meta=delta_from_meta, types=types,
            codes_memory=codes_bytes, trace_questions=trace_questions, status=timed(err.status, took), progress=lambda i, n: bar.update(task, completed=i, total=n),
        )
    err.print("took: " + "; ".join(f"{what} {secs:.0f} s" for what, secs in took.items()), highlight=False, soft_wrap=True)
    if fmt == "gguf":
        from ..export.gguf_quant import read_back
    else:  # a TensorRT bundle holds the ONNX graphs its engines were built from
        from ..export.onnx_quant import read_back

    a = result.allocation
    stored = read_back(out_dir)
    blocks = "ggml blocks" if fmt == "gguf" else f"block {shown_block}"
    how = "estimated from tr(ΔW H ΔWᵀ), one probe per layer and component" if mode is SensitivityMode.PROXY else "measured with only that group quantized"
    limited = f", types {', '.join(p.value for p in allowed)}" if allowed else ""
    t = Table(title=f"plan ({q_method.value}, {blocks}{limited}): ΔKL {how}")
    for col in ("TensorId", "type", "written", "MB", "ΔKL", "router agree"):
        t.add_column(col, justify="left" if col in ("TensorId", "type", "written") else "right")
    predicted_int = written_int = 0
    for u, c in zip(a.units, a.picks):
        got = stored.get(u.name)
        if not c.precision.is_float:
            predicted_int += c.nbytes
            written_int += got[2] if got else 0
        shown = f"{got[0].value}/{got[1]}" if got else c.precision.value if c.precision.is_float else "missing"
        t.add_row(u.name, c.precision.value, shown, f"{c.nbytes / 1e6:.3f}", f"{c.delta:.2e}", f"{c.router_agreement:.2%}")
    out.print(t)
    gap = (written_int - predicted_int) / predicted_int if predicted_int else 0.0
    total = sum(f.bytes for f in manifest.files)
    out.print(
        f"planned matrices: {a.nbytes / 1e6:.3f} MB of a {a.budget / 1e6:.3f} MB budget, {a.bits_per_weight:.2f} bits per weight over {a.params:,} weights; "
        f"predicted ΔKL (sum over groups) {a.predicted_delta:.2e}",
        highlight=False,
    )
    if result.deltas:
        chosen = [f"layers.{d.layer}.expert.{d.expert}" for d in result.deltas if d.chosen]
        out.print(
            f"delta-from-meta coding: {len(chosen)} of {len(result.deltas)} quantized experts store their input projections (fc1; gate/up) as the delta from their meta expert's "
            f"(less output error at the same bytes{': ' + ', '.join(chosen) if chosen else ''})",
            highlight=False,
            soft_wrap=True,
        )
    if result.spilled is not None:
        sp = result.spilled
        out.print(
            f"the candidate codes ({_size(sp.need)}) did not fit in memory at once: held to {_size(sp.cap)}, the rest written beside --out and read back "
            f"({sp.read_back} read back), with the same plan; the folder is removed",
            highlight=False,
            soft_wrap=True,
        )
    if result.routing is not None:
        r = result.routing
        if r.held:
            verdict = "held"
        elif r.hold_cost is not None:
            verdict = f"[bold yellow]not held: the plans that keep it cost {r.hold_cost:.1f}x the KL on those sequences (limit {MAX_KL_COST}x), so the best plan is kept; give it more bytes to keep routes too[/]"
        else:
            verdict = "[bold yellow]not held: no plan within the budget keeps it; give it more bytes[/]"
        out.print(
            f"whole-plan routing on the calibration probe sequences: {r.check.flips:.2%} ± {r.check.stderr:.2%} of routes flipped "
            f"(guard: ≤ {1 - ROUTER_GUARD:.1%} with one standard error: {verdict}; {r.rounds} plan{'s' if r.rounds != 1 else ''} measured whole"
            # proxy sensitivities: the picks' estimated flips are probed only when the plan they gave failed whole (calibration.routing)
            + (f"; {r.measured_picks} estimated pick{'s' if r.measured_picks != 1 else ''} probed end to end" if mode is SensitivityMode.PROXY else "") + ")",
            highlight=False,
            soft_wrap=True,
        )
    out.print(f"quantized groups read back from the files: {written_int / 1e6:.3f} MB written against {predicted_int / 1e6:.3f} MB predicted ({gap:+.2%}); bundle {total / 1e6:.2f} MB in {out_dir}", highlight=False)
    if not check:
        return
    runtime, device, kernels = None, "cpu", _kernels(fmt)
    if fmt == "tensorrt":
        runtime, device, why = tensorrt_check_runtime()
        err.print(f"[yellow]{why}[/]")
        kernels = "TensorRT engines" if runtime == "tensorrt" else "ONNX Runtime on the graphs the engines were built from"
    report = check_written_bundle(out_dir, trace_questions or QUANTIZE_VERIFY_LIMIT, runtime=runtime, device=device)
    # the bounds of quantized bundles (verify.QUANTIZED_TOLERANCES), not the fp32 bundle's
    print_report(report, f"fidelity vs the fp32 PyTorch reference on {len(report.samples)} eval questions ({kernels}; `medmoe-edge verify {out_dir}` for more)")
    if not report.passed:
        err.print(f"[bold red]the bundle was written to {out_dir} but is outside the quantized-bundle tolerances: give it more bytes (a larger --budget-mb or --avg-bits)[/]")
        raise typer.Exit(1)


def timed(status, took: dict[str, float]):
    """`status` that also records each step's wall seconds into `took` (printed after the run, so a
    user of a real-dimension model sees where the time went)."""

    @contextmanager
    def run(message: str):
        t = time.perf_counter()
        with status(message):
            yield
        took[message] = time.perf_counter() - t

    return run


def _kernels(fmt: str) -> str:
    return {"onnx": "ONNX Runtime at its default MatMulNBits accuracy level", "gguf": "llama.cpp"}.get(fmt, fmt)

