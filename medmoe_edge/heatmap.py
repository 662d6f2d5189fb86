"""PNG heatmaps drawn with Pillow only (no matplotlib).

Used to draw the paper's Fig. 5 for our model: for each imaging domain (rows),
the share of its image tokens routed to each expert (columns). Values are
fractions in [0, 1]; each cell is coloured on a white -> dark-blue ramp and
carries its value as text, with a colour bar on the right.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["Box", "HeatmapLayout", "colormap", "render_heatmap"]

Box = tuple[int, int, int, int]
"""A pixel rectangle ``(x0, y0, x1, y1)``, x1/y1 exclusive."""

# Sequential white -> dark-blue ramp (anchor colours sampled from ColorBrewer
# "Blues"); colours in between are linearly interpolated in RGB.
_RAMP: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.00, (247, 251, 255)),
    (0.25, (198, 219, 239)),
    (0.50, (107, 174, 214)),
    (0.75, (33, 113, 181)),
    (1.00, (8, 48, 107)),
)

_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_GRID = (255, 255, 255)
_FRAME = (190, 190, 190)
_MARGIN = 16
_PAD = 8  # space between a label and the grid
_BAR_GAP = 24  # space between the grid and the colour bar
_BAR_WIDTH = 18
_TICK = 4
_BAR_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def colormap(value: float) -> tuple[int, int, int]:
    """RGB colour of ``value`` (clamped to [0, 1]) on the white -> dark-blue ramp."""
    v = min(1.0, max(0.0, float(value)))
    for (x0, c0), (x1, c1) in zip(_RAMP, _RAMP[1:]):
        if v <= x1:
            t = (v - x0) / (x1 - x0)
            return tuple(round(a + (b - a) * t) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return _RAMP[-1][1]


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (perceived luminance, ITU-R BT.601)."""
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b >= 140 else (255, 255, 255)


@dataclass(frozen=True)
class HeatmapLayout:
    """Geometry of a rendered heatmap, in pixels of the written PNG.

    ``cells[r][c]`` is the box of matrix entry ``(r, c)``; ``colorbar`` is the
    box of the colour-bar gradient (value 1 at the top, 0 at the bottom).
    """

    width: int
    height: int
    cells: tuple[tuple[Box, ...], ...]
    colorbar: Box
    title_box: Box

    def cell_center(self, row: int, col: int) -> tuple[int, int]:
        """Pixel at the centre of cell ``(row, col)``."""
        x0, y0, x1, y1 = self.cells[row][col]
        return (x0 + x1) // 2, (y0 + y1) // 2


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font, at ``size`` pixels where this Pillow supports it
    (``load_default(size=...)``, Pillow >= 10.1 with FreeType), else the fixed
    bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()


def _validate(
    matrix: Sequence[Sequence[float]], row_labels: list[str], col_labels: list[str]
) -> list[list[float]]:
    rows = [list(r) for r in matrix]
    if not rows:
        raise ValueError("matrix has no rows")
    n_cols = len(rows[0])
    if n_cols == 0:
        raise ValueError("matrix has no columns")
    for i, r in enumerate(rows):
        if len(r) != n_cols:
            raise ValueError(f"ragged matrix: row 0 has {n_cols} values but row {i} has {len(r)}")
    if len(row_labels) != len(rows):
        raise ValueError(f"row label count mismatch: {len(row_labels)} row labels for {len(rows)} matrix rows")
    if len(col_labels) != n_cols:
        raise ValueError(
            f"column label count mismatch: {len(col_labels)} column labels for {n_cols} matrix columns"
        )
    out: list[list[float]] = []
    for i, r in enumerate(rows):
        vals = []
        for j, v in enumerate(r):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"matrix[{i}][{j}] = {v!r} is not a number") from None
            if not (0.0 <= f <= 1.0):  # also rejects NaN
                raise ValueError(f"matrix[{i}][{j}] = {f!r} is outside [0, 1]")
            vals.append(f)
        out.append(vals)
    return out


