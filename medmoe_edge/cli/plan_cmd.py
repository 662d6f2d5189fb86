"""`medmoe-edge plan --model M --device D`: the format and precision that fit a device, itemised;
`medmoe-edge plan show BUNDLE`: the quantization plan a bundle carries, as a table and a heatmap.

`plan` is a Typer group whose callback is the device planner (so `plan --device D` works as it
always did) and whose one subcommand is `show`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..allocation import INT_BITS
from ..bundle import read_manifest
from ..devices import PROFILES, get_profile
from ..errors import InputError
from ..ggml_codes import CODE_BITS, block_size
from ..tensor_ids import PROJECTIONS
from ..planning import COMPUTE_EFFICIENCY, MARGIN, PLANNABLE_PRECISIONS, gib, plan, resolve_model
from ..vocab import Precision
from .common import human_count, out, print_json, user_errors


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for text in values or [] for v in text.split(",") if v.strip()]


@user_errors
def plan_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="'demo', a checkpoint directory (config.json + tower config suffice), a preset (phi, stablelm: the released variants at real dimensions), or a hub id.")] = "demo",
    device: Annotated[str | None, typer.Option("--device", help=f"Device profile: {', '.join(PROFILES)}.")] = None,
    context: Annotated[int | None, typer.Option("--context", help="Tokens the KV cache holds (default min(2048, the model's context)).")] = None,
    precision: Annotated[list[str] | None, typer.Option("--precision", help="Consider only these weight precisions (repeat or comma-separate: fp16,q8_0).")] = None,
    runtime: Annotated[list[str] | None, typer.Option("--runtime", help="Consider only these runtimes (torch, onnxruntime, llamacpp).")] = None,
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Pick the format and precision of a model that fit a device, with memory itemised and speed estimated.

    Exit code 1 when nothing fits. `plan show BUNDLE` prints the quantization plan a bundle carries."""
    if ctx.invoked_subcommand is not None:
        return
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


plan_app = typer.Typer(invoke_without_command=True, no_args_is_help=False, add_completion=False, rich_markup_mode=None)
plan_app.callback()(plan_cmd)


# --- plan show BUNDLE -----------------------------------------------------------------------

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^layers\.\d+\.expert\.(\d+)$")
# cell colours of the heatmap by stored bits (fewer bits: warmer)
_BIT_STYLE = {2: "bold white on red", 3: "bold white on dark_orange", 4: "bold black on yellow", 5: "bold black on khaki1", 6: "bold black on pale_green1", 8: "bold black on green", 16: "bold white on blue", 32: "bold white on grey35"}


def _bits(precision: Precision) -> int:
    """Code bits of an integer or ggml type (their `bits` count the scales too: q2_k is 2, not 2.625); float widths otherwise."""
    return {**INT_BITS, **CODE_BITS}.get(precision, int(round(precision.bits)))


def _row(name: str, spec, note: dict) -> dict:
    return {
        "tensor_id": name,
        "precision": spec.precision.value,
        "bits": _bits(spec.precision),
        "block": spec.group_size or (block_size(spec.precision) if spec.precision in CODE_BITS else None),
        "method": spec.method.value,
        "delta_kl": note.get("delta_kl"),
        "router_agreement": note.get("router_agreement"),
        "sensitivity": note.get("sensitivity", "measured" if "delta_kl" in note else None),  # bundles before --sensitivity were all measured
        "bytes": note.get("bytes"),
        "calibration_set_sha256": note.get("calibration_set_sha256"),
    }


def _plan_rows(manifest) -> list[dict]:
    """One row per TensorId group of the bundle (as read back from its files) with the plan's spec
    and notes; where the plan gives a group's projections their own rules (GGUF's stacked experts:
    `layers.L.expert.*.fc1`, one type per layer × projection), one row per such rule instead."""
    plan = manifest.plan
    seen: dict[str, dict] = {}
    for g in manifest.tensor_groups:
        if g.name in seen:
            continue
        rule = next((r for r in plan.rules if r.matches(g.name)), None)
        if rule is None:
            per_proj = [r for r in plan.rules if any(r.matches(f"{g.name}.{p}") for p in PROJECTIONS)]
            for r in per_proj:
                seen.setdefault(r.pattern, _row(r.pattern, r.spec, r.note))
            if per_proj:
                continue
        seen[g.name] = _row(g.name, rule.spec if rule is not None else plan.default, rule.note if rule is not None else {})
        # projections coded as the delta from their meta expert's (calibration.delta): named on the expert's row
        deltas = [r for r in plan.rules if r.spec.base is not None and r.pattern.startswith(f"{g.name}.")]
        seen[g.name]["delta_from"] = {r.pattern.rsplit(".", 1)[1]: r.spec.base for r in deltas}
    return list(seen.values())


