"""PIL-only heatmap (the paper's Fig. 5 for our model): geometry, colours, validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from medmoe_edge.heatmap import HeatmapLayout, colormap, render_heatmap

ROWS = ["CT", "MRI", "X-ray", "Pathology"]
COLS = [f"expert {i}" for i in range(4)]
MATRIX = [
    [0.0, 0.25, 0.5, 1.0],
    [0.1, 0.7, 0.1, 0.1],
    [0.25, 0.25, 0.25, 0.25],
    [1.0, 0.0, 0.0, 0.0],
]


def _lum(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[Path, HeatmapLayout, Image.Image]:
    out = tmp_path / "fig5.png"
    layout = render_heatmap(MATRIX, ROWS, COLS, "Image tokens per expert", out)
    with Image.open(out) as im:
        im.load()
        return out, layout, im.convert("RGB")


def test_png_written_with_reasonable_size(rendered) -> None:
    out, layout, im = rendered
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert im.size == (layout.width, layout.height)
    assert 200 <= im.width <= 2000 and 150 <= im.height <= 2000
    # no temporary files left next to the output
    assert [p.name for p in out.parent.iterdir()] == ["fig5.png"]


def test_layout_geometry(rendered) -> None:
    _, layout, _ = rendered
    assert len(layout.cells) == 4 and all(len(r) == 4 for r in layout.cells)
    for r in range(4):
        for c in range(4):
            x0, y0, x1, y1 = layout.cells[r][c]
            assert 0 <= x0 < x1 <= layout.width and 0 <= y0 < y1 <= layout.height
            if c:
                assert x0 >= layout.cells[r][c - 1][2]  # columns left to right
            if r:
                assert y0 >= layout.cells[r - 1][c][3]  # rows top to bottom
    bx0, by0, bx1, by1 = layout.colorbar
    assert bx0 > layout.cells[0][-1][2]  # colour bar right of the grid
    assert layout.title_box[3] <= layout.cells[0][0][1]  # title above the grid


def test_cell_colours(rendered) -> None:
    _, layout, im = rendered
    # Sample just inside the cell corner, away from the value text.
    def fill(r: int, c: int) -> tuple[int, int, int]:
        x0, y0, _, _ = layout.cells[r][c]
        return im.getpixel((x0 + 4, y0 + 4))

    assert fill(0, 3) == colormap(1.0)
    assert fill(0, 0) == colormap(0.0)
    assert _lum(fill(0, 3)) < _lum(fill(0, 0)) - 100  # value 1.0 much darker than 0.0
    assert _lum(fill(3, 0)) < _lum(fill(3, 1))
    # monotone: darker as the value grows along row 0 (0, .25, .5, 1)
    lums = [_lum(fill(0, c)) for c in range(4)]
    assert lums == sorted(lums, reverse=True)


def test_value_text_contrasts_with_fill(rendered) -> None:
    _, layout, im = rendered

    def pixels(r: int, c: int) -> list[tuple[int, int, int]]:
        x0, y0, x1, y1 = layout.cells[r][c]
        return [im.getpixel((x, y)) for x in range(x0 + 2, x1 - 2) for y in range(y0 + 2, y1 - 2)]

    dark_cell = pixels(0, 3)  # 1.0: white text on dark blue
    light_cell = pixels(0, 0)  # 0.0: black text on near-white
    assert any(_lum(p) > 230 for p in dark_cell)
    assert any(_lum(p) < 40 for p in light_cell)


def test_colorbar_runs_dark_top_to_light_bottom(rendered) -> None:
    _, layout, im = rendered
    x0, y0, x1, y1 = layout.colorbar
    xm = (x0 + x1) // 2
    assert _lum(im.getpixel((xm, y0 + 2))) < _lum(im.getpixel((xm, y1 - 3)))


def test_colormap_endpoints_and_clamping() -> None:
    assert colormap(0.0) == (247, 251, 255)
    assert colormap(1.0) == (8, 48, 107)
    assert colormap(-1) == colormap(0.0) and colormap(2) == colormap(1.0)
    lums = [_lum(colormap(i / 20)) for i in range(21)]
    assert all(a > b for a, b in zip(lums, lums[1:]))


def test_overwrites_existing_file_and_custom_format(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "h.png"
    out.parent.mkdir()
    out.write_bytes(b"old")
    layout = render_heatmap([[0.5]], ["a"], ["b"], "", out, value_format="{:.2f}")
    with Image.open(out) as im:
        assert im.size == (layout.width, layout.height)
    assert sorted(p.name for p in out.parent.iterdir()) == ["h.png"]


@pytest.mark.parametrize(
    ("matrix", "rows", "cols", "match"),
    [
        ([[0.1, 0.2], [0.3]], ["a", "b"], ["x", "y"], "ragged matrix"),
        ([[0.1, 0.2]], ["a", "b"], ["x", "y"], "row label count mismatch"),
        ([[0.1, 0.2]], ["a"], ["x"], "column label count mismatch"),
        ([[0.1, 1.5]], ["a"], ["x", "y"], r"outside \[0, 1\]"),
        ([[-0.01, 0.5]], ["a"], ["x", "y"], r"outside \[0, 1\]"),
        ([[math.nan, 0.5]], ["a"], ["x", "y"], r"outside \[0, 1\]"),
        ([["high", 0.5]], ["a"], ["x", "y"], "not a number"),
        ([], [], [], "no rows"),
        ([[]], ["a"], [], "no columns"),
    ],
)
def test_validation_errors(tmp_path: Path, matrix, rows, cols, match) -> None:
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=match):
        render_heatmap(matrix, rows, cols, "t", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
