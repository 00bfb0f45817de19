"""Comic pages from panels: page geometry (pure arithmetic), then Pillow rendering and caption typesetting.

Geometry first: `layout_pages` returns, for every page, one rectangle per panel in reading order.
Layouts:
- grid: rows x cols equal cells;
- classic comic: a rows x cols grid whose cells each hold one panel or, by a seeded coin flip, two
  half-height panels stacked (the mix of the official demo's "classic comic" pages);
- horizontal strip: one row of `cols` panels per page.
Panels never overlap, keep `gutter` pixels between them and stay inside the margins.

Rendering fits each image into its rectangle without cropping or stretching (aspect ratio kept,
centred), and typesets the caption in a box: word wrap (CJK breaks between characters), the
largest font size that fits, and per-character font fallback. The font that ships with the pack
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


def _stacked(cell: Rect, gutter: int) -> list[Rect]:
    (top, top_h), (bottom, bottom_h) = _spans(cell.y, cell.h, 2, gutter, "stacked panels")
    return [Rect(cell.x, top, cell.w, top_h), Rect(cell.x, bottom, cell.w, bottom_h)]


def layout_pages(panel_count: int, layout: str, page_w: int, page_h: int, margin: int, gutter: int,
                 rows: int, cols: int, seed: int = 0) -> list[list[Rect]]:
    """Rectangles for `panel_count` panels: a list of pages, each a list of panel rects in reading order."""
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
    rng = random.Random(seed)
    pages: list[list[Rect]] = []
    remaining = panel_count
    while remaining > 0:
        page: list[Rect] = []
        for cell in cells:
            if remaining <= 0:
                break
            if layout == LAYOUT_CLASSIC and remaining >= 2 and rng.random() < 0.5:
                page.extend(_stacked(cell, gutter))
                remaining -= 2
            else:
                page.append(cell)
                remaining -= 1
        pages.append(page)
    return pages


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


def draw_caption(page: Image.Image, box: Rect, text: str, fonts: FontSet, style: PageStyle) -> Typeset:
    draw = ImageDraw.Draw(page)
    line_w = max(1, style.border // 2 + 1)
    draw.rectangle([box.x, box.y, box.right - 1, box.bottom - 1], fill=style.caption_fill,
                   outline=style.border_colour, width=line_w)
    pad = max(2, box.h // 10)
    inner_w, inner_h = box.w - 2 * (pad + line_w), box.h - 2 * (pad + line_w)
    typeset = fit_text(text, fonts, inner_w, inner_h, style.max_font_size, style.min_font_size)
    ascent, line_h = fonts.line_metrics(typeset.size)
    y = box.y + (box.h - line_h * len(typeset.lines)) / 2 + ascent
    for line in typeset.lines:
        x = box.x + (box.w - fonts.width(line, typeset.size)) / 2
        fonts.draw(draw, (x, y), line, typeset.size, style.text_colour)
        y += line_h
    return typeset


def render_pages(images: list[Image.Image], captions: list[str], pages: list[list[Rect]], style: PageStyle,
                 fonts: FontSet | None = None) -> list[Image.Image]:
    """Draw every panel (and its caption) into its rectangle; returns one RGB image per page."""
    fonts = fonts or FontSet()
    out = []
    index = 0
    for rects in pages:
        page = Image.new("RGB", (style.page_w, style.page_h), style.background)
        draw = ImageDraw.Draw(page)
        for rect in rects:
            caption = captions[index].strip() if index < len(captions) else ""
            picture_area, caption_box = _caption_areas(rect, style, bool(caption))
            picture, where = fit_image(images[index].convert("RGB"), picture_area)
            if caption_box is not None and style.caption_position == CAPTION_BELOW:
                # keep picture and caption together, the box as wide as the picture, centred in the cell
                top = rect.y + (rect.h - where.h - caption_box.h) // 2
                where = Rect(where.x, top, where.w, where.h)
                caption_box = Rect(where.x, where.bottom, where.w, caption_box.h)
            page.paste(picture, (where.x, where.y))
            if style.border > 0:
                draw.rectangle([where.x, where.y, where.right - 1, where.bottom - 1],
                               outline=style.border_colour, width=min(style.border, where.w // 4, where.h // 4) or 1)
            if caption_box is not None:
                draw_caption(page, caption_box, caption, fonts, style)
            index += 1
        out.append(page)
    return out
