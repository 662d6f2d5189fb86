"""`medmoe-edge eval`: score a model on a VQA set per domain (spec §5.5) and report expert routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..api import load
from ..calibration.sets import first, resolve_set
from ..demo import DEMO_LABEL, is_demo
from ..errors import InputError
from ..evaluate import evaluate, write_report
from ..generation import GenerationConfig
from ..imaging import PreprocessMode
from ..ckpt_writer import check_new_dir
from ..provenance import provenance
from .common import DeviceOption, DtypeOption, ProviderOption, ThreadsOption, VisionTowerOption, err, out, print_json, progress_bar, runtime_options, user_errors

@user_errors
def eval_model(
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory, bundle, or 'demo' (built-in).")] = "demo",
    set_name: Annotated[str, typer.Option("--set", help="eval, calibration, train, or a .jsonl manifest.")] = "eval",
    data: Annotated[Path | None, typer.Option("--data", help="Dataset directory from make-data [default: regenerate the demo's set].")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="Runtime plugin (see `medmoe-edge runtimes`).")] = "torch",
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N questions.")] = None,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad (default) or crop.")] = PreprocessMode.PAD,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Maximum tokens per answer.")] = 32,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    threads: ThreadsOption = None,
    provider: ProviderOption = None,
    vision_tower: VisionTowerOption = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="New directory for predictions.jsonl, summary.json and routing.png (must not exist or be empty).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Evaluate with the paper's scoring (closed: substring accuracy + strict match; open: recall) per domain."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if out_dir is not None:
        check_new_dir(out_dir)  # before the evaluation, not after it
    options = runtime_options(device=device, dtype=dtype, threads=threads, vision_tower=vision_tower, provider=provider)
    qset = resolve_set(set_name, data, status=err.status)
    samples, root = first(qset.samples, limit, set_name=f"the {set_name} set"), qset.root  # never fewer than asked, silently
    with err.status(f"loading {model} with the {runtime} runtime"):
        pipe = load(model, runtime=runtime, options=options)
    if is_demo(model):
        err.print(f"[yellow]{DEMO_LABEL}[/]")
    with pipe, progress_bar() as bar:
        task = bar.add_task("answering", total=len(samples))
        result = evaluate(pipe, samples, root, generation=GenerationConfig(max_new_tokens=max_new_tokens), preprocess_mode=preprocess, progress=lambda i, n: bar.update(task, completed=i))
    prov = provenance(
        model,
        runtime=runtime,
        precision=options.dtype.value if options.dtype else None,
        data_set={"name": set_name, "sha256": qset.sha256, "questions": str(len(samples))},
        generation={"max_new_tokens": max_new_tokens, "preprocess": preprocess.value},
    )
    if out_dir is not None:
        for p in write_report(result, out_dir, f"Share of image tokens per expert ({model}, {set_name})", prov):
            err.print(f"wrote {p}")
    if as_json:
        print_json(result.to_json() | {"provenance": prov})
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
