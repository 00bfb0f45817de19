"""Comic page geometry: where every panel goes, as pure arithmetic (no pixels, no fonts).

`layout_pages` returns, for every page, one rectangle per panel in reading order.
Layouts:
- grid: rows x cols equal cells;
- classic comic: a rows x cols grid whose cells each hold one panel or, by a seeded coin flip, two
  half-width panels side by side (the mix of single and paired panels of the official demo's
  "classic comic" pages);
- horizontal strip: one row of `cols` panels per page.
Panels never overlap, keep `gutter` pixels between them and stay inside the margins, and every page
is filled: panels, gutters and margins cover the whole page (a page with fewer panels than cells gets
fewer, larger panels, shaped to crop the images least).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..common.errors import StoryDiffusionError

LAYOUT_GRID = "grid"
LAYOUT_CLASSIC = "classic comic"
LAYOUT_STRIP = "horizontal strip"
LAYOUTS = (LAYOUT_CLASSIC, LAYOUT_GRID, LAYOUT_STRIP)

MIN_PANEL_PIXELS = 8


class ComicError(StoryDiffusionError):
    pass


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    def overlaps(self, other: Rect) -> bool:
        return self.x < other.right and other.x < self.right and self.y < other.bottom and other.y < self.bottom

    def gap_to(self, other: Rect) -> int:
        """Pixels between two non-overlapping rectangles (the larger of the horizontal/vertical gaps)."""
        dx = max(other.x - self.right, self.x - other.right)
        dy = max(other.y - self.bottom, self.y - other.bottom)
        return max(dx, dy)


def _spans(start: int, length: int, count: int, gutter: int, what: str) -> list[tuple[int, int]]:
    """`count` (start, size) spans that split `length` pixels with `gutter` between them."""
    size = (length - (count - 1) * gutter) / count
    if size < MIN_PANEL_PIXELS:
        raise ComicError(f"{count} {what} do not fit in {length} px with a {gutter} px gutter; "
                         "use a bigger page, a smaller gutter/margin or fewer rows/columns")
    spans = []
    for i in range(count):
        a = start + int(i * (size + gutter))
        b = start + int(i * (size + gutter) + size)
        spans.append((a, b - a))
    return spans


def _content_box(page_w: int, page_h: int, margin: int) -> Rect:
    if 2 * margin >= min(page_w, page_h) - MIN_PANEL_PIXELS:
        raise ComicError(f"a {margin} px margin leaves no room on a {page_w}x{page_h} page; reduce the margin")
    return Rect(margin, margin, page_w - 2 * margin, page_h - 2 * margin)


def _cells(box: Rect, rows: int, cols: int, gutter: int) -> list[Rect]:
    ys = _spans(box.y, box.h, rows, gutter, "rows")
    xs = _spans(box.x, box.w, cols, gutter, "columns")
    return [Rect(x, y, w, h) for y, h in ys for x, w in xs]


def _side_by_side(cell: Rect, gutter: int) -> list[Rect]:
    """A cell split into two half-width panels of the cell's full height."""
    return [Rect(x, cell.y, w, cell.h) for x, w in _spans(cell.x, cell.w, 2, gutter, "side-by-side panels")]


def _rows_of(box: Rect, counts: list[int], gutter: int) -> list[Rect]:
    """Equal-height rows filling `box`, row i split into counts[i] equal panels."""
    rects = []
    for (y, h), count in zip(_spans(box.y, box.h, len(counts), gutter, "rows"), counts):
        rects.extend(Rect(x, y, w, h) for x, w in _spans(box.x, box.w, count, gutter, "columns"))
    return rects


def crop_factor(rects: list[Rect], aspect: float) -> float:
    """How far the least fitting rect's shape (w / h) is from `aspect`: 1.0 = same shape, 2.0 = a cover
    crop keeps half of the image in one direction."""
    return max(max(r.w / r.h / aspect, aspect * r.h / r.w) for r in rects)


def _fill(box: Rect, count: int, max_rows: int, gutter: int, aspect: float) -> list[Rect]:
    """`count` panels that fill `box`: 1..max_rows equal-height rows with the panels spread as evenly as
    possible (rows with more panels first); of those arrangements, the one whose panels are closest to
    `aspect` (the least cropping)."""
    best, error = None, None
    for rows in range(1, min(count, max_rows) + 1):
        base, extra = divmod(count, rows)
        try:
            rects = _rows_of(box, [base + 1] * extra + [base] * (rows - extra), gutter)
        except ComicError as e:
            error = error or e
            continue
        score = crop_factor(rects, aspect)
        if best is None or score < best[0] - 1e-9:
            best = (score, rects)
    if best is None:
        raise error
    return best[1]


