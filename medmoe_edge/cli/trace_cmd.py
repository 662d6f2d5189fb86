"""`medmoe-edge trace`: record the PyTorch reference's trace on a question set, for `verify --trace`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..ckpt_writer import check_new_dir
from ..imaging import PreprocessMode
from ..workflows import record_trace, save_trace
from .common import err, out, progress_bar, runtime_options, user_errors


@user_errors
def trace(
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for trace.safetensors + trace.json (must not exist or be empty).")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, or a hub id.")] = "demo",
    set_name: Annotated[str, typer.Option("--set", help="eval, calibration, or a .jsonl manifest.")] = "eval",
    data: Annotated[Path | None, typer.Option("--data", help="Dataset directory from make-data [default: regenerate the demo's set].")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Record the first N questions [default: all of the set].")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per question.")] = 32,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad (default) or crop.")] = PreprocessMode.PAD,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
) -> None:
    """Record the reference's greedy tokens, logits and routing per question, to verify bundles where the checkpoint is not."""
    check_new_dir(out_dir)  # before recording, not after
    with progress_bar() as bar:
        task = bar.add_task("recording", total=None)
        t = record_trace(
            model,
            set_name=set_name,
            data=data,
            limit=limit,
            max_new_tokens=max_new_tokens,
            preprocess=preprocess,
            options=runtime_options(threads=threads, vision_tower=vision_tower),
            status=err.status,
            progress=lambda i, n: bar.update(task, completed=i, total=n),
            limit_flag="--limit" if limit is not None else None,
        )
    paths = save_trace(t, out_dir)
    logits = "full logits" if t.header.full_logits else f"top-{t.header.topk} logits"
    out.print(f"recorded {len(t.items)} questions of {set_name} ({logits}, routing per MoE layer) into {', '.join(str(p) for p in paths)}")
    out.print(f"[dim]verify a bundle of this checkpoint anywhere with: medmoe-edge verify BUNDLE --trace {out_dir}[/]")
