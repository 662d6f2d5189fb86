"""`medmoe-edge make-data`: write the synthetic multi-domain VQA dataset (train, calibration, eval)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..calibration.synth import DOMAINS, SPLITS, build_dataset, read_manifest
from ..calibration.synth.render import check_size
from ..ckpt_writer import atomic_dir
from ..errors import ConfigError
from .common import err, out, progress_bar, user_errors


@user_errors
def make_data(
    out_dir: Annotated[Path, typer.Option("--out", help="New directory to write (must not exist or be empty).")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the whole dataset (same seed: byte-identical files).")] = 0,
    train_per_domain: Annotated[int, typer.Option("--train-per-domain", help="Training images per domain (every question per image).")] = 2000,
    calibration_per_domain: Annotated[int, typer.Option("--calibration-per-domain", help="Calibration images per domain (4 questions each).")] = 64,
    eval_per_domain: Annotated[int, typer.Option("--eval-per-domain", help="Evaluation images per domain (4 questions each).")] = 100,
    size: Annotated[int, typer.Option("--size", help="Image width and height in pixels.")] = 128,
) -> None:
    """Write a deterministic synthetic medical VQA dataset: CT, MRI, X-ray and pathology images with QA, per split."""
    for name, n in (("--train-per-domain", train_per_domain), ("--calibration-per-domain", calibration_per_domain), ("--eval-per-domain", eval_per_domain)):
        if n < 1:
            raise ConfigError(f"{name} must be at least 1, not {n}")
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, not {seed}")
    check_size(size)
    out_dir = Path(out_dir)
    total = len(DOMAINS) * (train_per_domain + calibration_per_domain + eval_per_domain)
    # atomic: an interrupted run leaves nothing that looks complete
    with atomic_dir(out_dir) as tmp, progress_bar(TextColumn("writing images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("images", total=total)
        build_dataset(
            tmp,
            seed=seed,
            train_per_domain=train_per_domain,
            calibration_per_domain=calibration_per_domain,
            eval_per_domain=eval_per_domain,
            size=size,
            on_image=lambda: bar.advance(task),
        )

    table = Table(title=f"synthetic VQA data in {out_dir} (seed {seed}, {size}×{size})")
    for col in ("split", "domain", "images", "questions", "hash"):
        table.add_column(col, justify="right" if col in ("images", "questions") else "left")
    per = {"train": train_per_domain, "calibration": calibration_per_domain, "eval": eval_per_domain}
    for split in SPLITS:
        manifest = out_dir / f"{split.value}.jsonl"
        questions = Counter(s.domain for s in read_manifest(manifest, verify=False))
        digest = manifest.with_suffix(".sha256").read_text().strip()[:12]
        for domain in DOMAINS:
            table.add_row(split.value, domain.value, str(per[split.value]), str(questions[domain]), digest)
    out.print(table)
