"""Comic pages: layout geometry, aspect-preserving placement, caption typesetting (CJK too), determinism."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def comic(pack):
    from comfyui_storydiffusion.story import comic

    return comic


@pytest.fixture(scope="module")
def fonts(comic):
    return comic.FontSet()


def check_geometry(comic, pages, n, page_w, page_h, margin, gutter):
    rects = [r for page in pages for r in page]
    assert len(rects) == n  # every panel placed exactly once
    for page in pages:
        assert page, "no empty pages"
        for r in page:
            assert r.w >= comic.MIN_PANEL_PIXELS and r.h >= comic.MIN_PANEL_PIXELS
            assert margin <= r.x and r.right <= page_w - margin and margin <= r.y and r.bottom <= page_h - margin
        for a, b in itertools.combinations(page, 2):
            assert not a.overlaps(b), (a, b)
            assert a.gap_to(b) >= gutter, (a, b)


@pytest.mark.parametrize("layout", ["grid", "classic comic", "horizontal strip"])
@pytest.mark.parametrize("n,rows,cols", [(1, 1, 1), (4, 2, 2), (7, 2, 2), (9, 3, 2), (13, 2, 3)])
@pytest.mark.parametrize("margin,gutter", [(0, 0), (20, 10), (37, 23)])
def test_layout_geometry(comic, layout, n, rows, cols, margin, gutter):
    page_w, page_h = 1000, 777
    pages = comic.layout_pages(n, layout, page_w, page_h, margin, gutter, rows, cols, seed=3)
    check_geometry(comic, pages, n, page_w, page_h, margin, gutter)
    per_page = cols if layout == "horizontal strip" else rows * cols
    if layout != "classic comic":
        assert len(pages) == -(-n // per_page)
        assert all(len(p) <= per_page for p in pages)
    else:
        assert all(len(p) <= 2 * per_page for p in pages)
        assert all(len(p) >= per_page for p in pages) or len(pages) == 1  # no half-empty last page


def test_classic_mixes_single_and_paired_panels_by_seed(comic):
    layouts = {seed: comic.layout_pages(24, "classic comic", 1200, 1600, 20, 10, 3, 2, seed=seed) for seed in range(6)}
    assert layouts[0] == comic.layout_pages(24, "classic comic", 1200, 1600, 20, 10, 3, 2, seed=0)
    assert len({str(v) for v in layouts.values()}) > 1  # the seed changes the mix
    widths = {r.w for pages in layouts.values() for page in pages for r in page}
    cell_w = (1200 - 40 - 10) / 2
    assert any(w > cell_w * 0.9 for w in widths) and any(w < cell_w * 0.55 for w in widths)
    cell_h = (1600 - 40 - 2 * 10) / 3
    assert all(abs(r.h - cell_h) <= 1 for pages in layouts.values() for page in pages for r in page)


# Coverage: the share of the inner page (inside the margins) that panels or the gutters between them
# cover. Each panel is grown by half a gutter (+1 px for rounding) so that a gutter between two panels
# counts as covered and an empty cell does not.
MIN_COVERAGE = 0.95


def coverage(page, page_w, page_h, margin, gutter):
    inner = np.zeros((page_h - 2 * margin, page_w - 2 * margin), dtype=bool)
    grow = gutter // 2 + 1
    for r in page:
        inner[max(0, r.y - margin - grow):r.bottom - margin + grow, max(0, r.x - margin - grow):r.right - margin + grow] = True
    return inner.mean()


@pytest.mark.parametrize("layout", ["classic comic", "grid", "horizontal strip"])
@pytest.mark.parametrize("rows,cols", [(2, 2), (3, 2), (2, 3), (1, 4)])
@pytest.mark.parametrize("n", range(1, 13))
def test_every_page_is_filled(comic, layout, rows, cols, n):
    """The 4-panel classic page that left half of the page blank, and every other short story: no page
    of 1-12 panels leaves part of the page empty."""
    page_w, margin, gutter = 1000, 20, 10
    for seed in range(4):
        page_h = comic.auto_page_height(page_w, margin, gutter, rows, cols, layout, 4 / 3, 0.18)
        pages = comic.layout_pages(n, layout, page_w, page_h, margin, gutter, rows, cols, seed=seed)
        check_geometry(comic, pages, n, page_w, page_h, margin, gutter)
        for page in pages:
            assert coverage(page, page_w, page_h, margin, gutter) >= MIN_COVERAGE, (seed, page)


def test_four_panel_classic_page_is_a_full_grid(comic):
    for seed in range(20):
        (page,) = comic.layout_pages(4, "classic comic", 1000, 800, 20, 10, 2, 2, seed=seed)
        assert len({(r.w, r.h) for r in page}) <= 2 and min(r.w for r in page) > 450  # four cells, none split


def test_short_pages_pick_the_least_cropping_shape(comic):
    """A page with fewer panels than cells gets fewer, larger panels, shaped close to the images."""
    (page,) = comic.layout_pages(1, "grid", 1000, 800, 0, 0, 2, 2)
    assert page == [comic.Rect(0, 0, 1000, 800)]
    (page,) = comic.layout_pages(2, "grid", 1000, 800, 0, 0, 2, 2, panel_aspect=0.6)  # tall images: side by side
    assert [(r.w, r.h) for r in page] == [(500, 800), (500, 800)]
    (page,) = comic.layout_pages(2, "grid", 1000, 800, 0, 0, 2, 2, panel_aspect=2.5)  # wide images: one above the other
    assert [(r.w, r.h) for r in page] == [(1000, 400), (1000, 400)]
    pages = comic.layout_pages(4, "horizontal strip", 900, 300, 0, 0, 1, 3)  # 2 + 2, not 3 + 1
    assert [len(p) for p in pages] == [2, 2]


def test_impossible_pages_are_refused(comic):
    with pytest.raises(comic.ComicError, match="margin"):
        comic.layout_pages(2, "grid", 100, 100, 50, 0, 1, 2)
    with pytest.raises(comic.ComicError, match="columns do not fit"):
        comic.layout_pages(2, "grid", 100, 100, 0, 40, 1, 3)
    with pytest.raises(comic.ComicError, match="choose one of"):
        comic.layout_pages(2, "manga", 100, 100, 0, 0, 1, 1)


def test_auto_page_height_matches_the_panel_aspect(comic):
    h = comic.auto_page_height(1000, 20, 10, 2, 3, "grid", image_aspect=4 / 3, caption_fraction=0.0)
    (page,) = comic.layout_pages(6, "grid", 1000, h, 20, 10, 2, 3)
    assert all(abs(r.w / r.h - 4 / 3) < 0.02 for r in page)


def test_fit_image_keeps_aspect_and_centres(comic):
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    resized, where = comic.fit_image(image, comic.Rect(10, 10, 100, 100))
    assert resized.size == (100, 50) and (where.x, where.y, where.w, where.h) == (10, 35, 100, 50)
    resized, where = comic.fit_image(image, comic.Rect(0, 0, 400, 100))
    assert resized.size == (200, 100) and where.x == 100


def test_cover_image_fills_the_panel_and_centre_crops(comic):
    """Left third red, middle green, right third blue: a square panel keeps the centre, unstretched."""
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    out = np.asarray(comic.cover_image(image, comic.Rect(0, 0, 50, 50)))
    assert out.shape == (50, 50, 3)
    assert (np.abs(out.astype(int) - (0, 255, 0)).max(axis=-1) < 8).mean() > 0.95  # only the green middle
    tall = np.asarray(comic.cover_image(Image.new("RGB", (100, 300), (9, 9, 9)), comic.Rect(0, 0, 80, 40)))
    assert tall.shape == (40, 80, 3)


def glyph_pixels(fonts, text, size=32):
    from PIL import ImageDraw

    image = Image.new("L", (size * (len(text) + 2), size * 2), 0)
    fonts.draw(ImageDraw.Draw(image), (size // 2, size * 3 // 2), text, size, 255)
    return np.asarray(image)


@pytest.mark.parametrize("text", ["日本語", "한국어", "中文字", "Ωμέγα", "Жук", "Éclair"])
def test_unicode_renders_real_glyphs_not_tofu(comic, fonts, text):
    """Each character must draw something that differs from the font's .notdef box."""
    from comfyui_storydiffusion.story.comic_typeset import _MISSING_PROBE

    tofu = glyph_pixels(fonts, _MISSING_PROBE)
    for char in text:
        pixels = glyph_pixels(fonts, char)
        assert pixels.any(), char
        assert not np.array_equal(pixels, tofu), f"{char!r} renders as tofu"
    assert fonts.paths[0].endswith("wqy-microhei.ttc")  # the shipped font comes first


