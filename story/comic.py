"""Comic pages from panels: page geometry (pure arithmetic), then Pillow rendering and caption typesetting.

Geometry first: `layout_pages` returns, for every page, one rectangle per panel in reading order.
Layouts:
- grid: rows x cols equal cells;
- classic comic: a rows x cols grid whose cells each hold one panel or, by a seeded coin flip, two
  half-width panels side by side (the mix of single and paired panels of the official demo's
  "classic comic" pages);
- horizontal strip: one row of `cols` panels per page.
Panels never overlap, keep `gutter` pixels between them and stay inside the margins, and every page
is filled: panels, gutters and margins cover the whole page (a page with fewer panels than cells gets
fewer, larger panels, shaped to crop the images least).

Rendering fills each panel with its image ("cover": scaled with the aspect ratio kept and
centre-cropped to the panel, see `cover_image` for why), and typesets the captions in boxes: word
wrap (CJK breaks between characters), one font size per page (the largest at which every caption of
the page fits its box) and per-character font fallback. The font that ships with the pack
(WenQuanYi Micro Hei, Apache-2.0, Latin + Greek + Cyrillic + CJK + Hangul) comes first, so pages
look the same on every machine; system fonts are only asked for characters it lacks.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageColor, ImageDraw, ImageFont

from ..common.errors import StoryDiffusionError

LAYOUT_GRID = "grid"
LAYOUT_CLASSIC = "classic comic"
LAYOUT_STRIP = "horizontal strip"
LAYOUTS = (LAYOUT_CLASSIC, LAYOUT_GRID, LAYOUT_STRIP)

CAPTION_BELOW = "below panel"
CAPTION_OVERLAY = "over panel"
CAPTION_POSITIONS = (CAPTION_BELOW, CAPTION_OVERLAY)

MIN_PANEL_PIXELS = 8


class ComicError(StoryDiffusionError):
    pass


# ---------------------------------------------------------------------------------------------------
# geometry


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

    def overlaps(self, other: "Rect") -> bool:
        return self.x < other.right and other.x < self.right and self.y < other.bottom and other.y < self.bottom

    def gap_to(self, other: "Rect") -> int:
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
    return int(round(2 * margin + rows * cell_h + (rows - 1) * gutter))


# ---------------------------------------------------------------------------------------------------
# fonts and typesetting

FONT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fonts")
SHIPPED_FONT = os.path.join(FONT_DIR, "wqy-microhei.ttc")
# Asked only for characters the shipped font lacks (Arabic, Hebrew, Devanagari, symbols, ...).
SYSTEM_FALLBACK_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
    "C:/Windows/Fonts/seguisym.ttf",
)
_PROBE_SIZE = 24
_MISSING_PROBE = "\U0010fffd"  # a code point no font maps: renders the .notdef ("tofu") glyph


class FontSet:
    """Ordered font files; each character is drawn with the first font that has a glyph for it.

    Fonts use Pillow's BASIC layout so the same text gives the same pixels with or without libraqm.
    A path of None stands for Pillow's built-in scalable font (used when no file is found).
    """

    def __init__(self, paths=None):
        paths = [SHIPPED_FONT, *SYSTEM_FALLBACK_FONTS] if paths is None else list(paths)
        self.paths = [p for p in paths if p is None or os.path.isfile(p)] or [None]
        self._fonts: dict = {}
        self._coverage: dict = {}
        self._notdef: dict = {}

    def font(self, index: int, size: int):
        key = (index, size)
        if key not in self._fonts:
            path = self.paths[index]
            if path is None:
                self._fonts[key] = ImageFont.load_default(size=size)
            else:
                self._fonts[key] = ImageFont.truetype(path, size=size, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[key]

    def _render(self, index: int, text: str) -> bytes:
        font = self.font(index, _PROBE_SIZE)
        image = Image.new("L", (_PROBE_SIZE * 3, _PROBE_SIZE * 2))
        ImageDraw.Draw(image).text((_PROBE_SIZE // 2, _PROBE_SIZE // 4), text, font=font, fill=255)
        return image.tobytes()

    def has_glyph(self, index: int, char: str) -> bool:
        key = (index, char)
        if key not in self._coverage:
            if index not in self._notdef:
                self._notdef[index] = self._render(index, _MISSING_PROBE)
            self._coverage[key] = self._render(index, char) != self._notdef[index]
        return self._coverage[key]

    def index_for(self, char: str) -> int:
        if char.isspace() or not char.isprintable():
            return 0
        for index in range(len(self.paths)):
            if self.has_glyph(index, char):
                return index
        return 0  # no font has it: the primary font draws its tofu box

    def runs(self, text: str) -> list[tuple[int, str]]:
        """Split text into (font index, substring) runs."""
        runs: list[tuple[int, str]] = []
        for char in text:
            index = self.index_for(char)
            if runs and runs[-1][0] == index:
                runs[-1] = (index, runs[-1][1] + char)
            else:
                runs.append((index, char))
        return runs

    def width(self, text: str, size: int) -> float:
        return sum(self.font(i, size).getlength(run) for i, run in self.runs(text))

    def line_metrics(self, size: int) -> tuple[int, int]:
        """(ascent, line height) of the primary font."""
        ascent, descent = self.font(0, size).getmetrics()
        return ascent, int(round((ascent + descent) * 1.15))

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill) -> None:
        """Draw one line with its left end at x and its baseline at y."""
        x, y = xy
        for index, run in self.runs(text):
            font = self.font(index, size)
            draw.text((x, y), run, font=font, fill=fill, anchor="ls")
            x += font.getlength(run)


# Scripts written without spaces: a line may break between any two of their characters.
_CLOSE_SCRIPT = "\u2e80-\u2fff\u3000-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_TOKEN = re.compile(rf"\s+|[{_CLOSE_SCRIPT}]|[^\s{_CLOSE_SCRIPT}]+")


def wrap_text(text: str, fonts: FontSet, size: int, max_width: float) -> list[str]:
    """Greedy word wrap; CJK may break between characters, over-long words between any characters."""
    lines: list[str] = []
    line = ""
    for token in _TOKEN.findall(" ".join(text.split())):
        if token.isspace():
            if line:
                line += " "
            continue
        if fonts.width(line + token, size) <= max_width:
            line += token
            continue
        if line.strip():
            lines.append(line.rstrip())
        line = ""
        while fonts.width(token, size) > max_width and len(token) > 1:
            cut = len(token) - 1
            while cut > 1 and fonts.width(token[:cut], size) > max_width:
                cut -= 1
            lines.append(token[:cut])
            token = token[cut:]
        line = token
    if line.strip():
        lines.append(line.rstrip())
    return lines


@dataclass(frozen=True)
class Typeset:
    size: int
    lines: tuple[str, ...]
    truncated: bool


def fit_text(text: str, fonts: FontSet, width: int, height: int, max_size: int, min_size: int) -> Typeset:
    """The largest font size in [min_size, max_size] whose wrapped text fits width x height.

    If even min_size does not fit, the text is cut after the last line that fits and ends in '…'.
    """
    min_size = max(1, min(min_size, max_size))

    def lines_at(size):
        return wrap_text(text, fonts, size, width)

    def fits(size):
        lines = lines_at(size)
        return (len(lines) * fonts.line_metrics(size)[1] <= height
                and all(fonts.width(line, size) <= width for line in lines))

    lo, hi = min_size, max_size
    if not fits(lo):
        lines = lines_at(lo)
        keep = max(1, height // fonts.line_metrics(lo)[1])
        if len(lines) > keep:
            last = lines[keep - 1]
            while last and fonts.width(last + "…", lo) > width:
                last = last[:-1]
            lines = lines[:keep - 1] + [last.rstrip() + "…"]
        return Typeset(lo, tuple(lines), True)
    while lo < hi:  # binary search: largest size that fits
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return Typeset(lo, tuple(lines_at(lo)), False)


# ---------------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class PageStyle:
    page_w: int
    page_h: int
    background: tuple[int, int, int] = (255, 255, 255)
    border: int = 3
    border_colour: tuple[int, int, int] = (0, 0, 0)
    caption_position: str = CAPTION_BELOW
    caption_fraction: float = 0.18  # caption box height as a fraction of the panel rectangle
    caption_fill: tuple[int, int, int] = (255, 255, 255)
    text_colour: tuple[int, int, int] = (0, 0, 0)
    max_font_size: int = 40
    min_font_size: int = 8


def parse_colour(text: str) -> tuple[int, int, int]:
    """'#rrggbb', '#rgb', 'rgb(…)' or a colour name -> RGB."""
    try:
        return ImageColor.getrgb(text.strip())[:3]
    except (ValueError, AttributeError):
        raise ComicError(f"background colour {text!r} is not a colour; write e.g. #ffffff, white or rgb(255,255,255)")


def fit_image(image: Image.Image, box: Rect) -> tuple[Image.Image, Rect]:
    """The image scaled (aspect kept, no cropping) to fit inside box, and where it goes (centred)."""
    scale = min(box.w / image.width, box.h / image.height)
    w, h = max(1, int(round(image.width * scale))), max(1, int(round(image.height * scale)))
    w, h = min(w, box.w), min(h, box.h)
    resized = image if (w, h) == image.size else image.resize((w, h), Image.Resampling.LANCZOS)
    return resized, Rect(box.x + (box.w - w) // 2, box.y + (box.h - h) // 2, w, h)


def cover_image(image: Image.Image, box: Rect) -> Image.Image:
    """The image scaled (aspect kept, never stretched) to cover all of box, centre-cropped to box's size.

    Panels are drawn this way ("cover", not "fit"): a comic artist composes the picture to the panel
    frame and lets the art run to the border. Fitting instead leaves empty bars inside the frames,
    which reads as unfinished panels, makes frames of one page look different sizes and leaves page
    area blank; it also narrows the caption box under a narrow picture. The layout keeps the crop small
    by choosing panel shapes close to the images' aspect ratio (see `layout_pages`).
    """
    target = box.w / box.h
    if image.width / image.height > target:  # wider than the panel: crop the sides
        w = image.height * target
        source = ((image.width - w) / 2, 0.0, (image.width + w) / 2, float(image.height))
    else:  # taller: crop top and bottom
        h = image.width / target
        source = (0.0, (image.height - h) / 2, float(image.width), (image.height + h) / 2)
    return image.resize((box.w, box.h), Image.Resampling.LANCZOS, box=source)


def _caption_areas(rect: Rect, style: PageStyle, has_caption: bool) -> tuple[Rect, Rect | None]:
    """(picture area, caption box) of a panel rectangle."""
    if not has_caption:
        return rect, None
    box_h = max(MIN_PANEL_PIXELS, int(round(rect.h * style.caption_fraction)))
    if style.caption_position == CAPTION_BELOW:
        picture = Rect(rect.x, rect.y, rect.w, rect.h - box_h)
        return picture, Rect(rect.x, rect.bottom - box_h, rect.w, box_h)
    inset = max(2, rect.w // 40)
    box = Rect(rect.x + inset, rect.bottom - box_h - inset, rect.w - 2 * inset, box_h)
    return rect, box


def _caption_line_width(style: PageStyle) -> int:
    return max(1, style.border // 2 + 1)


def caption_text_area(box: Rect, style: PageStyle) -> tuple[int, int]:
    """(width, height) available to the caption text inside a caption box (padding and outline removed)."""
    pad, line_w = max(2, box.h // 10), _caption_line_width(style)
    return box.w - 2 * (pad + line_w), box.h - 2 * (pad + line_w)


def page_font_size(captions: list[tuple[str, Rect]], fonts: FontSet, style: PageStyle) -> int | None:
    """One caption font size for a page: the largest size at which every caption fits its box.

    `captions` are (text, caption box) pairs; None when there is none. Lettering in one size is what
    a page looks like in print; sizing each caption on its own makes a short caption shout next to a
    long one. When even the smallest size does not fit some caption, that caption is cut with '…'.
    """
    captions = [(text, box) for text, box in captions if text.strip()]
    if not captions:
        return None
    size = style.max_font_size
    for text, box in captions:
        size = min(size, fit_text(text, fonts, *caption_text_area(box, style), size, style.min_font_size).size)
    floor = max(1, min(style.min_font_size, style.max_font_size))
    # the largest size that fits one caption is not always the largest that fits all (wrapping can jump)
    while size > floor and any(fit_text(t, fonts, *caption_text_area(b, style), size, size).truncated
                               for t, b in captions):
        size -= 1
    return size


def draw_caption(page: Image.Image, box: Rect, text: str, fonts: FontSet, style: PageStyle,
                 size: int | None = None) -> Typeset:
    """Draw the caption box and its text, at `size` (the page's font size) or the largest that fits."""
    draw = ImageDraw.Draw(page)
    line_w = _caption_line_width(style)
    draw.rectangle([box.x, box.y, box.right - 1, box.bottom - 1], fill=style.caption_fill,
                   outline=style.border_colour, width=line_w)
    inner_w, inner_h = caption_text_area(box, style)
    largest, smallest = (style.max_font_size, style.min_font_size) if size is None else (size, size)
    typeset = fit_text(text, fonts, inner_w, inner_h, largest, smallest)
    ascent, line_h = fonts.line_metrics(typeset.size)
    y = box.y + (box.h - line_h * len(typeset.lines)) / 2 + ascent
    for line in typeset.lines:
        x = box.x + (box.w - fonts.width(line, typeset.size)) / 2
        fonts.draw(draw, (x, y), line, typeset.size, style.text_colour)
        y += line_h
    return typeset


def caption_sizes(captions: list[str], pages: list[list[Rect]], style: PageStyle,
                  fonts: FontSet | None = None) -> list[int | None]:
    """The caption font size of every page (None for a page without captions), as render_pages uses it."""
    fonts = fonts or FontSet()
    sizes, index = [], 0
    for rects in pages:
        boxed = []
        for rect in rects:
            caption = captions[index].strip() if index < len(captions) else ""
            boxed.append((caption, _caption_areas(rect, style, bool(caption))[1]))
            index += 1
        sizes.append(page_font_size(boxed, fonts, style))
    return sizes


def render_pages(images: list[Image.Image], captions: list[str], pages: list[list[Rect]], style: PageStyle,
                 fonts: FontSet | None = None, progress=None) -> list[Image.Image]:
    """Draw every panel (and its caption) into its rectangle; returns one RGB image per page.

    Pictures fill their panels (`cover_image`); all captions of a page share one font size
    (`page_font_size`). `progress(done, total)` is called after each page.
    """
    fonts = fonts or FontSet()
    sizes = caption_sizes(captions, pages, style, fonts)
    out = []
    index = 0
    for rects, size in zip(pages, sizes):
        page = Image.new("RGB", (style.page_w, style.page_h), style.background)
        draw = ImageDraw.Draw(page)
        for rect in rects:
            caption = captions[index].strip() if index < len(captions) else ""
            picture_area, caption_box = _caption_areas(rect, style, bool(caption))
            page.paste(cover_image(images[index].convert("RGB"), picture_area), (picture_area.x, picture_area.y))
            if caption_box is not None:
                draw_caption(page, caption_box, caption, fonts, style, size)
            if style.border > 0:
                draw.rectangle([rect.x, rect.y, rect.right - 1, rect.bottom - 1], outline=style.border_colour,
                               width=min(style.border, rect.w // 4, rect.h // 4) or 1)
            index += 1
        out.append(page)
        if progress is not None:
            progress(len(out), len(pages))
    return out
