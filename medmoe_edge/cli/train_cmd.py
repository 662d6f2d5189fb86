"""`medmoe-edge train-demo`: train the built-in demo model with the Med-MoE recipe in miniature."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import err, out, user_errors


@user_errors
def train_demo(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory from `medmoe-edge make-data`.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New checkpoint directory (must not exist or be empty).")],
    seed: Annotated[int, typer.Option("--seed", help="Training seed.")] = 0,
) -> None:
    """Train a miniature Med-MoE (CLIP tower, alignment, dense tuning, router, MoE tuning) on CPU."""
    from ..training.recipe import DemoRecipe, train_demo as run

    path = run(data, out_dir, DemoRecipe(seed=seed), log=lambda m: err.print(f"[dim]{m}[/]"))
    out.print(f"wrote demo checkpoint to {path} (synthetic training data: not for clinical use)")
