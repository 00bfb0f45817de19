"""Comic pages from panels: the pictures and captions drawn into the rectangles of the layout.

The page geometry is story/comic_layout.py (pure arithmetic) and the caption text story/comic_typeset.py
(fonts, wrapping, fitting); this module draws: each panel is filled with its image ("cover": scaled with
the aspect ratio kept and centre-cropped to the panel, see `cover_image` for why), and the captions are
typeset in boxes with one font size per page (the largest at which every caption of the page fits its
box). Their public names are importable from here too, so a caller needs only `story.comic`.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageColor, ImageDraw

from .comic_layout import (
    LAYOUT_CLASSIC,
    LAYOUT_GRID,
    LAYOUT_STRIP,
    LAYOUTS,
    MIN_PANEL_PIXELS,
    ComicError,
    Rect,
    auto_page_height,
    crop_factor,
    layout_pages,
)
from .comic_typeset import FontSet, Typeset, fit_text, wrap_text

# what callers (the Comic Page node, scripts/make_workflows.py, tests) use: one module for a comic page
__all__ = [
    "CAPTION_BELOW", "CAPTION_OVERLAY", "CAPTION_POSITIONS", "LAYOUTS", "LAYOUT_CLASSIC", "LAYOUT_GRID",
    "LAYOUT_STRIP", "MIN_PANEL_PIXELS", "ComicError", "FontSet", "PageStyle", "Rect", "Typeset", "auto_page_height",
    "caption_sizes", "caption_text_area", "cover_image", "crop_factor", "draw_caption", "fit_image", "fit_text",
    "layout_pages", "page_font_size", "parse_colour", "render_pages", "wrap_text"
]

CAPTION_BELOW = "below panel"
CAPTION_OVERLAY = "over panel"
CAPTION_POSITIONS = (CAPTION_BELOW, CAPTION_OVERLAY)


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
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
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
    box_h = max(MIN_PANEL_PIXELS, round(rect.h * style.caption_fraction))
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