def test_wrap_breaks_words_and_cjk(comic, fonts):
    lines = comic.wrap_text("the quick brown fox jumps over the lazy dog", fonts, 20, 120)
    assert len(lines) > 1 and " ".join(lines) == "the quick brown fox jumps over the lazy dog"
    assert all(fonts.width(line, 20) <= 120 for line in lines)
    cjk = "今天天气很好我们去公园散步吧"
    lines = comic.wrap_text(cjk, fonts, 20, 90)
    assert len(lines) > 1 and "".join(lines) == cjk
    lines = comic.wrap_text("Supercalifragilisticexpialidocious", fonts, 20, 60)
    assert "".join(lines) == "Supercalifragilisticexpialidocious" and all(fonts.width(l, 20) <= 60 for l in lines)


def test_font_size_shrinks_to_fit_and_truncates_last(comic, fonts):
    short = comic.fit_text("Hi!", fonts, 300, 60, max_size=40, min_size=8)
    long = comic.fit_text("A much longer caption that needs several lines to fit into the box", fonts, 300, 60, 40, 8)
    assert short.size == 40 and long.size < 40 and not long.truncated
    assert len(long.lines) * fonts.line_metrics(long.size)[1] <= 60
    huge = comic.fit_text("word " * 500, fonts, 100, 30, 40, 8)
    assert huge.truncated and huge.lines[-1].endswith("…")


