"""X-ray: a PA chest radiograph (bone and soft tissue bright, air dark), patient's left on the image right.

Neck and shoulders, two dark lung fields with vascular markings, spine and
mediastinum, the heart bulging towards the patient's left, aortic knob, ribs as
curved bands across the lungs, clavicles, gastric bubble under the left
hemidiaphragm. Lesions: bright round nodules in one lung.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .findings import Findings
from .render_common import MID, band, ellipse, finish_gray, grid, lesion_half, lesion_radii, paint, place_disks, smooth_noise

SMALL = (4.0, 6.0)
LARGE = (9.0, 12.0)  # for one lesion; see lesion_radii


def render_xray(f: Findings, anat: np.random.Generator, les: np.random.Generator, noise: np.random.Generator, size: int) -> Image.Image:
    j = anat.uniform(-1, 1, 12)
    cx = MID + 2 * j[0]
    tone = 8 * j[1]
    k = size / 128
    yy, xx = grid(size)

    img = np.full((size, size), 12.0, np.float32)
    paint(img, ellipse(size, cx, 86, 68, 76, soft=3), 150 + tone)  # thorax and abdomen
    for sgn in (-1, 1):
        paint(img, ellipse(size, cx + sgn * 40, 26, 34, 15, angle=sgn * 0.18, soft=3), 146 + tone)  # shoulders
    paint(img, ellipse(size, cx, 4, 15, 24, soft=2), 156 + tone)  # neck

    ly = 61 + 2 * j[2]
    lungs = [(cx - 27, ly, 22 * (1 + 0.04 * j[3]), 40, 0.07), (cx + 27, ly + 2, 21 * (1 + 0.04 * j[4]), 39, -0.07)]
    lung_mask = np.zeros((size, size), np.float32)
    for lx, lyy, lax, lay, ang in lungs:
        lung_mask = np.maximum(lung_mask, ellipse(size, lx, lyy, lax, lay, angle=ang, soft=2.5))
    lung_mask *= np.clip((yy - 22) / 14, 0.0, 1.0) * 0.3 + 0.7  # apices overlapped by soft tissue
    paint(img, lung_mask, 52 + tone)
    img += lung_mask * 12 * ((np.abs(xx - cx) - 27) / 22)  # darker laterally

    # vascular markings fanning out from the hila
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for lx, lyy, _, _, _ in lungs:
        sgn = -1 if lx < cx else 1
        hx, hy = cx + sgn * 11, lyy + 4
        for a, length in zip(anat.uniform(-1.1, 1.1, 10), anat.uniform(10, 24, 10)):
            ex, ey = hx + sgn * np.cos(a) * length, hy + np.sin(a) * length
            draw.line([(hx * k, hy * k), (ex * k, ey * k)], fill=255, width=max(1, round(1.3 * k)))
    vessels = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.9 * k)), np.float32) / 255
    img += vessels * lung_mask * 34

    # posterior ribs: arcs curving down laterally from the spine, visible mostly over the lungs
    d = np.abs(xx - cx)
    ribs = np.zeros((size, size), np.float32)
    for i in range(9):
        y0 = 20 + 8.6 * i + 0.8 * j[5]
        ribs = np.maximum(ribs, band(size, y0 + 0.11 * d + 0.0075 * d * d, 2.6, soft=1.5) * (d > 7) * (d < 54))
    img += ribs * (10 + 24 * lung_mask)
    img += band(size, 25 - 0.22 * d + 0.0035 * d * d, 3.6, soft=1.5) * (d > 5) * (d < 42) * 40  # clavicles

    paint(img, np.clip(1 - (np.abs(xx - cx) - 8) / 2.5, 0, 1) * (yy > 14), 176 + tone)  # mediastinum
    img += np.clip(1 - (np.abs(xx - cx) - 4.5) / 1.5, 0, 1) * (10 - 8 * (np.sin(yy * 2 * np.pi / 8) > 0.8))  # spine
    paint(img, ellipse(size, cx, 28, 2.6, 20, soft=2), 118 + tone)  # trachea
    paint(img, ellipse(size, cx + 8, 86 + 2 * j[7], 24 * (1 + 0.08 * j[8]), 19, angle=-0.3, soft=2.5), 180 + tone)  # heart
    paint(img, ellipse(size, cx + 8, 42, 6.5, 5.5, soft=2), 170 + tone)  # aortic knob
    paint(img, ellipse(size, cx + 30, 107, 7, 4, soft=2), 95 + tone)  # gastric bubble
    img += 4 * smooth_noise(anat, size, 12)

    if f.lesion:
        half = lesion_half(f)
        lx, lyy, lax, _, _ = lungs[0] if half == "left" else lungs[1]
        radii = lesion_radii(f, les, SMALL, LARGE)
        ox = -3 if half == "left" else 3
        for x, y, r in place_disks(les, radii, (lx + ox, lyy - 4, 15, 30), half=half, inside=(lx + ox, lyy - 2, lax + 3, 42), gap=5):
            m = ellipse(size, x, y, r, r * les.uniform(0.9, 1.1), soft=2.0)
            img += m * (95 + 25 * ellipse(size, x, y, r * 0.6, r * 0.6, soft=3))
    return finish_gray(img, noise, blur_px=0.7 * size / 128, sigma=3.0)
