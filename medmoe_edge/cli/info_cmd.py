"""`medmoe-edge info MODEL`: variant, generation, parameters, MoE layout, dtypes and files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..bundle import is_bundle, read_manifest
from ..demo import DEMO_LABEL, is_demo
from ..info import checkpoint_info
from .common import human_count, out, print_json, user_errors


@user_errors
def info(
    model: Annotated[str, typer.Argument(help="'demo' (built-in), a checkpoint directory, a hub id, or a bundle from `export`.")] = "demo",
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Describe a Med-MoE checkpoint or an exported bundle without loading its weights."""
    if is_bundle(model):
        _bundle_info(Path(model), as_json)
        return
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


def _bundle_info(bundle: Path, as_json: bool) -> None:
    """What a bundle holds, from its manifest (files are checked when a runtime loads it)."""
    m = read_manifest(bundle)
    by_precision = {p.value: n for p, n in sorted(m.group_precisions().items(), key=lambda kv: kv[0].value)}
    trace = next((f for f in m.files if f.role == "reference-trace" and f.path.endswith(".json")), None)
    obj = {
        "bundle": str(bundle),
        "format": m.format.value,
        "precision": m.precision.value,
        "runtime": m.runtime or m.format.runtime,
        "bundle_id": m.bundle_id,
        "source": m.source,
        "model": {"variant": m.model.variant, "layers": m.model.num_layers, "moe_layers": list(m.model.moe_layers), "experts": m.model.num_experts, "top_k": m.model.top_k, "context": m.model.context_length},
        "parameters_by_precision": by_precision,
        "files": [{"path": f.path, "role": f.role, "bytes": f.bytes} for f in m.files],
        "embedded_trace": trace is not None,
        "toolchain": m.toolchain,
    }
    if as_json:
        print_json(obj)
        return
    table = Table(title=f"{m.format.value} bundle {bundle}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("format", f"{m.format.value}, {m.precision.value} (run it with --runtime {obj['runtime']})")
    table.add_row("model", f"{m.model.variant}: {m.model.num_layers} layers, MoE layers {list(m.model.moe_layers)}, {m.model.num_experts} experts, top-{m.model.top_k}, context {m.model.context_length}")
    table.add_row("source", f"{m.source.get('label')} (sha256 {str(m.source.get('sha256'))[:16]}…)")
    table.add_row("parameters", ", ".join(f"{p}: {human_count(n)}" for p, n in by_precision.items()))
    table.add_row("reference trace", "embedded (verify works without the checkpoint)" if trace else "none")
    table.add_row("files", f"{len(m.files)} files, {_size(sum(f.bytes for f in m.files))}")
    table.add_row("toolchain", ", ".join(f"{k} {v}" for k, v in m.toolchain.items()))
    out.print(table)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
