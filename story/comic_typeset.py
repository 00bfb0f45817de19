"""Caption typesetting: fonts with per-character fallback, word wrap (CJK too) and the largest size that fits.

The font that ships with the pack (WenQuanYi Micro Hei, Apache-2.0, Latin + Greek + Cyrillic + CJK +
Hangul) comes first, so pages look the same on every machine; system fonts are only asked for
characters it lacks. Nothing here knows about pages: story/comic.py puts the text into caption boxes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

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
        return ascent, round((ascent + descent) * 1.15)

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
