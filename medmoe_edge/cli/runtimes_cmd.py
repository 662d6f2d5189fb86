"""`medmoe-edge runtimes`: every installed runtime plugin, available or not, and why."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..runtimes.registry import discover
from .common import out, print_json, user_errors


@user_errors
def runtimes(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List runtime plugins (entry-point group `medmoe_edge.runtimes`) and whether they can run here."""
    rows = []
    for name, entry in discover().items():
        av = entry.availability()
        kind = entry.cls.artifact_kind.value if entry.cls else "-"
        desc = entry.cls.description if entry.cls else "-"
        caps = getattr(entry.cls, "capabilities", None) if entry.cls else None
        rows.append(
            {
                "name": name,
                "available": av.available,
                "reason": av.reason,
                "loads": kind,
                "description": desc,
                "plugin": entry.target,
                "capabilities": None
                if caps is None
                else {
                    "reports_routing": caps.reports_routing,
                    "max_batch": caps.max_batch,
                    "devices": [d.value for d in caps.devices],
                    "precisions": [p.value for p in caps.precisions],
                    "options": sorted(caps.options),
                },
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="medmoe-edge runtimes")
    for col in ("runtime", "available", "loads", "can", "details", "plugin"):
        table.add_column(col)
    for r in rows:
        c = r["capabilities"]
        can = "-" if not c else "\n".join(
            [("routing" if c["reports_routing"] else "no routing"), f"batch {'any' if c['max_batch'] is None else c['max_batch']}", "+".join(c["devices"])]
        )
        table.add_row(r["name"], "[green]yes[/]" if r["available"] else "[red]no[/]", r["loads"], can, f"{r['description']}\n[dim]{r['reason']}[/]", r["plugin"])
    out.print(table)
