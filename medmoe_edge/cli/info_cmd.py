"""`medmoe-edge info MODEL`: variant, generation, parameters, MoE layout, dtypes and files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..demo import DEMO_LABEL, is_demo
from ..info import checkpoint_info
from .common import human_count, out, print_json, user_errors


@user_errors
def info(
    model: Annotated[str, typer.Argument(help="'demo' (built-in), a checkpoint directory, or a hub id.")] = "demo",
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Describe a Med-MoE checkpoint without loading its weights."""
    ci = checkpoint_info(model, vision_tower)
    if as_json:
        obj = ci.to_json()
        if is_demo(model):
            obj["model_note"] = DEMO_LABEL
        print_json(obj)
        return
    t, m, c = ci.text, ci.moe, ci.counts
    table = Table(title=f"Med-MoE checkpoint {ci.directory}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("variant", f"{t.variant.value} ({ci.config.get('model_type')})")
    table.add_row("generation", ci.generation)
    table.add_row("decoder", f"{t.num_layers} layers, hidden {t.hidden_size}, FFN {t.intermediate_size}, {t.num_heads} heads × {t.head_dim} (rotary {t.rotary_dim}), vocab {t.vocab_size}, context {t.max_position_embeddings}")
    moe_layers = ",".join(map(str, m.layers))
    table.add_row("MoE", f"layers [{moe_layers}]: {m.num_experts} experts, top-{m.top_k} + meta expert" + (", residual coefficient" if m.use_residual else ""))
    table.add_row("LLM parameters", f"{human_count(c.llm_total)} total, {human_count(c.llm_activated)} activated per token")
    table.add_row("projector", human_count(c.projector))
    if ci.tower_dir:
        table.add_row("vision tower", f"{ci.tower_dir}: {human_count(c.vision_total)} ({human_count(c.vision_used)} used up to the selected layer)")
    else:
        table.add_row("vision tower", f"[yellow]{ci.tower_error}[/]")
    if ci.ignored_vision_tensors:
        table.add_row("ignored", f"{ci.ignored_vision_tensors} vision-tower tensors inside the checkpoint (reloaded from mm_image_tower, as the official loader)")
    table.add_row("dtypes", ", ".join(f"{k}: {v} tensors" for k, v in sorted(ci.dtypes.items())))
    table.add_row("files", "\n".join(f"{n} ({_size(b)})" for n, b in ci.files))
    out.print(table)
    if is_demo(model):
        out.print(f"[yellow]{DEMO_LABEL}[/]")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
