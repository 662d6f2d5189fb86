"""Workflows behind `medmoe-edge calibrate` and `medmoe-edge quantize`.

calibrate: a question set → teacher-forced statistics (`calib_stats.CalibStats`), cached by the
hashes of the weights, the set and the settings.

quantize: statistics → measured sensitivities (ΔKL per TensorId group and candidate precision,
`calibration.sensitivity`) → an exact multiple-choice knapsack under a byte budget
(`allocation`) → codes and scales once (`quantizer`) → the format's emitter writes a bundle
whose manifest carries the plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from .calib_stats import CalibSettings, CalibStats, read_key
from .calibration.collect import collect, select
from .calibration.sets import QuestionSet, resolve_set
from .checkpoint import load_model, resolve_model_dir
from .ckpt_writer import atomic_dir, check_new_dir
from .errors import InputError
from .imaging import PreprocessMode
from .support_files import checkpoint_source_sha256

Status = Callable[[str], AbstractContextManager]
Progress = Callable[[int, int], None]

SPLIT_NAMES = ("eval", "calibration", "train")
SENSITIVITY_PER_DOMAIN = 8  # teacher-forced sequences per domain kept for ΔKL measurement


def _quiet(_m: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def resolve_calibration_set(set_name: str, *, status: Status = _quiet) -> QuestionSet:
    """`--set`: a split name, a .jsonl manifest, or a directory holding one (make-data's
    calibration.jsonl, or the only .jsonl in it, with images relative to it).

    Raises:
        InputError: a directory with no or several manifests, or what `resolve_set` refuses.
    """
    p = Path(set_name)
    if p.is_dir() and set_name not in SPLIT_NAMES:  # a split name wins over a folder of that name in the working directory
        if (p / "calibration.jsonl").is_file():
            return resolve_set(str(p / "calibration.jsonl"))
        found = sorted(p.glob("*.jsonl"))
        if len(found) != 1:
            raise InputError(f"--set {p} holds {len(found)} .jsonl question files: pass the one to calibrate on (--set {p}/NAME.jsonl)")
        return resolve_set(str(found[0]))
    return resolve_set(set_name, status=status)


def calibrate(
    model: str | Path,
    out: Path,
    *,
    set_name: str = "calibration",
    domains: Sequence[str] | None = None,
    per_domain: int | None = None,
    sensitivity_per_domain: int = SENSITIVITY_PER_DOMAIN,
    preprocess: PreprocessMode = PreprocessMode.PAD,
    status: Status = _quiet,
    progress: Progress | None = None,
) -> tuple[CalibStats, bool]:
    """Compute (or reuse) the calibration statistics of `model` on a set into the directory `out`.

    Returns:
        (statistics, True when `out` already held statistics with the same cache key).
    Raises:
        InputError: `out` holds something else (other statistics included), a bad set or domain.
    """
    if per_domain is not None and per_domain < 1:
        raise InputError(f"--per-domain must be at least 1, got {per_domain}")
    model_dir = resolve_model_dir(model)
    qs = resolve_calibration_set(set_name, status=status)
    samples, kept_domains = select(qs.samples, domains, per_domain)
    settings = CalibSettings(qs.name, qs.sha256, kept_domains, per_domain, sensitivity_per_domain, preprocess.value)
    sha = checkpoint_source_sha256(model_dir)
    key = settings.key(sha)
    existing = read_key(out) if Path(out).is_dir() else None
    if existing == key:
        return CalibStats.load(out), True
    if existing is not None:
        raise InputError(f"{out} holds calibration statistics of another model, set or settings: choose a new --out or remove {out}")
    check_new_dir(out)
    with status(f"loading {model}"):
        loaded = load_model(model_dir)
    stats = collect(loaded, samples, qs.root, settings, model_sha256=sha, label=model_dir.name if str(model) != "demo" else "demo", preprocess=preprocess, progress=progress)
    with atomic_dir(out) as tmp:
        stats.save(tmp)
    return stats, False


__all__ = ["SENSITIVITY_PER_DOMAIN", "calibrate", "resolve_calibration_set"]
