"""Write and read the synthetic VQA splits: PNG images, a JSON-lines manifest and a content hash.

Layout under `out_dir`:

    images/<split>/<split>-<domain>-<nnnnn>.png
    <split>.jsonl     one QA per line: id, image, question, answer, answer_type, domain, findings
    <split>.sha256    content hash of the split (see `content_hash`), hex + newline
    dataset.json      (build_dataset only) seed, size, per-domain counts and hashes

A manifest is written last (by rename, after its hash file), so an existing
manifest always belongs to a complete split.

Images are interleaved by domain (ct 0, mri 0, xray 0, pathology 0, ct 1, ...),
each followed by its QA rows. Radiology PNGs are stored grayscale ("L") and
pathology PNGs RGB: open them with `Sample.open_image`, or PIL `.convert("RGB")`.

Image `i` of `domain` in `split` is drawn from its own seed stream,
`np.random.default_rng([seed, SPLIT_INDEX[split], DOMAINS.index(domain), i])`,
as findings, then image, then QA, so splits never share an image and the same
(split, per_domain, seed, size) writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from medmoe_edge.errors import ConfigError, InputError

from .findings import DOMAINS, SPLITS, Domain, Findings, Split, sample_findings
from .qa import make_qa
from .render import DEFAULT_SIZE, check_size, render

GENERATOR_VERSION = 1
SPLIT_INDEX: dict[Split, int] = {s: i for i, s in enumerate(SPLITS)}
#: QA pairs per image: every applicable question for training (8-11), a random 4 for calibration and evaluation.
QA_PER_IMAGE: dict[Split, int | None] = {Split.TRAIN: None, Split.CALIBRATION: 4, Split.EVAL: 4}
FIX = "regenerate with medmoe-edge make-data"
_KEYS = ("id", "image", "question", "answer", "answer_type", "domain", "findings")


@dataclass(frozen=True)
class Sample:
    """One question about one image; `image` is relative to the manifest's directory (POSIX separators)."""

    id: str
    image: str
    question: str
    answer: str
    answer_type: str
    domain: Domain
    findings: Findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "domain": self.domain.value,
            "findings": self.findings.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        if not isinstance(d, dict) or set(d) != set(_KEYS):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise InputError(f"a manifest line must have exactly the keys {', '.join(_KEYS)}, got {got}")
        for k in _KEYS[:5]:
            if not isinstance(d[k], str):
                raise InputError(f"manifest field {k!r} must be a string, got {d[k]!r}")
        if d["answer_type"] not in ("closed", "open"):
            raise InputError(f"answer_type must be 'closed' or 'open', got {d['answer_type']!r}")
        try:
            domain = Domain(d["domain"])
        except ValueError:
            raise InputError(f"unknown domain {d['domain']!r}") from None
        findings = Findings.from_dict(d["findings"])
        if findings.domain is not domain:
            raise InputError(f"sample {d['id']} has domain {domain.value} but findings of {findings.domain.value}")
        rel = PurePosixPath(d["image"])
        if rel.is_absolute() or ".." in rel.parts or "\\" in d["image"]:
            raise InputError(f"image path {d['image']!r} must be relative to the manifest's directory")
        return cls(d["id"], d["image"], d["question"], d["answer"], d["answer_type"], domain, findings)

    def open_image(self, root: Path) -> Image.Image:
        """The image as RGB; `root` is the manifest's directory."""
        return Image.open(Path(root) / self.image).convert("RGB")


def image_id(split: Split, domain: Domain, index: int) -> str:
    return f"{Split(split).value}-{Domain(domain).value}-{index:05d}"


def image_rng(seed: int, split: Split, domain: Domain, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_INDEX[Split(split)], DOMAINS.index(Domain(domain)), index])


