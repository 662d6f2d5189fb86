"""MRI: an axial brain slice, T2-FLAIR-like (CSF dark, grey matter brighter than white matter, lesions bright).

Dark background, bright scalp, dark skull ring, a gyrated cortical ribbon around
darker white matter, dark butterfly-shaped lateral ventricles, deep grey nuclei,
the interhemispheric fissure. Patient's left on the image right.
Lesions: bright round foci in one hemisphere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .findings import Findings
from .render_common import MID, ellipse, finish_gray, grid, lesion_half, lesion_radii, paint, place_disks, px, smooth_noise

SMALL = (4.0, 6.0)
LARGE = (9.0, 12.0)  # for one lesion; see lesion_radii


def render_mri(f: Findings, anat: np.random.Generator, les: np.random.Generator, noise: np.random.Generator, size: int) -> Image.Image:
    j = anat.uniform(-1, 1, 12)
    cx, cy = MID + 2 * j[0], MID + 2 * j[1]
    ax, ay = 45 * (1 + 0.04 * j[2]), 56 * (1 + 0.03 * j[3])
    ph1, ph2 = anat.uniform(0, 2 * np.pi, 2)
    gyri = 15 + int(anat.integers(0, 4))
    tone = 6 * j[4]

    img = np.zeros((size, size), np.float32)
    paint(img, ellipse(size, cx, cy, ax, ay), 150 + tone)  # scalp fat
    paint(img, ellipse(size, cx, cy, ax - 3.5, ay - 3.5), 22)  # skull (cortical bone: no signal)
    paint(img, ellipse(size, cx, cy, ax - 5.5, ay - 5.5), 70 + tone)  # diploe
    paint(img, ellipse(size, cx, cy, ax - 7, ay - 7), 30)  # inner table + CSF

    yy, xx = grid(size)
    bax, bay = ax - 9, ay - 9
    dx, dy = (xx - cx) / bax, (yy - cy) / bay
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    phase = gyri * theta + ph1
    wobble = np.sin(phase) + 0.4 * np.sin(2.3 * gyri * theta + ph2)
    scale = np.float32(min(bax, bay) / px(size))  # rho units -> pixels

    def soft_inside(radius: np.ndarray) -> np.ndarray:
        return np.clip((radius - rho) * scale + 0.5, 0.0, 1.0)

    cortex = soft_inside(1.0 - 0.025 * (1 - np.sin(phase)))
    paint(img, cortex, 158 + tone)  # grey matter
    wm = soft_inside(0.74 + 0.07 * wobble)
    paint(img, wm, 112 + tone)  # white matter, with fingers into the gyri
    sulci = np.clip(1 - (1 + np.sin(phase)) / 0.22, 0.0, 1.0) * (rho > 0.80 + 0.05 * np.sin(2.3 * gyri * theta + ph2))
    paint(img, sulci * cortex, 45)  # CSF in the sulci (dark on FLAIR)
    fissure = np.clip(1.2 - np.abs(xx - cx) / px(size), 0.0, 1.0) * (np.abs(dy) > 0.45) * cortex
    paint(img, fissure, 40)

    for sgn in (-1, 1):
        paint(img, ellipse(size, cx + sgn * 12, cy + 2, 6, 9, angle=sgn * 0.2), 140 + tone)  # basal ganglia / thalamus
    vs = 1 + 0.15 * j[5]  # ventricle size
    for sgn in (-1, 1):
        paint(img, ellipse(size, cx + sgn * 5, cy - 9, 3.3 * vs, 10 * vs, angle=-sgn * 0.38), 32)  # frontal horns
        paint(img, ellipse(size, cx + sgn * 7.5, cy + 11, 3.0 * vs, 8 * vs, angle=sgn * 0.35), 32)  # atria
    paint(img, ellipse(size, cx, cy + 1.5, 1.2, 5), 35)  # third ventricle

    head = ellipse(size, cx, cy, ax, ay)
    bias = 1 + 0.07 * smooth_noise(anat, size, 3)  # coil sensitivity
    img *= bias
    img += head * 5.0 * smooth_noise(noise, size, 32)

    if f.lesion:
        half = lesion_half(f)
        hx = cx - 20 if half == "left" else cx + 20
        radii = lesion_radii(f, les, SMALL, LARGE)
        for x, y, r in place_disks(les, radii, (hx, cy, 18, 40), half=half, inside=(cx, cy, bax + 1, bay + 1), gap=5):
            paint(img, ellipse(size, x, y, r + 0.6, r + 0.6, soft=1.5), 195 + tone)  # oedema halo
            paint(img, ellipse(size, x, y, r, r * les.uniform(0.92, 1.08), angle=les.uniform(0, np.pi), soft=1.5), 235)
    return finish_gray(img, noise, blur_px=0.55 * size / 128, sigma=3.5)