def panel_batch(n, h=48, w=64):
    """Distinct solid-colour panels (the colour encodes the panel index)."""
    colours = [((37 * i) % 200 + 30, (91 * i) % 200 + 30, (53 * i) % 200 + 30) for i in range(n)]
    return torch.stack([torch.tensor(c, dtype=torch.float32).div(255).expand(h, w, 3) for c in colours]), colours


def test_render_places_every_panel_with_captions(comic, fonts):
    images, colours = panel_batch(5)
    pil = [Image.fromarray((im.numpy() * 255).round().astype(np.uint8)) for im in images]
    captions = ["First", "", "第三 panel", "Fourth", ""]
    style = comic.PageStyle(page_w=400, page_h=300, background=(250, 250, 250), border=2)
    pages = comic.layout_pages(5, "grid", 400, 300, 10, 8, 2, 2)
    rendered = comic.render_pages(pil, captions, pages, style, fonts)
    assert len(rendered) == 2 and all(p.size == (400, 300) for p in rendered)
    index = 0
    for page, rects in zip(rendered, pages):
        array = np.asarray(page)
        assert (array[:10, :] == 250).all() and (array[:, :10] == 250).all()  # margins stay background
        for rect in rects:
            picture, box = comic._caption_areas(rect, style, bool(captions[index]))
            # the picture fills its area: inside the border, every pixel is the panel's colour
            inside = array[picture.y + 3:picture.bottom - 3, picture.x + 3:picture.right - 3]
            assert (np.abs(inside.astype(int) - colours[index]).max(axis=-1) <= 2).all()
            if box is not None:  # below-panel captions: the box spans the panel under the picture
                assert (box.x, box.w, box.bottom) == (rect.x, rect.w, rect.bottom) and box.y == picture.bottom
                text = array[box.y + 3:box.bottom - 3, box.x + 3:box.right - 3]
                assert (text < 100).all(axis=-1).sum() > 20  # dark caption text pixels in the box
            index += 1


class SizeRecorder:
    """Wraps a FontSet and records the font size of every caption line drawn, per page image."""

    def __init__(self, fonts):
        self.fonts, self.sizes = fonts, {}

    def __getattr__(self, name):
        return getattr(self.fonts, name)

    def draw(self, draw, xy, text, size, fill):
        self.sizes.setdefault(id(draw._image), set()).add(size)
        return self.fonts.draw(draw, xy, text, size, fill)


CAPTIONS = ["Hi.", "A much longer caption that has to wrap over several lines in its box", "第三", "Four",
            "Five: a medium caption", "Six", "Seven", "Eight"]