def _atomic_save(image: Image.Image, path: Path) -> None:
    """Write ``image`` as PNG to ``path`` via a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _place(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, fill, anchor: str) -> None:
    """Draw ``text`` with its ink box anchored at ``xy``.

    ``anchor`` is two letters like Pillow's: horizontal ``l``/``m``/``r`` and
    vertical ``t``/``m``/``b`` of the text's bounding box. Computed from
    ``textbbox`` rather than Pillow's own ``anchor=`` so it also works with the
    bitmap default font (which only supports the default anchor).
    """
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x, y = xy
    h, v = anchor
    dx = {"l": x0, "m": (x0 + x1) / 2, "r": x1}[h]
    dy = {"t": y0, "m": (y0 + y1) / 2, "b": y1}[v]
    draw.text((round(x - dx), round(y - dy)), text, fill=fill, font=font)


def render_heatmap(
    matrix: Sequence[Sequence[float]],
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    path: Path,
    *,
    value_format: str = "{:.0%}",
) -> HeatmapLayout:
    """Write a PNG heatmap of ``matrix`` (values in [0, 1]) to ``path`` atomically.

    Rows are labelled on the left with ``row_labels`` (e.g. imaging domains),
    columns on top with ``col_labels`` (e.g. ``"expert 0"``..``"expert 3"``).
    Each cell is filled by :func:`colormap` of its value and shows the value
    formatted with ``value_format`` in black or white, whichever contrasts with
    the fill; a colour bar with ticks at 0, 25, 50, 75 and 100 % sits on the right.

    Raises ValueError for an empty or ragged matrix, a label count that does not
    match the matrix, or a value outside [0, 1] (or not a number). Returns the
    :class:`HeatmapLayout` of what was drawn.
    """
    values = _validate(matrix, row_labels, col_labels)
    path = Path(path)
    n_rows, n_cols = len(values), len(values[0])

    font = _font(14)
    title_font = _font(18)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str, f=font) -> tuple[int, int]:
        x0, y0, x1, y1 = scratch.textbbox((0, 0), text, font=f)
        return x1 - x0, y1 - y0

    cell_texts = [[value_format.format(v) for v in row] for row in values]
    tick_texts = [value_format.format(t) for t in _BAR_TICKS]
    line_h = size("Ag0%")[1]

    cell_w = max(
        64,
        max(size(t)[0] for t in col_labels) + 12,
        max(size(t)[0] for row in cell_texts for t in row) + 16,
    )
    cell_h = max(36, line_h + 20)
    row_label_w = max(size(t)[0] for t in row_labels)
    title_w, title_h = size(title, title_font) if title else (0, 0)
    tick_w = max(size(t)[0] for t in tick_texts)

    grid_w, grid_h = n_cols * cell_w, n_rows * cell_h
    # Labels + grid + colour bar + tick labels, centred if the title is wider.
    content_w = row_label_w + _PAD + grid_w + _BAR_GAP + _BAR_WIDTH + _TICK + 4 + tick_w
    width = max(content_w, title_w) + 2 * _MARGIN
    grid_x0 = (width - content_w) // 2 + row_label_w + _PAD
    grid_y0 = _MARGIN + (title_h + 2 * _PAD if title else 0) + line_h + _PAD
    bar_x0 = grid_x0 + grid_w + _BAR_GAP
    height = grid_y0 + grid_h + line_h // 2 + _MARGIN

    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)

    # Title, centred over the whole image.
    title_box: Box = (0, 0, 0, 0)
    if title:
        tx = (width - title_w) // 2
        _place(draw, (tx, _MARGIN), title, title_font, _INK, "lt")
        title_box = (tx, _MARGIN, tx + title_w, _MARGIN + title_h)

    # Column labels, centred above their column.
    for c, label in enumerate(col_labels):
        cx = grid_x0 + c * cell_w + cell_w // 2
        _place(draw, (cx, grid_y0 - _PAD), label, font, _INK, "mb")

    # Cells and row labels.
    cells: list[tuple[Box, ...]] = []
    for r in range(n_rows):
        y0 = grid_y0 + r * cell_h
        _place(draw, (grid_x0 - _PAD, y0 + cell_h // 2), row_labels[r], font, _INK, "rm")
        row_boxes: list[Box] = []
        for c in range(n_cols):
            x0 = grid_x0 + c * cell_w
            box: Box = (x0, y0, x0 + cell_w, y0 + cell_h)
            fill = colormap(values[r][c])
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill, outline=_GRID)
            _place(draw, (x0 + cell_w // 2, y0 + cell_h // 2), cell_texts[r][c], font, _text_colour(fill), "mm")
            row_boxes.append(box)
        cells.append(tuple(row_boxes))
    # Thin frame so near-white cells stay visible against the background.
    draw.rectangle((grid_x0 - 1, grid_y0 - 1, grid_x0 + grid_w, grid_y0 + grid_h), outline=_FRAME)

    # Colour bar: one line per pixel row, 1 at the top, 0 at the bottom.
    bar: Box = (bar_x0, grid_y0, bar_x0 + _BAR_WIDTH, grid_y0 + grid_h)
    span = max(1, grid_h - 1)
    for y in range(grid_h):
        draw.line([(bar[0], grid_y0 + y), (bar[2] - 1, grid_y0 + y)], fill=colormap(1.0 - y / span))
    draw.rectangle((bar[0], bar[1], bar[2] - 1, bar[3] - 1), outline=_INK)
    for t, text in zip(_BAR_TICKS, tick_texts):
        y = grid_y0 + round((1.0 - t) * span)
        draw.line([(bar[2], y), (bar[2] + _TICK - 1, y)], fill=_INK)
        _place(draw, (bar[2] + _TICK + 4, y), text, font, _INK, "lm")

    _atomic_save(image, path)
    return HeatmapLayout(width=width, height=height, cells=tuple(cells), colorbar=bar, title_box=title_box)