def _classic_pages(panel_count: int, cells: list[Rect], box: Rect, rows: int, gutter: int, aspect: float,
                   rng: random.Random) -> list[list[Rect]]:
    """Classic comic: every page fills all of its cells; a seeded coin flip per cell splits it into two
    side-by-side panels. The flips are adjusted so that no page is left partly empty: the last page takes
    the rest when it holds at most two panels per cell, and otherwise the page before it leaves exactly
    one cell per panel for it."""
    per_page = len(cells)
    pages: list[list[Rect]] = []
    remaining = panel_count
    while remaining > 0:
        if remaining < per_page:  # only a story shorter than one page of cells
            pages.append(_fill(box, remaining, rows, gutter, aspect))
            break
        flips = [i for i in range(per_page) if rng.random() < 0.5]
        split = len(flips)
        if remaining - (per_page + split) < per_page:  # the next page would not fill its cells
            split = remaining - per_page if remaining <= 2 * per_page else remaining - 2 * per_page
        if split <= len(flips):
            chosen = set(rng.sample(flips, split))
        else:
            others = [i for i in range(per_page) if i not in flips]
            chosen = set(flips) | set(rng.sample(others, split - len(flips)))
        page: list[Rect] = []
        for i, cell in enumerate(cells):
            page.extend(_side_by_side(cell, gutter) if i in chosen else [cell])
        pages.append(page)
        remaining -= len(page)
    return pages


def _grid_pages(panel_count: int, cells: list[Rect], box: Rect, rows: int, gutter: int,
                aspect: float) -> list[list[Rect]]:
    """Grid / strip: full pages are the rows x cols cells; a page with fewer panels fills the page with
    fewer, larger panels. Of "full pages, then the rest" and "panels spread evenly over the pages", the
    split whose worst panel needs the least cropping is used (full pages on a tie)."""
    per_page = len(cells)
    page_count = -(-panel_count // per_page)
    full_first = [per_page] * (page_count - 1) + [panel_count - per_page * (page_count - 1)]
    base, extra = divmod(panel_count, page_count)
    balanced = [base + 1] * extra + [base] * (page_count - extra)
    best = None
    for counts in (full_first, balanced):
        pages = [list(cells) if count == per_page else _fill(box, count, rows, gutter, aspect) for count in counts]
        score = crop_factor([r for page in pages for r in page], aspect)
        if best is None or score < best[0] - 1e-9:
            best = (score, pages)
    return best[1]


def layout_pages(panel_count: int, layout: str, page_w: int, page_h: int, margin: int, gutter: int,
                 rows: int, cols: int, seed: int = 0, panel_aspect: float | None = None) -> list[list[Rect]]:
    """Rectangles for `panel_count` panels: a list of pages, each a list of panel rects in reading order.

    Every page is filled: the panel rectangles, the gutters between them and the margins cover the whole
    page (a page with fewer panels than cells gets fewer, larger panels), so no page is left partly blank.
    `panel_aspect` (w / h of the panel rectangle the images look best in; default: the grid cell's) picks,
    among the ways to fill a page, the one that crops the images least.
    """
    if panel_count < 1:
        raise ComicError("there are no panels to lay out")
    if layout not in LAYOUTS:
        raise ComicError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if rows < 1 or cols < 1:
        raise ComicError("rows and columns must be at least 1")
    if layout == LAYOUT_STRIP:
        rows = 1
    box = _content_box(page_w, page_h, margin)
    cells = _cells(box, rows, cols, gutter)
    aspect = panel_aspect or cells[0].w / cells[0].h
    if layout == LAYOUT_CLASSIC:
        return _classic_pages(panel_count, cells, box, rows, gutter, aspect, random.Random(seed))
    return _grid_pages(panel_count, cells, box, rows, gutter, aspect)


def auto_page_height(page_w: int, margin: int, gutter: int, rows: int, cols: int, layout: str,
                     image_aspect: float, caption_fraction: float) -> int:
    """The page height at which a grid cell's picture area has the images' aspect ratio (w / h)."""
    if layout == LAYOUT_STRIP:
        rows = 1
    cell_w = (page_w - 2 * margin - (cols - 1) * gutter) / cols
    if cell_w < MIN_PANEL_PIXELS:
        raise ComicError(f"{cols} columns do not fit on a {page_w} px wide page; use fewer columns or a wider page")
    cell_h = cell_w / image_aspect / (1.0 - caption_fraction)
    return round(2 * margin + rows * cell_h + (rows - 1) * gutter)
