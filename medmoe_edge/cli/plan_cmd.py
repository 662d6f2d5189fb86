"""`medmoe-edge plan --model M --device D`: the format and precision that fit a device, itemised."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..devices import PROFILES, get_profile
from ..errors import InputError
from ..planning import COMPUTE_EFFICIENCY, MARGIN, PLANNABLE_PRECISIONS, gib, plan, resolve_model
from ..vocab import Precision
from .common import human_count, out, print_json, user_errors


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for text in values or [] for v in text.split(",") if v.strip()]


@user_errors
def plan_cmd(
    model: Annotated[str, typer.Option("--model", help="'demo', a checkpoint directory (config.json + tower config suffice), a preset (phi, stablelm: the released variants at real dimensions), or a hub id.")] = "demo",
    device: Annotated[str | None, typer.Option("--device", help=f"Device profile: {', '.join(PROFILES)}.")] = None,
    context: Annotated[int | None, typer.Option("--context", help="Tokens the KV cache holds (default min(2048, the model's context)).")] = None,
    precision: Annotated[list[str] | None, typer.Option("--precision", help="Consider only these weight precisions (repeat or comma-separate: fp16,q8_0).")] = None,
    runtime: Annotated[list[str] | None, typer.Option("--runtime", help="Consider only these runtimes (torch, onnxruntime, llamacpp).")] = None,
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Pick the format and precision of a model that fit a device, with memory itemised and speed estimated.

    Exit code 1 when nothing fits."""
    if device is None:
        raise InputError(f"--device is required: use one of {', '.join(PROFILES)}")
    profile = get_profile(device)
    precisions = tuple(Precision.parse(p, allowed=PLANNABLE_PRECISIONS) for p in _split(precision)) or None
    label, spec, is_preset = resolve_model(model, vision_tower)
    p = plan(spec, profile, model=label, is_preset=is_preset, context=context, precisions=precisions, runtimes=tuple(_split(runtime)) or None)
    if as_json:
        print_json(p.to_json())
        raise typer.Exit(0 if p.chosen else 1)
    c = p.sizes.counts
    out.print(
        f"[bold]{label}[/] ({spec.variant.value}: {human_count(c.llm_total)} LLM parameters, {human_count(c.llm_activated)} activated per token) "
        f"on [bold]{profile.name}[/]: {profile.title}, {profile.memory.value:g} GiB {profile.memory_kind.value}, {profile.bandwidth.value:g} GB/s; "
        f"context {p.context}, prefill {p.prefill_tokens} rows",
        highlight=False,
    )
    t = Table(title=f"candidates, memory in GiB (fit = total + {MARGIN:.0%} ≤ {gib(round((profile.memory.value - profile.os_reserve.value) * 2**30))} usable)")
    for col in ("runtime", "precision", "weights", "vision", "KV", "act.", "rt. mem", "total GiB", "fits", "tok/s", "TTFT s"):
        t.add_column(col, justify="left" if col in ("runtime", "precision") else "right")
    for x in p.candidates:
        mem = [f"{i.bytes / 2**30:.2f}" for i in x.items]
        mark = "[bold green]chosen[/]" if x is p.chosen else ("[green]yes[/]" if x.fits else "[red]no[/]")
        t.add_row(x.runtime, x.precision.value, *mem, f"{x.total_bytes / 2**30:.2f}", mark, f"{x.decode_tok_s:.1f}", f"{x.ttft_s:.2f}")
    if p.candidates:
        out.print(t)
    if p.chosen is not None:
        d = Table(title=f"chosen: {p.chosen.label}", show_header=True)
        d.add_column("item")
        d.add_column("GiB", justify="right")
        d.add_column("how")
        for i in p.chosen.items:
            d.add_row(i.name, f"{i.bytes / 2**30:.3f}", i.detail)
        d.add_row("[bold]total[/]", f"[bold]{p.chosen.total_bytes / 2**30:.3f}[/]", f"+ {MARGIN:.0%} margin = {gib(p.chosen.required_bytes)}; {gib(p.chosen.usable_bytes)} usable")
        out.print(d)
        out.print(f"[green]{p.summary}[/]", highlight=False)
        for cmd in p.commands():
            out.print(f"  {cmd}", highlight=False, markup=False)
    else:
        out.print(f"[bold red]{p.summary}[/]", highlight=False)
    for n in p.notes:
        out.print(f"[dim]note: {n}[/]", highlight=False)
    out.print(
        f"[dim]estimates: decode = efficiency × bandwidth / activated bytes per token (efficiencies measured on a 2-core x86 development machine); "
        f"TTFT from FLOPs at {COMPUTE_EFFICIENCY:.0%} of the datasheet peak (assumed) or the measured CPU GEMM rate[/]",
        highlight=False,
    )
    if p.chosen is None:
        raise typer.Exit(1)
