"""`medmoe-edge verify BUNDLE`: fidelity of an exported bundle against the PyTorch reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from ..api import Pipeline, load
from ..bundle import checkpoint_sha256, read_manifest
from ..checkpoint import read_spec, resolve_model_dir
from ..errors import CheckpointError, InputError
from ..imaging import PreprocessMode
from ..runtimes.base import RuntimeOptions
from ..runtimes.registry import runtime_for
from ..verify import VerifyReport, tolerances_for, verify
from .common import err, out, print_json, user_errors
from ..weights import weight_files
from .eval_cmd import dataset_samples

DEFAULT_LIMIT = 64


def reference_dir(bundle: Path, reference: str | None) -> Path:
    """The checkpoint to compare against: --reference, else the manifest's source (hash-checked)."""
    manifest = read_manifest(bundle)
    path = resolve_model_dir(reference) if reference else Path(manifest.source.get("path", ""))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"the bundle's source checkpoint {path} is not here: pass --reference CKPT (the checkpoint it was exported from)")
    _spec, _cfg, tower = read_spec(path)
    files = [path / "config.json", *weight_files(path), *weight_files(tower.directory)]
    if checkpoint_sha256(files) != manifest.source.get("sha256"):
        raise CheckpointError(f"{path} is not the checkpoint this bundle was exported from (SHA-256 differs from the manifest's source): pass the right --reference")
    return path


def print_report(report: VerifyReport, title: str) -> None:
    t = Table(title=title)
    for col in ("metric", "value", "tolerance", "result"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for name, (value, bound, ok) in report.checks.items():
        if value is None:
            shown = "n/a"
        else:
            shown = f"{value:.3e}" if name == "logits_max_abs" else (f"{value:.6f}" if name == "logits_cosine_min" else f"{value:.2%}")
        t.add_row(name, shown, bound, "[green]pass[/]" if ok else "[bold red]FAIL[/]")
    out.print(t)


def run_verify(bundle: Path, *, reference: str | None, set_name: str, data: Path | None, limit: int | None, provider: str | None, threads: int | None, max_new_tokens: int, preprocess: PreprocessMode) -> VerifyReport:
    """Load both runtimes and compare them (shared by `verify` and `export`)."""
    manifest = read_manifest(bundle)  # the runtime verifies every file's SHA-256 when it loads the bundle
    tolerances = tolerances_for(manifest.format.value, manifest.precision)
    if tolerances is None:
        raise InputError(f"no fidelity tolerances are defined for {manifest.format.value} {manifest.precision} bundles")
    samples, root = dataset_samples(set_name, data)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        samples = samples[:limit]
    ref_dir = reference_dir(bundle, reference)
    runtime = runtime_for(manifest.format)
    with err.status(f"loading the reference and the bundle ({runtime})"):
        ref = load(ref_dir, runtime="torch", options=RuntimeOptions(num_threads=threads))
        bun: Pipeline = load(bundle, runtime=runtime, options=RuntimeOptions(num_threads=threads, provider=provider))
    with ref, bun, Progress(console=err, transient=True) as bar:
        task = bar.add_task("comparing", total=len(samples))
        return verify(ref, bun, samples, root, tolerances, max_new_tokens=max_new_tokens, preprocess_mode=preprocess, progress=lambda i, n: bar.update(task, completed=i))


@user_errors
def verify_bundle(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory from `medmoe-edge export`.")],
    reference: Annotated[str | None, typer.Option("--reference", help="Checkpoint to compare against [default: the manifest's source, hash-checked].")] = None,
    set_name: Annotated[str, typer.Option("--set", help="eval, calibration, or a .jsonl manifest.")] = "eval",
    data: Annotated[Path | None, typer.Option("--data", help="Dataset directory from make-data [default: regenerate the demo's set].")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help=f"Compare the first N questions [default: {DEFAULT_LIMIT}; --all for the whole set].")] = None,
    all_samples: Annotated[bool, typer.Option("--all", help="Compare every question of the set.")] = False,
    provider: Annotated[str | None, typer.Option("--provider", help="onnxruntime execution provider: cpu, cuda or tensorrt.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for both runtimes.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad (default) or crop.")] = PreprocessMode.PAD,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare a bundle with the PyTorch reference: logits, greedy tokens, routing, answers, against named tolerances."""
    if all_samples and limit is not None:
        raise InputError("--all and --limit contradict each other: give one")
    n = None if all_samples else (limit if limit is not None else DEFAULT_LIMIT)
    report = run_verify(bundle, reference=reference, set_name=set_name, data=data, limit=n, provider=provider, threads=threads, max_new_tokens=max_new_tokens, preprocess=preprocess)
    if as_json:
        print_json(report.to_json())
    else:
        print_report(report, f"{bundle} vs the PyTorch reference ({len(report.samples)} questions of {set_name})")
        for r in report.samples:
            if r.reference_answer != r.bundle_answer:
                err.print(f"[yellow]{r.id}[/]: reference {r.reference_answer!r} / bundle {r.bundle_answer!r}")
    if not report.passed:
        err.print("[bold red]verify failed[/]: the bundle is outside its tolerances")
        raise typer.Exit(1)
