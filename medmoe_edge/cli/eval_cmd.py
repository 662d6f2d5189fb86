"""`medmoe-edge eval`: score a model on a VQA set per domain (spec §5.5) and report expert routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from ..api import load
from ..demo import DEMO_DATA_SEED, DEMO_LABEL, is_demo
from ..errors import InputError
from ..evaluate import evaluate, write_report
from ..generation import GenerationConfig
from ..imaging import PreprocessMode
from ..runtimes.base import RuntimeOptions
from .common import err, out, print_json, user_errors

EVAL_PER_DOMAIN = 100
CALIBRATION_PER_DOMAIN = 64


def dataset_samples(set_name: str, data: Path | None) -> tuple[list, Path]:
    """Samples of a split name (eval, calibration, train) or of a manifest path."""
    from ..calibration.synth import Split, build_split, read_manifest

    as_path = Path(set_name)
    if as_path.suffix == ".jsonl":
        if not as_path.is_file():
            raise InputError(f"manifest {as_path} does not exist: pass a split name (eval, calibration) or a .jsonl from make-data")
        return read_manifest(as_path), as_path.parent
    try:
        split = Split(set_name)
    except ValueError:
        raise InputError(f"--set {set_name!r} is not a split (eval, calibration, train) or a .jsonl manifest") from None
    if data is not None:
        return read_manifest(data / f"{split.value}.jsonl"), data
    # The demo's sets are regenerated deterministically (and hash-checked) into a cache directory.
    per = {Split.EVAL: EVAL_PER_DOMAIN, Split.CALIBRATION: CALIBRATION_PER_DOMAIN}.get(split)
    if per is None:
        raise InputError("--set train needs --data DIR (the training set is large; generate it with make-data)")
    cache = Path.home() / ".cache" / "medmoe-edge" / f"synth-seed{DEMO_DATA_SEED}-{split.value}{per}"
    manifest = cache / f"{split.value}.jsonl"
    if not manifest.is_file():
        with err.status(f"generating the {split.value} set into {cache}"):
            build_split(cache, split, per, DEMO_DATA_SEED)
    return read_manifest(manifest), cache


@user_errors
def eval_model(
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory, bundle, or 'demo' (built-in).")] = "demo",
    set_name: Annotated[str, typer.Option("--set", help="eval, calibration, train, or a .jsonl manifest.")] = "eval",
    data: Annotated[Path | None, typer.Option("--data", help="Dataset directory from make-data [default: regenerate the demo's set].")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="Runtime plugin.")] = "torch",
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N questions.")] = None,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad (default) or crop.")] = PreprocessMode.PAD,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write predictions.jsonl, summary.json and routing.png here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Evaluate with the paper's scoring (closed: substring accuracy + strict match; open: recall) per domain."""
    samples, root = dataset_samples(set_name, data)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        samples = samples[:limit]
    with err.status(f"loading {model} with the {runtime} runtime"):
        pipe = load(model, runtime=runtime, options=RuntimeOptions())
    if is_demo(model):
        err.print(f"[yellow]{DEMO_LABEL}[/]")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("answering", total=len(samples))
        result = evaluate(pipe, samples, root, generation=GenerationConfig(max_new_tokens=max_new_tokens), preprocess_mode=preprocess, progress=lambda i, n: bar.update(task, completed=i))
    if out_dir is not None:
        for p in write_report(result, out_dir, f"Share of image tokens per expert ({model}, {set_name})"):
            err.print(f"wrote {p}")
    if as_json:
        print_json(result.to_json())
        return
    t = Table(title=f"{model} on {set_name} ({len(samples)} questions, {runtime})")
    for col in ("domain", "closed acc %", "closed strict %", "open recall %", "n closed", "n open"):
        t.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for domain, m in result.summary.items():
        t.add_row(domain, fmt(m["closed_accuracy"]), fmt(m["closed_strict"]), fmt(m["open_recall"]), str(m["n_closed"]), str(m["n_open"]))
    out.print(t)
    r = Table(title="routing: share of each domain's image tokens per expert (MoE layers pooled)")
    n_exp = len(next(iter(result.routing_image.values()))) if result.routing_image else 0
    r.add_column("domain")
    for e in range(n_exp):
        r.add_column(f"expert {e}", justify="right")
    for domain, shares in result.routing_image.items():
        r.add_row(domain, *[f"{s:.0%}" for s in shares])
    out.print(r)
