"""`medmoe-edge init-random`: a random checkpoint in the released layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..presets import DEFAULT_DTYPE, PRESETS, Preset
from ..random_init import write_random_checkpoint
from .common import err, out, user_errors


@user_errors
def init_random(
    preset: Annotated[Preset, typer.Option("--preset", help="Model preset: real dimensions (phi, stablelm) or tiny test sizes.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory to write (must not exist or be empty).")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of every tensor.")] = 0,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Storage dtype: float32, float16 or bfloat16 [default: bfloat16 for real presets, float32 for tiny].")] = None,
) -> None:
    """Write a random Med-MoE checkpoint (config, sharded safetensors, tokenizer, CLIP tower) in the released layout."""
    spec = PRESETS[preset]
    dt = dtype or DEFAULT_DTYPE[preset]
    with err.status(f"writing random {preset.value} checkpoint ({dt}) to {out_dir}"):
        path = write_random_checkpoint(spec, out_dir, seed=seed, dtype=dt)
    out.print(f"wrote random [bold]{preset.value}[/] checkpoint (seed {seed}, {dt}) to {path}")
    out.print("[dim]random weights: answers are meaningless; use it to test and benchmark the toolchain[/]")
