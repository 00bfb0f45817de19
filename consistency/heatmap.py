"""The panel x panel similarity picture (Pillow + numpy): thumbnails of the panels along both axes, one cell
per pair coloured by its cosine similarity (values written in the cells when they are large enough), the
pairs of each character outlined in that character's colour, a colour bar and one legend line per character.

Text uses the pack's own font (story/fonts, through story.comic_typeset.FontSet), so the picture is the same
on every machine.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..story.comic import Rect, cover_image
from ..story.comic_typeset import FontSet

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (150, 150, 150)
# one colour per character, in story order (repeats after eight)
PALETTE = ((228, 26, 28), (55, 126, 184), (255, 127, 0), (152, 78, 163), (77, 175, 74), (247, 129, 191),
           (166, 86, 40), (0, 170, 170))
# similarity colour scale, low -> high: dark violet, blue, green, yellow
_SCALE_STOPS = np.array([0.0, 0.35, 0.7, 1.0])
_SCALE_RGB = np.array([(40, 20, 80), (40, 95, 160), (50, 165, 120), (250, 225, 70)], dtype=np.float64)
MARGIN = 12
GAP = 4


@dataclass(frozen=True)
class Group:
    """A character's rows in the matrix and its legend line."""

    name: str
    rows: tuple[int, ...]
    legend: str


def scale_colour(t: float) -> tuple[int, int, int]:
    """Colour of a position t in [0, 1] on the similarity scale."""
    t = min(1.0, max(0.0, float(t)))
    return tuple(round(float(np.interp(t, _SCALE_STOPS, _SCALE_RGB[:, c]))) for c in range(3))


def scale_floor(matrix: np.ndarray) -> float:
    """Bottom of the colour scale: the lowest off-diagonal value rounded down to 0.05, or to 0.01 when every
    value lies above 0.8 (so close values still get different colours); at most 0.99."""
    n = matrix.shape[0]
    if n < 2:
        return 0.0
    low = float(matrix[~np.eye(n, dtype=bool)].min())
    step = 0.01 if low > 0.8 else 0.05
    return min(0.99, math.floor(low / step + 1e-9) * step)


def cell_size(n: int) -> int:
    return int(min(96, max(14, round(640 / max(n, 1)))))


