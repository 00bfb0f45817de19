"""Comic pages: layout geometry, aspect-preserving placement, caption typesetting (CJK too), determinism."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def comic(pack):
    import comfyui_storydiffusion.story.comic as comic

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
        assert all(len(p) == per_page for p in pages[:-1])
    else:
        assert all(len(p) <= 2 * per_page for p in pages)


def test_classic_mixes_single_and_stacked_panels_by_seed(comic):
    layouts = {seed: comic.layout_pages(24, "classic comic", 1200, 1600, 20, 10, 3, 2, seed=seed) for seed in range(6)}
    assert layouts[0] == comic.layout_pages(24, "classic comic", 1200, 1600, 20, 10, 3, 2, seed=0)
    assert len({str(v) for v in layouts.values()}) > 1  # the seed changes the mix
    heights = {r.h for pages in layouts.values() for page in pages for r in page}
    cell_h = (1600 - 40 - 2 * 10) / 3
    assert any(h > cell_h * 0.9 for h in heights) and any(h < cell_h * 0.55 for h in heights)


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


def glyph_pixels(fonts, text, size=32):
    from PIL import ImageDraw

    image = Image.new("L", (size * (len(text) + 2), size * 2), 0)
    fonts.draw(ImageDraw.Draw(image), (size // 2, size * 3 // 2), text, size, 255)
    return np.asarray(image)


@pytest.mark.parametrize("text", ["日本語", "한국어", "中文字", "Ωμέγα", "Жук", "Éclair"])
def test_unicode_renders_real_glyphs_not_tofu(comic, fonts, text):
    """Each character must draw something that differs from the font's .notdef box."""
    tofu = glyph_pixels(fonts, comic._MISSING_PROBE)
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
            _, where = comic.fit_image(pil[index], picture)
            if box is not None:  # below-panel captions: picture + box centred together, box as wide as the picture
                top = rect.y + (rect.h - where.h - box.h) // 2
                where = comic.Rect(where.x, top, where.w, where.h)
                box = comic.Rect(where.x, where.bottom, where.w, box.h)
                assert rect.y <= where.y and box.bottom <= rect.bottom
            centre = array[where.y + where.h // 2, where.x + where.w // 2]
            assert tuple(centre) == colours[index]  # the right panel is in the right place
            if box is not None:
                inside = array[box.y + 3:box.bottom - 3, box.x + 3:box.right - 3]
                assert (inside < 100).all(axis=-1).sum() > 20  # dark caption text pixels in the box
            index += 1


def run_node(comfy_nodes, images, captions, **overrides):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionComicPage"]()
    kwargs = dict(layout="classic comic", rows=2, columns=2, page_width=512, page_height=0, margin=16, gutter=8,
                  background="#ffffff", caption_position="below panel", caption_height=0.2, max_font_size=32,
                  border=2, layout_seed=0)
    kwargs.update(overrides)
    return node.compose(images, captions, **kwargs)[0]


def test_comic_node_pages_and_determinism(comfy_nodes):
    images, _ = panel_batch(9)
    captions = "\n".join(["One", "", "Three 三", "Four", "Five", "", "Seven", "Eight", "Nine"]) + "\n"
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


def test_comic_node_rejects_mismatched_captions_and_colours(comfy_nodes):
    images, _ = panel_batch(3)
    with pytest.raises(ValueError, match="captions has 2 lines but the image batch has 3 panels"):
        run_node(comfy_nodes, images, "a\nb")
    with pytest.raises(ValueError, match="is not a colour"):
        run_node(comfy_nodes, images, "", background="not-a-colour")
