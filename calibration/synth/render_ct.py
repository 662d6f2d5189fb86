"""CT: an axial slice in a soft-tissue window, grey on black, anterior up, patient's left on the image right.

"chest": two dark lung fields, heart towards the patient's left, ribs as bright
arcs at the edge of the thorax, sternum, scapulae, vertebra.
"abdomen": liver on the patient's right (image left), stomach and spleen on the
left, enhancing kidneys either side of the vertebra, aorta, bowel gas.
Lesions: hyperdense nodules in a lung (chest); hypodense masses (abdomen).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .findings import Findings
from .render_common import MID, ellipse, finish_gray, grid, lesion_half, lesion_radii, paint, place_disks, ring, smooth_noise

SMALL = (4.0, 6.0)  # lesion radius in units (= pixels at 128)
LARGE = (9.0, 12.0)  # for one lesion; see lesion_radii


def render_ct(f: Findings, anat: np.random.Generator, les: np.random.Generator, noise: np.random.Generator, size: int) -> Image.Image:
    j = anat.uniform(-1, 1, 16)  # jitters, always the same number of draws
    bx, by = MID + 2.5 * j[0], 66 + 2.5 * j[1]
    sc = 1 + 0.05 * j[2]
    ax, ay = 57 * sc, 43 * sc * (1 + 0.04 * j[3])
    tone = 6 * j[4]

    img = np.zeros((size, size), np.float32)
    paint(img, ellipse(size, bx, by, ax, ay), 72 + tone)  # subcutaneous fat
    paint(img, ellipse(size, bx, by, ax - 5, ay - 5), 118 + tone)  # muscle wall
    if f.region == "chest":
        _chest(img, f, anat, les, size, bx, by, ax, ay, j, tone)
    else:
        _abdomen(img, f, anat, les, size, bx, by, ax, ay, j, tone)
    _spine(img, size, bx, by, tone)
    body = ellipse(size, bx, by, ax, ay)
    img += body * (4.0 * smooth_noise(noise, size, 24))  # mottled tissue texture
    return finish_gray(img, noise, blur_px=0.6 * size / 128, sigma=4.0)


def _spine(img: np.ndarray, size: int, bx: float, by: float, tone: float) -> None:
    paint(img, ellipse(size, bx, by + 23, 8.5, 7.5), 205 + tone)  # vertebral body
    paint(img, ellipse(size, bx, by + 23, 6.0, 5.0), 170 + tone)  # cancellous bone
    paint(img, ring(size, bx, by + 33, 6.5, 5.5, 2.2), 210 + tone)  # neural arch
    paint(img, ellipse(size, bx, by + 33, 4.3, 3.3), 60 + tone)  # spinal canal
    paint(img, ellipse(size, bx, by + 40, 2.0, 3.5), 200 + tone)  # spinous process


def _chest(img, f, anat, les, size, bx, by, ax, ay, j, tone) -> None:
    lung_y = by - 5
    lungs = [(bx - 25 + 1.5 * j[5], lung_y, 20 * (1 + 0.04 * j[6]), 28), (bx + 26 + 1.5 * j[7], lung_y, 19 * (1 + 0.04 * j[8]), 27)]
    for lx, ly, lax, lay in lungs:
        paint(img, ellipse(size, lx, ly, lax, lay, angle=0.12 if lx > bx else -0.12), 14)
    # vessels: a few faint dots and short strands in each lung
    yy, xx = grid(size)
    pts = anat.uniform(-0.8, 0.8, (2, 10, 2))
    for (lx, ly, lax, lay), p in zip(lungs, pts):
        for dx, dy in p:
            paint(img, ellipse(size, lx + dx * lax * 0.7, ly + dy * lay * 0.7, 1.1, 1.1, soft=1.5), 55)
    paint(img, ellipse(size, bx + 6, by - 8, 15, 17, angle=-0.3), 125 + tone)  # heart, towards patient's left
    paint(img, ellipse(size, bx - 3, by - 24, 8, 6), 122 + tone)  # great vessels
    paint(img, ellipse(size, bx + 7, by + 13, 4.5, 4.5), 138 + tone)  # descending aorta
    paint(img, ellipse(size, bx, by - ay + 7, 6, 2.8), 205 + tone)  # sternum
    # ribs: bright arc segments just inside the chest wall
    theta = np.arctan2((yy - by) / ay, (xx - bx) / ax)
    period = 2 * np.pi / 13
    seg = ((theta - anat.uniform(0, period)) % period) < period * 0.42
    side_ok = np.abs(np.sin(theta)) < 0.93  # no ribs over the sternum and spine
    paint(img, ring(size, bx, by, ax - 6, ay - 6, 3.0) * seg * side_ok, 215 + tone)
    for sgn in (-1, 1):  # scapulae, posterolateral
        paint(img, ellipse(size, bx + sgn * 37, by + 26, 13, 2.2, angle=-sgn * 0.55), 200 + tone)
    if f.lesion:
        half = lesion_half(f)
        lx, ly, lax, lay = lungs[0] if half == "left" else lungs[1]
        out = -3 if half == "left" else 3  # away from the mediastinum
        radii = lesion_radii(f, les, SMALL, LARGE)
        for x, y, r in place_disks(les, radii, (lx + out, ly, lax, lay), half=half, inside=(lx + out, ly, lax + 6, lay + 5), gap=5):
            paint(img, ellipse(size, x, y, r, r * les.uniform(0.9, 1.1), soft=1.5), 160 + tone)
            paint(img, ellipse(size, x, y, r * 0.6, r * 0.6, soft=2), 175 + tone)


def _abdomen(img, f, anat, les, size, bx, by, ax, ay, j, tone) -> None:
    paint(img, ellipse(size, bx - 21 + 1.5 * j[5], by - 6, 28 * (1 + 0.06 * j[6]), 25, angle=0.35), 146 + tone)  # liver
    paint(img, ellipse(size, bx - 15, by + 4, 5, 4), 95 + tone)  # gallbladder
    paint(img, ellipse(size, bx + 21, by - 15, 15, 10, angle=-0.2), 100 + tone)  # stomach
    paint(img, ellipse(size, bx + 24, by - 21, 9, 3.5, angle=-0.2), 8)  # gastric air
    paint(img, ellipse(size, bx + 36 + j[7], by + 6, 8, 14, angle=-0.4), 140 + tone)  # spleen
    for sgn in (-1, 1):
        kx = bx + sgn * 22
        paint(img, ellipse(size, kx, by + 18, 8, 11, angle=sgn * 0.35), 178 + tone)  # kidney cortex
        paint(img, ellipse(size, kx - sgn * 3, by + 18, 3.5, 4.5, angle=sgn * 0.35), 105 + tone)  # renal sinus
        paint(img, ellipse(size, bx + sgn * 11, by + 25, 5.5, 7), 112 + tone)  # psoas
    paint(img, ellipse(size, bx + 4, by + 11, 4.2, 4.2), 185 + tone)  # aorta
    paint(img, ellipse(size, bx - 7, by + 11, 4.5, 3.2), 150 + tone)  # IVC
    # bowel loops with gas in the anterior midline
    loops = anat.uniform(-1, 1, (6, 4))
    for dx, dy, g, a in loops:
        x, y = bx + 4 + 11 * dx, by - 16 + 7 * dy
        paint(img, ellipse(size, x, y, 7.5, 3.5, angle=1.6 * a), 108 + tone)
        paint(img, ellipse(size, x + 1.5 * g, y, 3.0 + 0.8 * g, 1.3, angle=1.6 * a), 10)
    if f.lesion:
        half = lesion_half(f)
        cx = bx - 30 if half == "left" else bx + 30
        radii = lesion_radii(f, les, SMALL, LARGE)
        for x, y, r in place_disks(les, radii, (cx, by - 3, 22, 30), half=half, inside=(bx, by, ax - 4, ay - 4), gap=7):
            paint(img, ellipse(size, x, y, r + 1.3, (r + 1.3) * les.uniform(0.92, 1.08), soft=1.2), 182 + tone)  # enhancing rim
            paint(img, ellipse(size, x, y, r - 0.3, r - 0.3, soft=1.5), 50 + tone)  # hypodense centre
