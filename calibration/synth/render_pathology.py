"""Pathology: an H&E-stained section (RGB), pink eosinophilic tissue with purple-blue haematoxylin nuclei.

"colon": crypts cut across, rings of basal nuclei around pale mucinous
epithelium and a small lumen, in a lamina propria with scattered lymphocytes.
"liver": plates of regular hepatocytes with round central nuclei and pale
sinusoids radiating from a central vein. "lung": a lace of thin alveolar walls
with flat nuclei around large empty air spaces.
Lesion ("tumour"): a cluster of large, crowded, pleomorphic dark nuclei on
purple cytoplasm; count = number of clusters. No laterality.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .findings import Findings
from .render_common import finish_rgb, lesion_radii, place_disks, smooth_noise

SMALL = (9.0, 11.0)  # tumour cluster radius in units
LARGE = (17.0, 21.0)

_ANGLES = {n: np.linspace(0, 2 * np.pi, n, endpoint=False) for n in (8, 10, 12, 16, 20)}


class _Pen:
    """Draws filled polygons given in canvas units (128 across) on a PIL image of any size, many at a time."""

    def __init__(self, im: Image.Image, size: int, rng: np.random.Generator) -> None:
        self.draw = ImageDraw.Draw(im)
        self.k = size / 128
        self.rng = rng

    def blobs(self, x, y, rx, ry, color, *, angle=0.0, jag: float = 0.0, n: int = 10) -> None:
        """Ellipses (irregular when jag > 0) at arrays x, y; color an RGB triple or an (m, 3) array."""
        x, y, rx, ry, angle = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, np.float64)) for v in (x, y, rx, ry, angle)))
        m = x.shape[0]
        t = _ANGLES[n]
        r = 1 + jag * self.rng.standard_normal((m, n)) if jag else np.ones((1, n))
        ex, ey = rx[:, None] * r * np.cos(t), ry[:, None] * r * np.sin(t)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        pts = np.empty((m, n, 2))
        pts[..., 0] = (x[:, None] + ex * c - ey * s) * self.k
        pts[..., 1] = (y[:, None] + ex * s + ey * c) * self.k
        cols = np.clip(np.rint(np.broadcast_to(np.asarray(color, np.float64), (m, 3))), 0, 255).astype(int).tolist()
        for p, col in zip(pts.reshape(m, 2 * n).tolist(), cols):
            self.draw.polygon(p, fill=tuple(col))

    def line(self, pts: np.ndarray, color: tuple[int, int, int], width: float) -> None:
        self.draw.line((pts * self.k).ravel().tolist(), fill=color, width=max(1, round(width * self.k)))


def render_pathology(f: Findings, anat: np.random.Generator, les: np.random.Generator, noise: np.random.Generator, size: int) -> Image.Image:
    stain = anat.uniform(-1, 1, 6)
    eosin = np.array([234, 164, 198]) + np.array([6, 10, 8]) * stain[:3]
    hema = np.array([88, 48, 138]) + np.array([12, 10, 14]) * stain[3:]
    base = np.empty((size, size, 3), np.float32)
    base[:] = eosin
    fibres = smooth_noise(anat, size, (28, 6))  # streaky collagen
    base += (10 * fibres)[..., None] * np.array([0.5, 1.0, 0.6], np.float32)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    pen = _Pen(im, size, anat)
    {"colon": _colon, "liver": _liver, "lung": _lung}[f.region](pen, anat, eosin, hema)
    if f.lesion:
        pen.rng = les
        radii = lesion_radii(f, les, SMALL, LARGE)
        for x, y, r in place_disks(les, radii, (64, 64, 44, 44), gap=10):
            _tumour(pen, les, x, y, r, hema)
    return finish_rgb(np.asarray(im), noise, blur_px=0.45 * size / 128, sigma=4.0)


def _colon(pen: _Pen, rng: np.random.Generator, eosin: np.ndarray, hema: np.ndarray) -> None:
    xy = rng.uniform(0, 128, (90, 2))  # lamina propria: lymphocytes, plasma cells
    pen.blobs(xy[:, 0], xy[:, 1], 1.4, 1.4, hema * 0.8, n=8)
    glands = place_disks(rng, rng.uniform(12.5, 16.0, 10), (64, 64, 68, 68), gap=5, restarts=4, candidates=32)
    for gx, gy, r in glands:
        pen.blobs(gx, gy, r, r * rng.uniform(0.85, 1.0), (214, 150, 196), angle=rng.uniform(0, np.pi), jag=0.05, n=16)  # basal cytoplasm
        pen.blobs(gx, gy, 0.72 * r, 0.72 * r, (230, 206, 228), jag=0.06, n=16)  # mucinous (goblet) epithelium
        m = int(2 * np.pi * r * 0.84 / 2.3)
        t = np.linspace(0, 2 * np.pi, m, endpoint=False) + rng.uniform(0, 1)
        rr = r * rng.uniform(0.79, 0.86, m)
        pen.blobs(gx + rr * np.cos(t), gy + rr * np.sin(t), 2.4, 1.05, hema * rng.uniform(0.85, 1.1, (m, 1)), angle=t, n=8)
        pen.blobs(gx, gy, 0.24 * r, 0.24 * r, (248, 238, 245), jag=0.12, n=12)  # lumen


def _liver(pen: _Pen, rng: np.random.Generator, eosin: np.ndarray, hema: np.ndarray) -> None:
    vx, vy = rng.uniform(35, 93, 2)
    for t in np.linspace(0, 2 * np.pi, 20, endpoint=False) + rng.uniform(0, 0.3):  # sinusoids between hepatocyte plates
        d = np.linspace(9, 110, 8)
        w = t + np.cumsum(rng.uniform(-0.09, 0.09, 8))
        pen.line(np.stack([vx + d * np.cos(w), vy + d * np.sin(w)], 1), (246, 214, 230), 2.0)
    pen.blobs(vx, vy, 9.5, 8.0, (250, 238, 245), angle=rng.uniform(0, np.pi), jag=0.06, n=16)  # central vein
    pen.blobs(vx + rng.uniform(-4, 4, 4), vy + rng.uniform(-3, 3, 4), 1.1, 1.1, (214, 80, 104), n=8)  # red cells in it
    spacing, g = 9.0, 16
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float64) * spacing
    xs += (np.arange(g)[:, None] % 2) * spacing / 2
    pts = np.stack([xs.ravel(), ys.ravel()], 1) + rng.uniform(-2.2, 2.2, (g * g, 2)) - 5
    shade = rng.uniform(0.88, 1.1, (g * g, 1))
    rad = rng.uniform(1.8, 2.5, g * g)
    u = rng.random(g * g)  # 10% of nuclei out of the plane of section, 7% binucleate
    keep = (np.hypot(pts[:, 0] - vx, pts[:, 1] - vy) >= 11) & (u >= 0.10)
    one, two = keep & (u >= 0.17), keep & (u < 0.17)
    pen.blobs(pts[one, 0], pts[one, 1], rad[one], rad[one], hema * shade[one], n=10)
    pen.blobs(pts[one, 0] + 0.3, pts[one, 1] - 0.3, 0.6, 0.6, hema * 0.6, n=8)  # nucleoli
    for dx in (-1.6, 1.6):
        pen.blobs(pts[two, 0] + dx, pts[two, 1], 1.6, 1.6, hema * shade[two], n=8)
    xy = rng.uniform(0, 128, (12, 2))  # Kupffer cells along the sinusoids
    pen.blobs(xy[:, 0], xy[:, 1], 2.2, 0.8, hema * 0.75, angle=np.arctan2(xy[:, 1] - vy, xy[:, 0] - vx), n=8)


def _lung(pen: _Pen, rng: np.random.Generator, eosin: np.ndarray, hema: np.ndarray) -> None:
    spacing, g = 21.0, 8
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float64) * spacing
    xs += (np.arange(g)[:, None] % 2) * spacing / 2
    centres = np.stack([xs.ravel(), ys.ravel()], 1) - 8 + rng.uniform(-3.5, 3.5, (g * g, 2))
    m = g * g
    radii = rng.uniform(10.0, 11.6, m)
    pen.blobs(centres[:, 0], centres[:, 1], radii, radii * rng.uniform(0.8, 1.05, m), (249, 236, 244),
              angle=rng.uniform(0, np.pi, m), jag=0.04, n=20)  # air spaces
    i, t = rng.integers(0, m, 70), rng.uniform(0, 2 * np.pi, 70)  # flat pneumocyte / endothelial nuclei on the walls
    r = radii[i] + 0.8
    pen.blobs(centres[i, 0] + r * np.cos(t), centres[i, 1] + r * np.sin(t), 2.3, 0.95, hema * rng.uniform(0.85, 1.1, (70, 1)), angle=t + np.pi / 2, n=8)
    i, t = rng.integers(0, m, 30), rng.uniform(0, 2 * np.pi, 30)  # red cells in the capillaries
    r = radii[i] + 1.0
    pen.blobs(centres[i, 0] + r * np.cos(t), centres[i, 1] + r * np.sin(t), 1.0, 1.0, (205, 72, 98), n=8)


def _tumour(pen: _Pen, rng: np.random.Generator, x: float, y: float, r: float, hema: np.ndarray) -> None:
    pen.blobs(x, y, r + 1.5, r + 1.5, (172, 98, 160), jag=0.07, n=20)  # crowded cytoplasm
    n = int(1.6 * r * r / 9)
    t = rng.uniform(0, 2 * np.pi, n)
    d = r * np.sqrt(rng.uniform(0, 1, n))
    pen.blobs(x + d * np.cos(t), y + d * np.sin(t), rng.uniform(2.2, 3.6, n), rng.uniform(1.8, 3.0, n), hema * rng.uniform(0.55, 0.78, (n, 1)),
              angle=rng.uniform(0, np.pi, n), jag=0.12, n=10)
