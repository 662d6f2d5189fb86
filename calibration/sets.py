"""Question sets by name: a split of the demo's synthetic data, or a user's JSONL manifest.

`resolve_set("eval")` regenerates the demo's eval split deterministically (and hash-checked)
into a cache directory the first time; `--data DIR` points at a directory from `make-data`;
a path ending in `.jsonl` is a manifest whose image paths are relative to its directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from medmoe_edge.demo import DEMO_DATA_SEED
from medmoe_edge.errors import InputError

from .synth import Sample, Split, build_split, read_manifest

EVAL_PER_DOMAIN = 100
CALIBRATION_PER_DOMAIN = 64


def cache_dir() -> Path:
    """Where generated demo sets are kept."""
    return Path.home() / ".cache" / "medmoe-edge"


@dataclass(frozen=True)
class QuestionSet:
    """A resolved set: its samples, the directory their image paths are relative to, its manifest."""

    name: str
    samples: list[Sample]
    root: Path
    manifest: Path

    def __iter__(self):  # samples, root = resolve_set(...)
        return iter((self.samples, self.root))

    @property
    def sha256(self) -> str:
        """SHA-256 of the set's manifest (which names every image and its answer)."""
        import hashlib

        return hashlib.sha256(self.manifest.read_bytes()).hexdigest()


def resolve_set(set_name: str, data: Path | None = None, *, status: Callable[[str], AbstractContextManager] | None = None) -> QuestionSet:
    """Samples of a split name (eval, calibration, train) or of a manifest path, and the directory
    their image paths are relative to (unpacks as `samples, root`).

    Args:
        status: called with a message around the (one-time) generation of a demo split.
    Raises:
        InputError: an unknown split, a missing manifest, or `train` without `data`.
    """
    as_path = Path(set_name)
    if as_path.suffix == ".jsonl":
        if not as_path.is_file():
            raise InputError(f"manifest {as_path} does not exist: pass a split name (eval, calibration) or a .jsonl from make-data")
        return QuestionSet(set_name, read_manifest(as_path), as_path.parent, as_path)
    try:
        split = Split(set_name)
    except ValueError:
        raise InputError(f"--set {set_name!r} is not a split (eval, calibration, train) or a .jsonl manifest") from None
    if data is not None:
        manifest = data / f"{split.value}.jsonl"
        return QuestionSet(set_name, read_manifest(manifest), data, manifest)
    per = {Split.EVAL: EVAL_PER_DOMAIN, Split.CALIBRATION: CALIBRATION_PER_DOMAIN}.get(split)
    if per is None:
        raise InputError("--set train needs --data DIR (the training set is large; generate it with make-data)")
    cache = cache_dir() / f"synth-seed{DEMO_DATA_SEED}-{split.value}{per}"
    manifest = cache / f"{split.value}.jsonl"
    if not manifest.is_file():
        with (status or (lambda _m: contextlib.nullcontext()))(f"generating the {split.value} set into {cache}"):
            build_split(cache, split, per, DEMO_DATA_SEED)
    return QuestionSet(set_name, read_manifest(manifest), cache, manifest)


def first(samples: list[Sample], limit: int | None, *, flag: str = "--limit", set_name: str = "the set") -> list[Sample]:
    """The first `limit` samples of a set (all of them for None).

    Raises:
        InputError: `limit` below 1, or above the set's size (a trace of fewer questions than
            asked would pass for the one asked).
    """
    if limit is None:
        return list(samples)
    if limit < 1:
        raise InputError(f"{flag} must be at least 1, got {limit}")
    if limit > len(samples):
        raise InputError(f"{flag} {limit} is more than the {len(samples)} questions of {set_name}: use {flag} {len(samples)} or fewer")
    return list(samples[:limit])


def check_trace_questions(n: int, status: Callable[[str], AbstractContextManager] | None = None) -> None:
    """`--trace-questions`: 0 (no trace embedded) or at most the eval split's questions; checked
    before the model loads, where the trace itself is recorded after minutes of work.

    Args:
        status: called with a message around the (one-time) generation of the eval split.
    Raises:
        InputError: `n` below 0 or above the eval split's questions.
    """
    if n < 0:
        raise InputError(f"--trace-questions must be 0 (embed no reference trace) or more, got {n}")
    if n:
        first(resolve_set("eval", status=status).samples, n, flag="--trace-questions", set_name="the eval split")


__all__ = ["CALIBRATION_PER_DOMAIN", "EVAL_PER_DOMAIN", "QuestionSet", "check_trace_questions", "first", "resolve_set"]
