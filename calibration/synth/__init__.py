"""Deterministic synthetic multi-domain medical VQA data (CT, MRI, X-ray, pathology).

Used to train the miniature Med-MoE demo model (whose experts should specialise
by imaging domain) and for per-domain calibration and evaluation. Each image is
drawn from `Findings` (domain, region, lesion, side, size, count); its caption
and every QA answer are derived from the same findings.

    from medmoe_edge.calibration.synth import build_dataset, read_manifest, Split
    manifests = build_dataset(out, seed=0, train_per_domain=2000, calibration_per_domain=64, eval_per_domain=100)
    samples = read_manifest(manifests[Split.EVAL])   # verifies the content hash

Radiological convention: the patient's left is drawn on the image right.
"""

from __future__ import annotations

from .dataset import (
    GENERATOR_VERSION,
    QA_PER_IMAGE,
    SPLIT_INDEX,
    Sample,
    build_dataset,
    build_split,
    content_hash,
    image_id,
    image_rng,
    read_manifest,
)
from .findings import DOMAINS, REGIONS, SIDES, SIZES, SPLITS, Domain, Findings, Split, has_laterality, image_half, sample_findings
from .qa import KINDS, MODALITY, NOUN, NUMBER_WORDS, QA, abnormality, caption, location, make_qa
from .render import DEFAULT_SIZE, render

__all__ = [
    "DEFAULT_SIZE",
    "DOMAINS",
    "GENERATOR_VERSION",
    "KINDS",
    "MODALITY",
    "NOUN",
    "NUMBER_WORDS",
    "QA",
    "QA_PER_IMAGE",
    "REGIONS",
    "SIDES",
    "SIZES",
    "SPLITS",
    "SPLIT_INDEX",
    "Domain",
    "Findings",
    "Sample",
    "Split",
    "abnormality",
    "build_dataset",
    "build_split",
    "caption",
    "content_hash",
    "has_laterality",
    "image_half",
    "image_id",
    "image_rng",
    "location",
    "make_qa",
    "read_manifest",
    "render",
    "sample_findings",
]
