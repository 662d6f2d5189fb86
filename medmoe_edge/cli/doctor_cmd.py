"""`medmoe-edge doctor`: this machine, every runtime's availability, and the command that fixes each gap."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..diagnostics import diagnose
from .common import err, out, print_json, user_errors


def _mark(ok: bool | None) -> str:
    return "[green]ok[/]" if ok else "[dim]n/a[/]" if ok is None else "[bold red]gap[/]"


@user_errors
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    no_bandwidth: Annotated[bool, typer.Option("--no-bandwidth", help="Skip the memory-bandwidth probe (about a second).")] = False,
) -> None:
    """Check this machine: CPU, memory and bandwidth, GPU/CUDA, Jetson release, and which runtimes can run here."""
    if not as_json:
        err.print("[dim]probing (platform, memory bandwidth, GPU, runtimes, ONNX Runtime providers)...[/]")
    r = diagnose(bandwidth=not no_bandwidth)
    if as_json:
        print_json(r.to_json())
        return
    p, cpu, mem = r.platform, r.cpu, r.memory
    sys_t = Table(title="medmoe-edge doctor", show_header=False)
    sys_t.add_column("what", style="bold")
    sys_t.add_column("found")
    sys_t.add_row("platform", f"{p['os']} ({p['system']} {p['release']}, {p['machine']}), Python {p['python']}")
    has = " ".join(f for f, on in cpu["isa"].items() if on) or "none of those checked"
    lacks = " ".join(f for f, on in cpu["isa"].items() if not on)
    isa = f"has: {has}" + (f"\n[dim]lacks: {lacks}[/]" if lacks else "")
    sys_t.add_row("CPU", f"{cpu['model']}: {cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical CPUs\n{isa}")
    bw = f", copy bandwidth {mem['copy_bandwidth_gbs']} GB/s ({mem['bandwidth_method']})" if mem.get("copy_bandwidth_gbs") else ""
    limit = f", cgroup limit {mem['cgroup_limit_gib']} GiB" if mem.get("cgroup_limit_gib") else ""
    sys_t.add_row("memory", f"{mem['total_gib']} GiB total, {mem['available_gib']} GiB available{limit}{bw}")
    g = r.gpu
    gpus = "; ".join(f"{x['name']} (driver {x['driver']}, {x['memory_mib']} MiB, SM {x['compute_capability']})" for x in g.get("gpus", [])) or "none found"
    sys_t.add_row("GPU", f"{gpus}\ntorch {g.get('torch')}: CUDA build {g.get('torch_cuda_build') or 'none (CPU build)'}, CUDA available {g.get('cuda_available')}, cuDNN {g.get('cudnn')}")
    if r.jetson:
        j = r.jetson
        sys_t.add_row("Jetson", f"{j['model']}: L4T {j['l4t']} (JetPack {j['jetpack'] or '?'}), power mode {j['power_mode'] or 'unknown'}")
    sys_t.add_row("device profile", r.profile or "none matches (see `medmoe-edge plan --help`)")
    out.print(sys_t)

    t = Table(title="checks")
    t.add_column("check")
    t.add_column("status")
    t.add_column("detail", overflow="fold")
    t.add_column("fix", overflow="fold")
    for c in r.checks:
        t.add_row(c.name, _mark(c.ok), c.detail, c.fix or "")
    out.print(t)
    if r.gaps:
        out.print(f"[yellow]{len(r.gaps)} gap(s); the fix column says what to run[/]")
    else:
        out.print("[green]no gaps for this machine[/]")