def _thumbnail(image: np.ndarray, size: int) -> Image.Image:
    pixels = np.clip(np.asarray(image, dtype=np.float32)[..., :3] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cover_image(Image.fromarray(pixels), Rect(0, 0, size, size))


def _outline(draw: ImageDraw.ImageDraw, rows: Sequence[int], origin: tuple[int, int], cell: int, colour, inset: int,
             width: int) -> None:
    """The boundary of the union of the cells (i, j), i and j in rows: a box per contiguous block of rows."""
    members = set(rows)
    x0, y0 = origin
    for i in members:
        for j in members:
            left, top = x0 + j * cell, y0 + i * cell
            right, bottom = left + cell - 1, top + cell - 1
            if i - 1 not in members:
                draw.line([(left, top + inset), (right, top + inset)], fill=colour, width=width)
            if i + 1 not in members:
                draw.line([(left, bottom - inset), (right, bottom - inset)], fill=colour, width=width)
            if j - 1 not in members:
                draw.line([(left + inset, top), (left + inset, bottom)], fill=colour, width=width)
            if j + 1 not in members:
                draw.line([(right - inset, top), (right - inset, bottom)], fill=colour, width=width)


@dataclass(frozen=True)
class Layout:
    """Where everything goes (pixels): the grid's top-left corner, the cell size, the colour bar, the legend."""

    n: int
    cell: int
    label_size: int
    label_w: int
    title_h: int
    grid_x: int
    grid_y: int
    bar_x: int
    bar_h: int
    legend_y: int
    legend_h: int
    width: int
    height: int


TEXT_SIZE, TITLE_SIZE = 13, 15


def plan_layout(n: int, labels: Sequence[str], legends: Sequence[str], title: str, fonts: FontSet) -> Layout:
    cell = cell_size(n)
    label_size = int(min(16, max(9, round(cell * 0.4))))
    label_w = int(max((fonts.width(str(t), label_size) for t in labels), default=0)) + GAP + 2
    title_h = fonts.line_metrics(TITLE_SIZE)[1] + GAP
    legend_h = fonts.line_metrics(TEXT_SIZE)[1]
    grid_x = MARGIN + label_w + cell + GAP
    grid_y = MARGIN + title_h + fonts.line_metrics(label_size)[1] + cell + GAP
    bar_x = grid_x + n * cell + 3 * GAP
    bar_h = max(n * cell, 120)
    legend_w = max((legend_h - 4 + GAP + fonts.width(text, TEXT_SIZE) for text in legends), default=0)
    width = int(max(bar_x + 16 + GAP + fonts.width("0.00", TEXT_SIZE) + MARGIN, MARGIN * 2 + legend_w,
                    MARGIN * 2 + fonts.width(title, TITLE_SIZE)))
    legend_y = grid_y + bar_h + 2 * GAP
    return Layout(n=n, cell=cell, label_size=label_size, label_w=label_w, title_h=title_h, grid_x=grid_x,
                  grid_y=grid_y, bar_x=bar_x, bar_h=bar_h, legend_y=legend_y, legend_h=legend_h, width=width,
                  height=int(legend_y + len(legends) * legend_h + MARGIN))


def render_heatmap(matrix, images, labels: Sequence[str], groups: Sequence[Group], title: str,
                   unscored: Sequence[int] = (), fonts: FontSet | None = None) -> np.ndarray:
    """matrix [N, N] (similarities), images [N, H, W, C] in 0..1 (the panels), labels[k] = panel k's axis label
    -> an RGB uint8 picture [height, width, 3] (geometry: plan_layout)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.shape != (n, n) or len(labels) != n or len(images) != n:
        raise ValueError(f"heatmap: a {matrix.shape} matrix, {len(labels)} labels and {len(images)} images do not match")
    fonts = fonts or FontSet()
    lay = plan_layout(n, labels, [g.legend for g in groups], title, fonts)
    cell, grid_x, grid_y, label_size, label_w = lay.cell, lay.grid_x, lay.grid_y, lay.label_size, lay.label_w
    text_size, title_size = TEXT_SIZE, TITLE_SIZE
    title_h, bar_x, bar_h, legend_y, legend_h = lay.title_h, lay.bar_x, lay.bar_h, lay.legend_y, lay.legend_h
    swatch = legend_h - 4
    canvas = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    ascent = fonts.line_metrics(title_size)[0]
    fonts.draw(draw, (MARGIN, MARGIN + ascent), title, title_size, INK)

    # thumbnails and labels along both axes
    label_ascent = fonts.line_metrics(label_size)[0]
    unscored = set(unscored)
    for k in range(n):
        thumb = _thumbnail(images[k], cell)
        colour = MUTED if k in unscored else INK
        canvas.paste(thumb, (grid_x + k * cell, grid_y - GAP - cell))
        canvas.paste(thumb, (MARGIN + label_w, grid_y + k * cell))
        text = str(labels[k])
        text_w = fonts.width(text, label_size)
        fonts.draw(draw, (grid_x + k * cell + (cell - text_w) / 2, MARGIN + title_h + label_ascent), text, label_size, colour)
        fonts.draw(draw, (MARGIN + label_w - GAP - text_w, grid_y + k * cell + (cell + label_ascent) / 2 - 1), text,
                   label_size, colour)

    # cells
    floor = scale_floor(matrix)
    span = max(1e-9, 1.0 - floor)
    gap = 1 if cell >= 20 else 0
    value_size = int(min(14, max(9, round(cell * 0.28))))
    show_values = cell >= 34
    decimals = 3 if cell >= 48 else 2
    value_ascent = fonts.line_metrics(value_size)[0]
    for i in range(n):
        for j in range(n):
            value = float(matrix[i, j])
            fill = scale_colour((value - floor) / span)
            left, top = grid_x + j * cell, grid_y + i * cell
            draw.rectangle([left, top, left + cell - 1 - gap, top + cell - 1 - gap], fill=fill)
            if show_values:
                text = f"{value:.{decimals}f}"
                luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
                text_w = fonts.width(text, value_size)
                fonts.draw(draw, (left + (cell - gap - text_w) / 2, top + (cell - gap + value_ascent) / 2 - 1), text,
                           value_size, INK if luminance > 140 else BACKGROUND)

    # each character's pairs outlined in its colour (nested insets when characters share panels)
    line = 3 if cell >= 40 else 2
    for index, group in enumerate(groups):
        if group.rows:
            inset = (index % 3) * (line + 1)
            _outline(draw, group.rows, (grid_x, grid_y), cell, PALETTE[index % len(PALETTE)], inset, line)

    # colour bar: 1.0 at the top, the scale's floor at the bottom
    for y in range(bar_h):
        draw.line([(bar_x, grid_y + y), (bar_x + 15, grid_y + y)], fill=scale_colour(1.0 - y / max(bar_h - 1, 1)))
    text_ascent = fonts.line_metrics(text_size)[0]
    for value, y in ((1.0, grid_y + text_ascent), (floor, grid_y + bar_h)):
        fonts.draw(draw, (bar_x + 16 + GAP, y), f"{value:.2f}", text_size, INK)

    # legend
    for index, group in enumerate(groups):
        top = legend_y + index * legend_h
        draw.rectangle([MARGIN, top + 2, MARGIN + swatch, top + 2 + swatch], outline=PALETTE[index % len(PALETTE)],
                       width=line)
        fonts.draw(draw, (MARGIN + swatch + GAP, top + text_ascent), group.legend, text_size, INK)
    return np.array(canvas, dtype=np.uint8)
