"""Render findings as an image in the style of their modality (one renderer module per domain).

Every image is RGB uint8, size × size; radiology images are grayscale (R == G == B).
Geometry is fixed on a 128-unit canvas, so `size` only changes the resolution.
Radiological convention: the patient's left is drawn on the image right.

`render` draws three child seeds from `rng` (anatomy, lesions, noise): exactly
three draws whatever the findings, and the same anatomy and noise with or
without a lesion, so a lesion/no-lesion pair from one seed differs only where
the lesions are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from medmoe_edge.errors import ConfigError

from .findings import Domain, Findings
from .render_ct import render_ct
from .render_mri import render_mri
from .render_pathology import render_pathology
from .render_xray import render_xray

MIN_SIZE, MAX_SIZE = 32, 1024
DEFAULT_SIZE = 128

Renderer = Callable[[Findings, np.random.Generator, np.random.Generator, np.random.Generator, int], Image.Image]
RENDERERS: dict[Domain, Renderer] = {
    Domain.CT: render_ct,
    Domain.MRI: render_mri,
    Domain.XRAY: render_xray,
    Domain.PATHOLOGY: render_pathology,
}


def check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"image size must be an integer from {MIN_SIZE} to {MAX_SIZE}, not {size!r}")
    return size


def render(f: Findings, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> Image.Image:
    """Draw `f` as a size×size RGB image; deterministic given the state of `rng`."""
    check_size(size)
    anat, les, noise = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=3))
    im = RENDERERS[Domain(f.domain)](f, anat, les, noise, size)
    assert im.mode == "RGB" and im.size == (size, size)
    return im