def _heatmap(rows: list[dict], experts: list[int]) -> Table:
    """Layers × (attention, meta/dense FFN, experts), each cell its planned bits, coloured; an expert
    whose projections are stacked with the layer's other experts shows each projection's bits (fc1/fc2)."""
    cells: dict[int, dict[str, int]] = {}
    stacks: dict[int, list[int]] = {}
    for r in rows:
        m = _LAYER.match(r["tensor_id"])
        if not m or m.group(2).startswith(("router", "norm")):
            continue
        if m.group(2).startswith("expert.*."):  # a stack: its bits go to every expert of the layer
            stacks.setdefault(int(m.group(1)), []).append(r["bits"])
        else:
            cells.setdefault(int(m.group(1)), {})[m.group(2)] = r["bits"]
    cols = ["attn", "meta/ffn", *(f"expert.{e}" for e in experts)]
    t = Table(title="bits per layer and expert (router, norms and biases stay in floating point)")
    t.add_column("layer", justify="right")
    for c in cols:
        t.add_column(c, justify="center")

    def cell(v: int | None, stack: list[int] | None) -> Text:
        if v is None and stack:
            return Text(" " + "/".join(map(str, stack)) + " ", style=_BIT_STYLE.get(min(stack), ""))
        return Text(f" {v} ", style=_BIT_STYLE.get(v, "")) if v is not None else Text("-", style="dim")

    for layer in sorted(cells.keys() | stacks.keys()):
        c = cells.get(layer, {})
        vals = [c.get("attn"), c.get("meta", c.get("ffn"))]
        t.add_row(str(layer), *(cell(v, None) for v in vals), *(cell(c.get(f"expert.{e}"), stacks.get(layer)) for e in experts))
    return t


@user_errors
def plan_show(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory written by `medmoe-edge quantize` (or export).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print the quantization plan a bundle carries: per TensorId its type, block, method and measured sensitivity, and a heatmap of bits over layers × experts."""
    manifest = read_manifest(bundle)
    plan = manifest.plan
    if plan.is_uniform:
        message = f"{bundle} has no quantization plan: every weight group is {plan.default.precision.value} (`medmoe-edge quantize` writes bundles with one)"
        if as_json:
            print_json({"bundle": str(bundle), "plan": None, "message": message})
        else:
            out.print(message, highlight=False, markup=False)
        return
    rows = _plan_rows(manifest)
    summary = manifest.extra.get("quantization", {})
    if as_json:
        print_json({"bundle": str(bundle), "format": manifest.format.value, "calibration": plan.calibration, "summary": summary, "groups": rows, "plan": plan.to_json()})
        return
    t = Table(title=f"{bundle}: quantization plan ({manifest.format.value}; statistics {str(plan.calibration)[:12]})")
    for col in ("TensorId", "type", "block", "method", "ΔKL", "router agree", "MB"):
        t.add_column(col, justify="left" if col in ("TensorId", "type", "method") else "right", no_wrap=col != "method", overflow="fold")
    # a narrow terminal wraps the method, never a TensorId: `layers.0.ex…` cannot tell four experts apart
    t.columns[0].min_width = max((len(r["tensor_id"]) for r in rows), default=8)
    for r in rows:
        t.add_row(
            r["tensor_id"], Text(r["precision"], style=_BIT_STYLE.get(r["bits"], "")), str(r["block"] or "-"),
            # the base is always the same layer's meta expert's projection (`--json` names it in full)
            r["method"] + "".join(f", {p} as Δ from meta" for p in r.get("delta_from", {})),
            f"{r['delta_kl']:.2e}" if r["delta_kl"] is not None else "-",
            f"{r['router_agreement']:.2%}" if r["router_agreement"] is not None else "-",
            f"{r['bytes'] / 1e6:.3f}" if r["bytes"] is not None else "-",
        )
    out.print(t)
    experts = sorted({int(m.group(1)) for g in manifest.tensor_groups if (m := _EXPERT.match(g.name))})
    out.print(_heatmap(rows, experts))
    if summary:
        cal = summary.get("calibration", {})
        out.print(
            f"{summary.get('bits_per_weight', 0):.2f} bits per weight over {summary.get('planned_params', 0):,} planned weights, "
            f"{summary.get('predicted_bytes', 0) / 1e6:.3f} MB of a {summary.get('budget_bytes', 0) / 1e6:.3f} MB budget; predicted ΔKL {summary.get('predicted_delta_kl', 0):.2e} "
            f"({summary.get('sensitivity', 'measured')} sensitivities{'; types limited to ' + ', '.join(summary['types']) if summary.get('types') else ''}); "
            f"calibration set {cal.get('set')} ({', '.join(cal.get('domains', []))}; manifest SHA-256 {str(cal.get('set_sha256'))[:12]})",
            highlight=False,
        )
        if "router_check" in summary:
            rc = summary["router_check"]
            out.print(
                f"whole-plan routing on {rc['sequences']} calibration sequences: {rc['flips']:.2%} ± {rc['flips_stderr']:.2%} of routes flipped "
                f"(guard ≤ {rc['max_flips']:.1%} with one standard error: {'held' if rc['held'] else 'not held'}"
                + (f"; keeping it would have cost {rc['hold_kl_cost']:.1f}x the KL" if rc.get("hold_kl_cost") else "")
                + ")",
                highlight=False,
            )
        if summary.get("delta_from_meta"):
            d = summary["delta_from_meta"]
            out.print(f"delta-from-meta coding: {len(d['coded_as_delta'])} of {d['compared']} quantized experts (where it adds less output error at the same bytes)", highlight=False)


plan_app.command("show")(plan_show)
