"""`medmoe-edge bench BUNDLE|MODEL`: one runtime, warm-up + repetitions, percentiles, a threads/batch sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..benching import DEFAULT_QUESTION, bench, parse_counts
from ..demo import DEMO_LABEL, is_demo
from .common import DeviceOption, DtypeOption, ProviderOption, err, out, print_json, user_errors

MIB = 2**20


def _cell(v: float | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    return "–" if v is None else format(v * scale, fmt)


def print_bench(data: dict) -> None:
    s = data["settings"]
    head = f"{data['model']} on {data['runtime']} ({data['format']} {data['precision']}), {s['warmup']} warm-up + {s['reps']} runs of prefill + {s['decode_tokens']} decode steps"
    t = Table(title=f"{head}: percentiles")
    for col in ("threads", "batch", "metric", "p50", "p90", "p99", "mean"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    metrics = (("prefill (ms)", "prefill_s", 1000.0), ("TTFT (ms)", "ttft_s", 1000.0), ("decode (ms/step)", "decode_step_s", 1000.0), ("decode tok/s", "decode_tok_s", 1.0))
    for c in data["configs"]:
        for i, (name, key, scale) in enumerate(metrics):
            m = c[key]
            t.add_row(str(c["threads"]) if i == 0 else "", str(c["batch"]) if i == 0 else "", name, *(_cell(m[k], scale) for k in ("p50", "p90", "p99", "mean")), end_section=i == len(metrics) - 1)
    out.print(t)
    t = Table(title=f"{head}: summary")
    for col in ("threads", "batch", "load (s)", "prompt positions", "decode tok/s p50", "roofline", "peak RSS (MiB)", "GPU (MiB)"):
        t.add_column(col, justify="right")
    for c in data["configs"]:
        t.add_row(
            str(c["threads"]),
            str(c["batch"]),
            _cell(c["load_s"], fmt=".2f"),
            str(c["prompt_positions"]),
            _cell(c["decode_tok_s"]["p50"]),
            _cell(c["roofline_fraction"], fmt=".2f"),
            _cell(c["peak_rss_bytes"], 1 / MIB, ".0f"),
            _cell(c["gpu_peak_bytes"], 1 / MIB, ".0f"),
        )
    out.print(t)
    for sk in data["skipped"]:
        err.print(f"[yellow]threads {sk['threads'] or 'default'}, batch {sk['batch']}[/]: {sk['reason']}")
    bw = data["bandwidth"]
    if data["decode_bytes_per_step"]:
        bwt = "not measured" if bw["gbs"] is None else f"{bw['gbs']:.1f} GB/s measured here ({bw['method']})"
        err.print(f"[dim]roofline: decode steps/s × {data['decode_bytes_per_step'] / MIB:.1f} MiB of activated weights per step ({data['decode_bytes_detail']}) / {bwt}[/]", soft_wrap=True)


@user_errors
def bench_cmd(
    model: Annotated[str, typer.Argument(help="A bundle directory, or a checkpoint ('demo': the built-in model).")] = "demo",
    runtime: Annotated[str | None, typer.Option("--runtime", help="Runtime plugin [default: the bundle's, torch for a checkpoint].")] = None,
    threads: Annotated[str | None, typer.Option("--threads", help="Thread counts to sweep, e.g. 1,2,4 [default: the runtime's default].")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to sweep, e.g. 1,2,4 (where the runtime takes batches).")] = "1",
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")] = 1,
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions per configuration.")] = 5,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Greedy decode steps per repetition (EOS ignored).")] = 32,
    image: Annotated[Path | None, typer.Option("--image", help="Image to use [default: a fixed synthetic image].")] = None,
    question: Annotated[str, typer.Option("--question", help="Question to use.")] = DEFAULT_QUESTION,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    provider: ProviderOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON (schemas/bench.schema.json).")] = False,
) -> None:
    """Benchmark one runtime: warm-up, repetitions, p50/p90/p99 of prefill, TTFT and decode, peak memory,
    a threads (and batch) sweep, and decode speed as a share of this machine's memory-bandwidth roofline.

    Every configuration runs in its own process.
    """
    thread_list = parse_counts(threads, "--threads")
    batch_list = parse_counts(batch, "--batch")
    if is_demo(model):
        err.print(f"[yellow]{DEMO_LABEL}[/]")
    result = bench(model, runtime=runtime, threads=thread_list, batches=batch_list, warmup=warmup, reps=reps, decode_tokens=decode_tokens, image=image, question=question, device=device, provider=provider, dtype=dtype, status=err.status)
    data = result.to_json()
    if as_json:
        print_json(data)
    else:
        print_bench(data)