@pytest.mark.parametrize("layout,seed", [("classic comic", s) for s in range(4)] + [("grid", 0), ("horizontal strip", 0)])
@pytest.mark.parametrize("position", ["below panel", "over panel"])
def test_one_caption_font_size_per_page(comic, fonts, layout, seed, position):
    """Every caption of a page is drawn in one size: the largest at which all of them fit their boxes."""
    images, _ = panel_batch(len(CAPTIONS))
    pil = [Image.fromarray((im.numpy() * 255).round().astype(np.uint8)) for im in images]
    style = comic.PageStyle(page_w=800, page_h=620, caption_position=position, max_font_size=40)
    pages = comic.layout_pages(len(CAPTIONS), layout, 800, 620, 16, 8, 2, 2, seed=seed)
    recorder = SizeRecorder(fonts)
    rendered = comic.render_pages(pil, CAPTIONS, pages, style, recorder)
    expected = comic.caption_sizes(CAPTIONS, pages, style, fonts) if hasattr(comic, "caption_sizes") else [0] * len(pages)
    index = 0
    for page, rects, size in zip(rendered, pages, expected):
        assert len(recorder.sizes[id(page)]) == 1, recorder.sizes[id(page)]  # exactly one size on the page
        assert recorder.sizes[id(page)] == {size}  # the one caption_sizes reports
        boxes = [comic._caption_areas(r, style, True)[1] for r in rects]
        texts = CAPTIONS[index:index + len(rects)]
        index += len(rects)
        typeset = [comic.fit_text(t, fonts, *comic.caption_text_area(b, style), size, size) for t, b in zip(texts, boxes)]
        assert not any(t.truncated for t in typeset)  # every caption fits at that size ...
        if size < style.max_font_size:  # ... and one of them not at the next size up
            assert any(comic.fit_text(t, fonts, *comic.caption_text_area(b, style), size + 1, size + 1).truncated
                       for t, b in zip(texts, boxes))


def run_node(comfy_nodes, images, captions, **overrides):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionComicPage"]()
    kwargs = dict(layout="classic comic", rows=2, columns=2, page_width=512, page_height=0, margin=16, gutter=8,
                  background="#ffffff", caption_position="below panel", caption_height=0.2, max_font_size=32,
                  border=2, layout_seed=0)
    kwargs.update(overrides)
    return node.compose(images, captions, **kwargs)[0]


def test_comic_node_pages_and_determinism(comfy_nodes):
    images, _ = panel_batch(9)
    captions = "One\n\nThree 三\nFour\nFive\n\nSeven\nEight\nNine\n"
    pages = run_node(comfy_nodes, images, captions)
    assert pages.ndim == 4 and pages.shape[0] >= 2 and pages.shape[-1] == 3 and pages.shape[2] == 512
    assert pages.dtype == torch.float32 and 0 <= pages.min() and pages.max() <= 1
    assert torch.equal(pages, run_node(comfy_nodes, images, captions))
    for layout in ("grid", "horizontal strip"):
        out = run_node(comfy_nodes, images, captions, layout=layout, caption_position="over panel")
        assert out.shape[0] == (3 if layout == "grid" else 5)
    no_captions = run_node(comfy_nodes, images, "", layout="grid")
    captioned = run_node(comfy_nodes, images, captions, layout="grid")
    assert no_captions.shape[1] < captioned.shape[1]  # auto height leaves room for caption boxes only if needed


def test_comic_node_four_panel_classic_page_fills_the_page(comfy_nodes):
    """The reported page: 4 panels, classic comic, automatic height. Only margins and gutters show the
    page background; the pictures and caption boxes cover the rest."""
    images, _ = panel_batch(4, h=64, w=64)
    captions = "Hi.\nA much longer caption that needs several lines of text to fit\nThree\nFour"
    for seed in range(6):
        (page,) = run_node(comfy_nodes, images, captions, background="#ff00ff", layout_seed=seed)
        array = (page.numpy() * 255).round().astype(int)
        inner = array[16:-16, 16:-16]
        magenta = (np.abs(inner - (255, 0, 255)).max(axis=-1) <= 2).mean()
        gutters = 8 * (inner.shape[0] + inner.shape[1]) / (inner.shape[0] * inner.shape[1])
        assert magenta <= gutters + 0.01, (seed, magenta)


def test_comic_node_rejects_mismatched_captions_and_colours(comfy_nodes):
    images, _ = panel_batch(3)
    with pytest.raises(ValueError, match="captions has 2 lines but the image batch has 3 panels"):
        run_node(comfy_nodes, images, "a\nb")
    with pytest.raises(ValueError, match="is not a colour"):
        run_node(comfy_nodes, images, "", background="not-a-colour")
