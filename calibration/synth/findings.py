"""What a synthetic image shows: domain, region, and an optional lesion finding.

Side convention (radiology: CT, MRI, X-ray): the *patient's* left is drawn on
the *image right*, as on a radiology workstation (axial slices seen from the
feet, chest films seen as if facing the patient). `Findings.side` always names
the patient's side; `image_half(side)` gives the image half it is drawn on.
Pathology has no laterality (`side is None`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from medmoe_edge.errors import InputError


class Domain(str, Enum):
    """Imaging domain; each is drawn in its own modality style."""

    CT = "ct"
    MRI = "mri"
    XRAY = "xray"
    PATHOLOGY = "pathology"


DOMAINS: tuple[Domain, ...] = (Domain.CT, Domain.MRI, Domain.XRAY, Domain.PATHOLOGY)


class Split(str, Enum):
    """Dataset split; each draws from its own seed stream."""

    TRAIN = "train"
    CALIBRATION = "calibration"
    EVAL = "eval"


SPLITS: tuple[Split, ...] = (Split.TRAIN, Split.CALIBRATION, Split.EVAL)

#: Regions (organ shown, or tissue for pathology) per domain; each looks different.
REGIONS: dict[Domain, tuple[str, ...]] = {
    Domain.CT: ("abdomen", "chest"),
    Domain.MRI: ("brain",),
    Domain.XRAY: ("chest",),
    Domain.PATHOLOGY: ("colon", "liver", "lung"),
}
SIDES: tuple[str, ...] = ("left", "right")
SIZES: tuple[str, ...] = ("small", "large")
MAX_COUNT = 3
#: Probability that a sampled image has a lesion.
LESION_PROBABILITY = 0.5


def has_laterality(domain: Domain) -> bool:
    """Radiology images have a left/right; pathology slides do not."""
    return domain is not Domain.PATHOLOGY


def image_half(side: str) -> str:
    """The image half ("left"/"right") on which a lesion on the patient's `side` is drawn."""
    if side not in SIDES:
        raise InputError(f"side must be one of {', '.join(SIDES)}, not {side!r}")
    return "right" if side == "left" else "left"


@dataclass(frozen=True)
class Findings:
    """Ground truth of one image; every caption and QA answer is derived from it."""

    domain: Domain
    region: str
    lesion: bool
    side: str | None
    size: str | None
    count: int

    def __post_init__(self) -> None:
        try:
            domain = Domain(self.domain)
        except ValueError:
            raise InputError(f"unknown domain {self.domain!r}: expected one of {', '.join(d.value for d in DOMAINS)}") from None
        object.__setattr__(self, "domain", domain)
        if self.region not in REGIONS[domain]:
            raise InputError(f"region {self.region!r} is not one of {', '.join(REGIONS[domain])} for {domain.value}")
        if not isinstance(self.lesion, bool) or isinstance(self.count, bool) or not isinstance(self.count, int):
            raise InputError(f"lesion must be a bool and count an int, got {self.lesion!r} and {self.count!r}")
        if not self.lesion:
            if self.count != 0 or self.side is not None or self.size is not None:
                raise InputError("findings without a lesion must have count 0, side None and size None")
            return
        if not 1 <= self.count <= MAX_COUNT:
            raise InputError(f"lesion count must be 1-{MAX_COUNT}, not {self.count}")
        if self.size not in SIZES:
            raise InputError(f"lesion size must be one of {', '.join(SIZES)}, not {self.size!r}")
        if has_laterality(domain):
            if self.side not in SIDES:
                raise InputError(f"{domain.value} lesion side must be one of {', '.join(SIDES)}, not {self.side!r}")
        elif self.side is not None:
            raise InputError(f"{domain.value} findings have no side, got {self.side!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain.value,
            "region": self.region,
            "lesion": self.lesion,
            "side": self.side,
            "size": self.size,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Findings:
        keys = ("domain", "region", "lesion", "side", "size", "count")
        if not isinstance(d, dict) or set(d) != set(keys):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise InputError(f"findings must have exactly the keys {', '.join(keys)}, got {got}")
        return cls(**{k: d[k] for k in keys})


def sample_findings(domain: Domain, rng: np.random.Generator) -> Findings:
    """Draw findings for `domain`: uniform region; a lesion with probability 0.5, then uniform side, size and count 1-3.

    Always consumes the same number of draws, so later draws from `rng` do not depend on the outcome.
    """
    domain = Domain(domain)
    regions = REGIONS[domain]
    u = rng.random(5)
    region = regions[int(u[0] * len(regions))]
    if u[1] >= LESION_PROBABILITY:
        return Findings(domain, region, False, None, None, 0)
    side = SIDES[int(u[2] * 2)] if has_laterality(domain) else None
    return Findings(domain, region, True, side, SIZES[int(u[3] * 2)], 1 + int(u[4] * MAX_COUNT))