def _check_count(name: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{name} must be a positive integer, not {n!r}")


def build_split(
    out_dir: Path,
    split: Split,
    per_domain: int,
    seed: int,
    *,
    size: int = DEFAULT_SIZE,
    on_image: Callable[[], None] | None = None,
) -> Path:
    """Write `per_domain` images per domain of `split` and their QA under `out_dir`; returns the manifest path.

    `on_image` is called after each image is written (for progress bars).
    """
    split = Split(split)
    _check_count("per_domain", per_domain)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, not {seed!r}")
    check_size(size)
    out_dir = Path(out_dir)
    img_dir = out_dir / "images" / split.value
    img_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    limit = QA_PER_IMAGE[split]
    for i in range(per_domain):
        for domain in DOMAINS:
            rng = image_rng(seed, split, domain, i)
            f = sample_findings(domain, rng)
            im = render(f, rng, size)
            qas = make_qa(f, rng, limit)
            stem = image_id(split, domain, i)
            rel = f"images/{split.value}/{stem}.png"
            if domain is not Domain.PATHOLOGY:
                im = im.convert("L")
            im.save(out_dir / rel, format="PNG", compress_level=6)
            for q, qa in enumerate(qas):
                sample = Sample(f"{stem}-q{q}", rel, qa.question, qa.answer, qa.answer_type, domain, f)
                lines.append(json.dumps(sample.to_dict(), separators=(",", ":")))
            if on_image is not None:
                on_image()
    # The hash file first, the manifest last, each by rename: a manifest exists only once its split is complete.
    manifest = out_dir / f"{split.value}.jsonl"
    data = ("\n".join(lines) + "\n").encode()
    _write_atomic(_hash_path(manifest), (_hash_bytes(manifest, data) + "\n").encode())
    _write_atomic(manifest, data)
    return manifest


def build_dataset(
    out_dir: Path,
    *,
    seed: int = 0,
    train_per_domain: int,
    calibration_per_domain: int,
    eval_per_domain: int,
    size: int = DEFAULT_SIZE,
    on_image: Callable[[], None] | None = None,
) -> dict[Split, Path]:
    """Write the train, calibration and eval splits (and `dataset.json`) under `out_dir`; returns the manifests."""
    counts = {Split.TRAIN: train_per_domain, Split.CALIBRATION: calibration_per_domain, Split.EVAL: eval_per_domain}
    for split, n in counts.items():
        _check_count(f"{split.value}_per_domain", n)
    out_dir = Path(out_dir)
    manifests = {split: build_split(out_dir, split, n, seed, size=size, on_image=on_image) for split, n in counts.items()}
    info = {
        "generator": "medmoe_edge.calibration.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "domains": [d.value for d in DOMAINS],
        "splits": {
            s.value: {"per_domain": counts[s], "manifest": p.name, "sha256": _hash_path(p).read_text().strip(), "qa_per_image": QA_PER_IMAGE[s]}
            for s, p in manifests.items()
        },
    }
    (out_dir / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return manifests


def _hash_path(manifest: Path) -> Path:
    return manifest.with_suffix(".sha256")


def _image_paths(manifest: Path, data: bytes) -> list[str]:
    seen: dict[str, None] = {}
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel = json.loads(line)["image"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{manifest}:{n}: not a valid manifest line: {FIX}") from None
        seen.setdefault(str(rel), None)
    return list(seen)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def content_hash(manifest: Path) -> str:
    """sha256 over the manifest's bytes, then each distinct image (in manifest order) as its 8-byte little-endian length and bytes."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise InputError(f"manifest {manifest} not found: {FIX}")
    return _hash_bytes(manifest, manifest.read_bytes())


def _hash_bytes(manifest: Path, data: bytes) -> str:
    h = hashlib.sha256(data)
    for rel in _image_paths(manifest, data):
        path = manifest.parent / rel
        try:
            blob = path.read_bytes()
        except OSError:
            raise InputError(f"{manifest}: image {rel} is missing: {FIX}") from None
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


def read_manifest(path: Path, *, verify: bool = True) -> list[Sample]:
    """Parse a split manifest; with `verify`, check its images exist and its content hash matches `<split>.sha256`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} not found: {FIX}")
    samples: list[Sample] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            samples.append(Sample.from_dict(json.loads(line)))
        except ValueError as e:  # JSON syntax
            raise InputError(f"{path}:{n}: not valid JSON ({e}): {FIX}") from None
        except InputError as e:
            raise InputError(f"{path}:{n}: {e}: {FIX}") from None
    if verify:
        expected_path = _hash_path(path)
        if not expected_path.is_file():
            raise InputError(f"{expected_path} not found, cannot verify {path.name}: {FIX}")
        expected = expected_path.read_text().strip()
        actual = content_hash(path)
        if actual != expected:
            raise InputError(f"{path} content hash {actual[:12]} does not match {expected_path.name} ({expected[:12]}): files were modified; {FIX}")
    return samples
