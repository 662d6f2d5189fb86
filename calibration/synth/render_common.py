"""Drawing helpers shared by the per-domain renderers.

Geometry is written in *canvas units*: the canvas is 128 units wide whatever
the output size, so every renderer describes the same picture at 64, 128 or
256 pixels. Intensities are float32 in 0..255; masks are float32 in 0..1 with
anti-aliased (soft) edges.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from .findings import Findings, image_half

UNITS = 128.0  # canvas width and height in units
MID = UNITS / 2


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units: (yy with shape (size, 1), xx with shape (1, size))."""
    c = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(UNITS / size)
    yy, xx = c[:, None].copy(), c[None, :].copy()
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def px(size: int) -> float:
    """Units per pixel."""
    return UNITS / size


def ellipse(size: int, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, soft: float = 1.0) -> np.ndarray:
    """Soft mask of an ellipse (centre, semi-axes in units, rotation in radians); the edge ramps over `soft` pixels."""
    yy, xx = grid(size)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = dx * c + dy * s, dy * c - dx * s
    rho = np.sqrt((dx / np.float32(ax)) ** 2 + (dy / np.float32(ay)) ** 2)
    dist = (rho - 1.0) * np.float32(min(ax, ay))
    return np.clip(0.5 - dist / np.float32(soft * px(size)), 0.0, 1.0)


def ring(size: int, cx: float, cy: float, ax: float, ay: float, width: float, angle: float = 0.0, soft: float = 1.0) -> np.ndarray:
    """Soft mask of an elliptical ring of `width` units inside the ellipse (ax, ay)."""
    return np.clip(ellipse(size, cx, cy, ax, ay, angle, soft) - ellipse(size, cx, cy, ax - width, ay - width, angle, soft), 0.0, 1.0)


def band(size: int, curve_y: np.ndarray, width: float, soft: float = 1.0) -> np.ndarray:
    """Soft mask of a horizontal-ish band: pixels within width/2 units of y = curve_y(x) (curve_y has shape (1, size))."""
    yy, _ = grid(size)
    dist = np.abs(yy - curve_y) - np.float32(width / 2)
    return np.clip(0.5 - dist / np.float32(soft * px(size)), 0.0, 1.0)


def paint(img: np.ndarray, mask: np.ndarray, value: float | np.ndarray) -> None:
    """In place: img = img·(1−mask) + value·mask (value a scalar, or an RGB triple for H×W×3 images)."""
    if img.ndim == 3:
        img += (np.asarray(value, np.float32)[None, None, :] - img) * mask[..., None]
    else:
        img += (np.float32(value) - img) * mask


def smooth_noise(rng: np.random.Generator, size: int, cells: int | tuple[int, int]) -> np.ndarray:
    """Unit-variance-ish low-frequency noise: a (rows, cols) grid of normals upsampled bicubically to size×size."""
    rows, cols = (cells, cells) if isinstance(cells, int) else cells
    n = rng.standard_normal((rows, cols)).astype(np.float32)
    return np.asarray(Image.fromarray(n).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def finish_gray(img: np.ndarray, noise: np.random.Generator, *, blur_px: float, sigma: float) -> Image.Image:
    """Blur (scanner PSF), add grain, quantise; returns an RGB image with R == G == B."""
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if blur_px > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur_px))
    arr = np.asarray(im, dtype=np.float32) + noise.normal(0.0, sigma, img.shape).astype(np.float32)
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def finish_rgb(img: np.ndarray, noise: np.random.Generator, *, blur_px: float, sigma: float) -> Image.Image:
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if blur_px > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur_px))
    arr = np.asarray(im, dtype=np.float32) + noise.normal(0.0, sigma, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def lesion_radii(f: Findings, rng: np.random.Generator, small: tuple[float, float], large: tuple[float, float]) -> np.ndarray:
    """Radii (units) of the `f.count` lesions; large ones shrink a little as the count grows so three still fit apart."""
    lo, hi = small if f.size == "small" else (large[0] - 0.5 * (f.count - 1), large[1] - 1.0 * (f.count - 1))
    return rng.uniform(lo, hi, f.count)


def place_disks(
    rng: np.random.Generator,
    radii: np.ndarray,
    area: tuple[float, float, float, float],
    *,
    half: str | None = None,
    gap: float = 3.0,
    margin: float = 2.0,
    inside: tuple[float, float, float, float] | None = None,
    restarts: int = 32,
    candidates: int = 64,
) -> list[tuple[float, float, float]]:
    """Centres for disks of `radii` (units) drawn in the ellipse `area` = (cx, cy, ax, ay), `gap` units apart.

    With `half` ("left"/"right" image half) every disk lies wholly on that side of the midline (`margin` units clear);
    with `inside` = (cx, cy, ax, ay) every disk lies wholly inside that ellipse (approximately).
    Deterministic and bounded: `restarts` greedy placements run side by side, each disk taking the first of
    `candidates` points that fits; the first placement where every disk fits wins, else the one that comes
    closest, so an impossible request still returns a picture and never loops.
    """
    cx, cy, ax, ay = area
    R, C = restarts, candidates
    chosen: list[tuple[np.ndarray, np.ndarray, float]] = []
    worst = np.full(R, np.inf)
    for r in np.asarray(radii, np.float64):
        t = rng.uniform(0, 2 * np.pi, (R, C))
        s = np.sqrt(rng.uniform(0, 1, (R, C)))
        x, y = cx + ax * s * np.cos(t), cy + ay * s * np.sin(t)
        slack = np.full((R, C), np.inf)
        if half == "right":
            slack = np.minimum(slack, x - r - (MID + margin))
        elif half == "left":
            slack = np.minimum(slack, (MID - margin) - (x + r))
        if inside is not None:
            icx, icy, iax, iay = inside
            sax, say = max(iax - r, 1e-3), max(iay - r, 1e-3)
            slack = np.minimum(slack, (1 - np.hypot((x - icx) / sax, (y - icy) / say)) * min(sax, say))
        for px_, py_, pr in chosen:
            slack = np.minimum(slack, np.hypot(x - px_[:, None], y - py_[:, None]) - (r + pr + gap))
        ok = slack >= 0
        idx = np.where(ok.any(axis=1), ok.argmax(axis=1), slack.argmax(axis=1))
        rows = np.arange(R)
        chosen.append((x[rows, idx], y[rows, idx], float(r)))
        worst = np.minimum(worst, slack[rows, idx])
    fits = np.flatnonzero(worst >= 0)
    i = int(fits[0]) if fits.size else int(np.argmax(worst))
    return [(float(px_[i]), float(py_[i]), pr) for px_, py_, pr in chosen]


def lesion_half(f: Findings) -> str | None:
    """Image half of the lesions of `f` (radiological convention), None without a lesion or side."""
    return image_half(f.side) if f.lesion and f.side else None
