"""`medmoe-edge verify BUNDLE`: fidelity of an exported bundle against the PyTorch reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import InputError
from ..imaging import PreprocessMode
from ..verify import VerifyReport
from ..workflows import TRACE_MAX_NEW_TOKENS, VerifyOutcome, verify_bundle
from ..provenance import provenance
from .common import DeviceOption, DtypeOption, ProviderOption, ThreadsOption, err, fail, out, print_json, progress_bar, runtime_options, user_errors

DEFAULT_LIMIT = 64


def format_metric(name: str, value: float) -> str:
    """A verify metric as printed: logits max-abs and KL in e-notation, cosine to 6 places, agreements in %."""
    return f"{value:.3e}" if name in ("logits_max_abs", "kl_mean") else (f"{value:.6f}" if name == "logits_cosine_min" else f"{value:.2%}")


def print_report(report: VerifyReport, title: str) -> None:
    t = Table(title=title)
    for col in ("metric", "value", "tolerance", "result"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for name, (value, bound, ok) in report.checks.items():
        shown = "n/a" if value is None else format_metric(name, value)
        result = "[dim]not checked[/]" if ok is None else "[green]pass[/]" if ok else "[bold red]FAIL[/]"
        t.add_row(name, shown, bound, result)
    out.print(t)
    if report.logits_scope != "full":
        err.print(f"[dim]logits compared over the reference's {report.logits_scope} entries of each step (the trace keeps those)[/]")


def run_verify(
    bundle: Path,
    *,
    reference: str | None,
    set_name: str,
    data: Path | None,
    limit: int | None,
    provider: str | None,
    threads: int | None,
    max_new_tokens: int,
    preprocess: PreprocessMode,
    explicit_set: bool = False,
    runtime: str | None = None,
    device: str = "cpu",
) -> VerifyReport:
    """Verify with progress on stderr (shared by `verify` and `export`); prints where the reference came from."""
    outcome = _run(bundle, reference=reference, set_name=set_name, data=data, limit=limit, provider=provider, threads=threads, device=device, max_new_tokens=max_new_tokens, preprocess=preprocess, explicit_set=explicit_set, runtime=runtime)
    err.print(f"[dim]{outcome.runtime} runtime against {outcome.against}[/]")
    return outcome.report


def check_written_bundle(bundle: Path, limit: int, *, runtime: str | None = None, device: str = "cpu") -> VerifyReport:
    """The check `export` and `quantize` run on the bundle they just wrote (its embedded trace's
    first `limit` eval questions); Ctrl-C exits 130 saying the bundle is complete."""
    try:
        return run_verify(bundle, reference=None, set_name="eval", data=None, limit=limit, provider=None, threads=None, max_new_tokens=TRACE_MAX_NEW_TOKENS, preprocess=PreprocessMode.PAD, runtime=runtime, device=device)
    except KeyboardInterrupt:
        fail(f"verification interrupted; the bundle in {bundle} is complete: run `medmoe-edge verify {bundle}` to check it", "KeyboardInterrupt", 130, False)


def _run(bundle: Path, *, provider: str | None, threads: int | None, device: str = "cpu", dtype: str | None = None, **kw) -> VerifyOutcome:
    with progress_bar() as bar:
        task = bar.add_task("comparing", total=None)
        return verify_bundle(
            bundle,
            options=runtime_options(device=device, dtype=dtype, threads=threads, provider=provider),
            status=err.status,
            progress=lambda i, n: bar.update(task, completed=i, total=n),
            **kw,
        )


@user_errors
def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory from `medmoe-edge export`.")],
    reference: Annotated[str | None, typer.Option("--reference", help="Checkpoint to compare against [default: the manifest's source, hash-checked, else the bundle's embedded trace].")] = None,
    set_name: Annotated[str | None, typer.Option("--set", help="eval (default), calibration, or a .jsonl manifest.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset directory from make-data [default: regenerate the demo's set].")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help=f"Compare the first N questions [default: {DEFAULT_LIMIT}; --all for the whole set].")] = None,
    all_samples: Annotated[bool, typer.Option("--all", help="Compare every question of the set.")] = False,
    trace: Annotated[Path | None, typer.Option("--trace", help="Replay a reference trace saved by `medmoe-edge trace` instead (no checkpoint needed).")] = None,
    runtime: Annotated[str | None, typer.Option("--runtime", help="Runtime to check the bundle with [default: the bundle's own]; e.g. onnxruntime runs a TensorRT bundle's ONNX graphs without a GPU.")] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    provider: ProviderOption = None,
    threads: ThreadsOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per question.")] = 32,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad (default) or crop.")] = PreprocessMode.PAD,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare a bundle with the PyTorch reference: logits, greedy tokens, routing, answers, against named tolerances.

    Without the reference checkpoint on this machine, the bundle's embedded reference trace is replayed.
    """
    if all_samples and limit is not None:
        raise InputError("--all and --limit contradict each other: give one")
    if trace is not None and (set_name is not None or data is not None):
        raise InputError("--trace replays the questions its trace was recorded on: drop --set/--data")
    explicit = all_samples or limit is not None or set_name is not None or data is not None
    n = None if all_samples or (trace is not None and limit is None) else (limit if limit is not None else DEFAULT_LIMIT)
    name = set_name or "eval"
    outcome = _run(bundle, reference=reference, set_name=name, data=data, limit=n, limit_flag=None if limit is None else "--limit", provider=provider, threads=threads, device=device, dtype=dtype, max_new_tokens=max_new_tokens, preprocess=preprocess, explicit_set=explicit, trace_dir=trace, runtime=runtime)
    report = outcome.report
    if as_json:
        prov = provenance(bundle, runtime=outcome.runtime, data_set={"name": outcome.set_name, "questions": len(report.samples)}, reference=outcome.against, trace_source_sha256=outcome.trace_source)
        print_json(report.to_json() | {"against": outcome.against, "runtime": outcome.runtime, "provenance": prov})
    else:
        print_report(report, f"{bundle} vs {outcome.against}: {len(report.samples)} questions, {outcome.runtime} runtime")
        for r in report.samples:
            if r.reference_answer != r.bundle_answer:
                err.print(f"[yellow]{r.id}[/]: reference {r.reference_answer!r} / bundle {r.bundle_answer!r}")
    if not report.passed:
        err.print("[bold red]verify failed[/]: the bundle is outside its tolerances")
        raise typer.Exit(1)
