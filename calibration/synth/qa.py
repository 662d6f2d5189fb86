"""Captions and question/answer pairs derived from findings (VQA-RAD / SLAKE / PathVQA style).

Everything is lower case and a pure function of the findings, except which
phrasing of each question is used (drawn from `rng`). Answers are short:

closed: yes/no, the modality ("ct", "mri", "x-ray", "pathology"), the organ or
        tissue (the region), the side ("left"/"right", the patient's side).
open:   the abnormality ("two large nodules in the left lung" / "no abnormality"),
        the count as a word ("zero", "one", "two", "three"; "zero" rather than
        "none" so that no count answer contains another), the location
        ("left lung", "right hemisphere", "left abdomen"), the caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .findings import Domain, Findings

MODALITY: dict[Domain, str] = {Domain.CT: "ct", Domain.MRI: "mri", Domain.XRAY: "x-ray", Domain.PATHOLOGY: "pathology"}
#: What a lesion is called in each domain: (singular, plural).
NOUN: dict[Domain, tuple[str, str]] = {
    Domain.CT: ("lesion", "lesions"),
    Domain.MRI: ("lesion", "lesions"),
    Domain.XRAY: ("nodule", "nodules"),
    Domain.PATHOLOGY: ("tumour", "tumours"),
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
CLOSED, OPEN = "closed", "open"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    answer_type: str  # "closed" or "open"


def noun(f: Findings) -> str:
    singular, plural = NOUN[f.domain]
    return plural if f.count > 1 else singular


def location(f: Findings) -> str | None:
    """Where the lesions are: "left lung", "right hemisphere", "left abdomen"; the tissue for pathology; None without a lesion."""
    if not f.lesion:
        return None
    if f.domain is Domain.PATHOLOGY:
        return f.region
    part = {"chest": "lung", "abdomen": "abdomen", "brain": "hemisphere"}[f.region]
    return f"{f.side} {part}"


def abnormality(f: Findings) -> str:
    """ "large lesion in the left lung", "two small tumours in the colon", or "no abnormality"."""
    if not f.lesion:
        return "no abnormality"
    count = "" if f.count == 1 else f"{NUMBER_WORDS[f.count]} "
    return f"{count}{f.size} {noun(f)} in the {location(f)}"


def caption(f: Findings) -> str:
    """One lower-case sentence, e.g. "ct scan of the abdomen with two large lesions on the left."."""
    lead = {
        Domain.CT: f"ct scan of the {f.region}",
        Domain.MRI: f"mri of the {f.region}",
        Domain.XRAY: f"x-ray of the {f.region}",
        Domain.PATHOLOGY: f"pathology slide of {f.region} tissue",
    }[f.domain]
    if not f.lesion:
        return f"{lead} with no {NOUN[f.domain][0]}."
    count = "a" if f.count == 1 else NUMBER_WORDS[f.count]
    if f.domain is Domain.PATHOLOGY:
        where = ""
    elif f.region == "abdomen":
        where = f" on the {f.side}"
    else:
        where = f" in the {location(f)}"
    return f"{lead} with {count} {f.size} {noun(f)}{where}."


def _yes(b: bool) -> str:
    return "yes" if b else "no"


_PRESENCE: dict[Domain, tuple[str, ...]] = {
    Domain.CT: ("is there a lesion in this image?", "is there a lesion in the {region}?", "is there a mass in this ct scan?"),
    Domain.MRI: ("is there a lesion in the brain?", "is there a lesion in this image?", "are there any hyperintense lesions?"),
    Domain.XRAY: ("is there a nodule in the lungs?", "is there a lung nodule?", "is there a lesion in this image?"),
    Domain.PATHOLOGY: ("is there a tumour in this tissue?", "is there a tumour in this image?", "is malignancy present?"),
}
_ORGAN: dict[Domain, tuple[str, ...]] = {
    Domain.CT: ("which organ is shown?", "what part of the body is shown?", "what body region is imaged?"),
    Domain.MRI: ("which organ is shown?", "what part of the body is shown?", "what organ is imaged?"),
    Domain.XRAY: ("which organ is shown?", "what part of the body is shown?", "what body region is imaged?"),
    Domain.PATHOLOGY: ("which organ is this tissue from?", "what tissue is this?", "which organ is shown?"),
}


def _templates(f: Findings) -> list[tuple[str, tuple[str, ...], str, str]]:
    """Every applicable (kind, phrasings, answer, answer_type) for `f`, in a fixed order."""
    one, many = NOUN[f.domain]
    nn = noun(f)
    be = "are" if f.count > 1 else "is"
    thing = "tissue" if f.domain is Domain.PATHOLOGY else "image"
    t: list[tuple[str, tuple[str, ...], str, str]] = [
        ("presence", _PRESENCE[f.domain], _yes(f.lesion), CLOSED),
        ("normal", (f"is the {f.region} normal?", f"is this {thing} normal?"), _yes(not f.lesion), CLOSED),
        ("modality", ("what modality is this?", "what imaging modality is used?", "how was this image taken?"), MODALITY[f.domain], CLOSED),
        ("organ", _ORGAN[f.domain], f.region, CLOSED),
    ]
    if f.lesion and f.side:
        t.append(("side", (f"is the {one} on the left or the right?", f"which side is the {one} on?")
                  if f.count == 1 else (f"are the {many} on the left or the right?", f"which side are the {many} on?"), f.side, CLOSED))
    if f.lesion:
        t.append(("large", (f"{be} the {nn} large?", f"{be} the {nn} big?"), _yes(f.size == "large"), CLOSED))
    t += [
        ("multiple", (f"are there multiple {many}?", f"is there more than one {one}?"), _yes(f.count > 1), CLOSED),
        ("abnormality", ("what abnormality is seen?", f"what is abnormal in this {thing}?", "what are the findings?"), abnormality(f), OPEN),
        ("count", (f"how many {many} are there?", f"how many {many} are seen?"), NUMBER_WORDS[f.count], OPEN),
    ]
    if f.lesion and f.side:
        t.append(("where", (f"where {be} the {nn}?", "where is the abnormality located?"), location(f) or "", OPEN))
    t.append(("describe", ("describe the image.", "give a short description of this image."), caption(f).rstrip("."), OPEN))
    return t


#: Every kind of question, in the order they appear in `make_qa`'s output.
KINDS: tuple[str, ...] = ("presence", "normal", "modality", "organ", "side", "large", "multiple", "abnormality", "count", "where", "describe")


def make_qa(f: Findings, rng: np.random.Generator, limit: int | None = None) -> list[QA]:
    """One QA per applicable question kind (8 without a lesion, 9 for a pathology tumour, 11 for a radiology lesion), each phrasing drawn from `rng`.

    With `limit`, a random subset of that many kinds (kept in `KINDS` order). Always draws the same
    number of values from `rng`, so later draws do not depend on the findings.
    """
    pick = rng.random(len(KINDS))
    keys = rng.random(len(KINDS))
    out: list[tuple[float, QA]] = []
    for kind, phrasings, answer, answer_type in _templates(f):
        i = KINDS.index(kind)
        q = phrasings[int(pick[i] * len(phrasings))].format(region=f.region)
        out.append((keys[i], QA(q, answer, answer_type)))
    if limit is not None and limit < len(out):
        chosen = sorted(range(len(out)), key=lambda k: out[k][0])[:limit]
        out = [out[k] for k in sorted(chosen)]
    return [qa for _, qa in out]
