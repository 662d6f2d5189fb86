"""`medmoe-edge compare`: runtimes and bundles side by side on the same questions, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..charts import fidelity_cells, speed_cells
from ..comparison import DEFAULT_LIMIT, DEFAULT_MAX_NEW_TOKENS, compare
from ..demo import DEMO_LABEL, is_demo
from ..errors import InputError
from ..imaging import PreprocessMode
from .common import DeviceOption, ProviderOption, ThreadsOption, err, out, print_json, progress_bar, user_errors


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def print_tables(data: dict) -> None:
    s = data["set"]
    title = f"{data['model']}: {s['questions']} {s['name']} questions, up to {s['max_new_tokens']} tokens"
    for name, cells in (("speed and memory", speed_cells), ("fidelity against the PyTorch reference; accuracy (paper's scoring)", fidelity_cells)):
        ok = [r for r in data["rows"] if r["status"] == "ok"]
        t = Table(title=f"{title}: {name}")
        t.add_column("runtime")
        keys = list(cells(ok[0])) if ok else []
        for k in keys:
            t.add_column(k, justify="right")
        for r in data["rows"]:
            if r["status"] != "ok":
                t.add_row(r["label"], *(["[yellow]" + r["status"] + "[/]"] + [""] * (len(keys) - 1) if keys else []))
                continue
            vals = [("[bold red]FAIL[/]" if v == "FAIL" else "[green]pass[/]" if v == "pass" else v) for v in cells(r).values()]
            t.add_row(r["label"], *vals)
        out.print(t)
    for r in data["rows"]:
        if r["status"] != "ok":
            err.print(f"[yellow]{r['label']}[/]: {r['reason']}", soft_wrap=True)
    bw = data["bandwidth"]
    if bw["gbs"]:
        err.print(f"[dim]roofline: decode tok/s × activated weight bytes per token / {bw['gbs']:.1f} GB/s ({bw['method']})[/]")


@user_errors
def compare_cmd(
    model: Annotated[str, typer.Option("--model", help="The reference checkpoint ('demo': the built-in model).")] = "demo",
    bundles: Annotated[str | None, typer.Option("--bundles", help="Comma-separated bundle directories; each runs through the runtime its manifest names.")] = None,
    runtimes: Annotated[str | None, typer.Option("--runtimes", help="Comma-separated runtimes to include, e.g. torch,onnxruntime,llamacpp,tensorrt [default: torch and the bundles' runtimes]. One that cannot run here is a row with the reason.")] = None,
    set_name: Annotated[str, typer.Option("--set", help="eval (default), calibration, or a .jsonl manifest.")] = "eval",
    data: Annotated[Path | None, typer.Option("--data", help="Dataset directory from make-data [default: regenerate the demo's set].")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help=f"Questions of the set to run [default: {DEFAULT_LIMIT}, or the whole set if smaller].")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per question (every row decodes this many: EOS is ignored for timing).")] = DEFAULT_MAX_NEW_TOKENS,
    threads: ThreadsOption = None,
    device: DeviceOption = "cpu",
    provider: ProviderOption = None,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad (default) or crop.")] = PreprocessMode.PAD,
    out_dir: Annotated[Path | None, typer.Option("--out", help="New report directory: compare.json, table.md, PNG charts, index.html and the reference trace.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schemas/compare.schema.json).")] = False,
) -> None:
    """Run the same images and questions through several runtimes and bundles, alternating, and compare
    load time, prefill, time to first token, decode tok/s, peak memory, size, fidelity and accuracy.

    The PyTorch reference trace is recorded once; every row runs in its own process.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if is_demo(model):
        err.print(f"[yellow]{DEMO_LABEL}[/]")
    with progress_bar() as bar:
        task = bar.add_task("comparing", total=None)
        result = compare(
            model,
            bundles=[Path(b) for b in _split(bundles)],
            runtimes=_split(runtimes) or None,
            set_name=set_name,
            data=data,
            limit=DEFAULT_LIMIT if limit is None else limit,
            limit_flag=None if limit is None else "--limit",
            max_new_tokens=max_new_tokens,
            threads=threads,
            device=device,
            provider=provider,
            preprocess=preprocess,
            out=out_dir,
            status=err.status,
            progress=lambda i, n: bar.update(task, completed=i, total=n),
        )
    report = result.to_json()
    if as_json:
        print_json(report)
    else:
        print_tables(report)
    if out_dir is not None:
        err.print(f"report: {out_dir / 'index.html'} ({', '.join(p.name for p in result.files)})")
