"""Comic page node: a batch of panel images + captions -> a batch of comic pages."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..common.sockets import CATEGORY
from ..story import comfy_adapter, comic


def split_captions(text: str, panel_count: int) -> list[str]:
    """One caption per line (blank line = no caption); an empty text means no captions at all."""
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        return [""] * panel_count
    lines = text.split("\n")
    if len(lines) == panel_count + 1 and lines[-1] == "":
        lines = lines[:-1]  # a trailing newline
    if len(lines) != panel_count:
        raise ValueError(
            f"captions has {len(lines)} lines but the image batch has {panel_count} panels; write exactly one "
            f"line per panel (a blank line for a panel without caption), or connect the story node's captions "
            f"and generate a latent batch of its panel_count")
    return lines


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE batch [N, H, W, 3], got shape {list(images.shape)}")
    array = np.clip(images[..., :3].detach().cpu().float().numpy() * 255.0, 0, 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def images_to_tensor(pages: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pages]))


class StoryDiffusionComicPage:
    DESCRIPTION = (
        "Lays out a batch of panel images as comic pages with typeset captions (word wrap, automatic font "
        "size, one size per page, CJK and other scripts via the bundled font). Layouts: grid, classic comic "
        "(single panels mixed with pairs of half-width panels side by side) and horizontal strip. Panels fill "
        "the page: each picture fills its panel (scaled, never stretched, centre-cropped to the panel's "
        "shape), and a page with fewer panels than cells gets fewer, larger panels. More panels than fit on "
        "one page give several pages."
    )
    CATEGORY = f"{CATEGORY}/story"
    FUNCTION = "compose"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("pages",)
    OUTPUT_TOOLTIPS = ("The comic pages as an image batch (one image per page, all the same size).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The panel images in story order (e.g. VAE Decode of the story batch)."}),
                "captions": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "One caption per panel, one per line (blank line = no caption); connect the story "
                               "node's captions. Leave empty for no captions. Hidden while linked."}),
                "layout": (list(comic.LAYOUTS), {
                    "default": comic.LAYOUT_CLASSIC,
                    "tooltip": "grid: rows x columns; classic comic: cells holding one panel or two half-width "
                               "panels side by side; horizontal strip: one row of 'columns' panels per page."}),
                "rows": ("INT", {"default": 2, "min": 1, "max": 16,
                                 "tooltip": "Rows of cells per page (ignored by horizontal strip)."}),
                "columns": ("INT", {"default": 2, "min": 1, "max": 16,
                                    "tooltip": "Cells per row (panels per strip for horizontal strip)."}),
                "page_width": ("INT", {"default": 1536, "min": 64, "max": 16384, "step": 8,
                                       "tooltip": "Page width in pixels."}),
                "page_height": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8,
                                        "tooltip": "Page height in pixels; 0 = automatic, so that cells match the "
                                                   "panels' aspect ratio (a story shorter than one page gets "
                                                   "fewer rows/columns). A fixed height crops the pictures "
                                                   "to the cells' shape."}),
                "margin": ("INT", {"default": 32, "min": 0, "max": 2048,
                                   "tooltip": "Empty border around the page content, in pixels."}),
                "gutter": ("INT", {"default": 16, "min": 0, "max": 1024,
                                   "tooltip": "Space between panels, in pixels."}),
                "background": ("STRING", {"default": "#ffffff",
                                          "tooltip": "Page colour: #rrggbb, a name like white, or rgb(r,g,b)."}),
                "caption_position": (list(comic.CAPTION_POSITIONS), {
                    "default": comic.CAPTION_BELOW,
                    "tooltip": "below panel: the caption box takes the bottom of the panel's cell; over panel: "
                               "the box is drawn over the bottom of the picture."}),
                "caption_height": ("FLOAT", {"default": 0.18, "min": 0.05, "max": 0.6, "step": 0.01,
                                             "tooltip": "Caption box height as a fraction of the panel cell."}),
                "max_font_size": ("INT", {"default": 40, "min": 6, "max": 512,
                                          "tooltip": "Largest caption font size. All captions of a page share one "
                                                     "size: the largest at which every one fits its box "
                                                     "(down to 8 px, then a caption is cut with …)."}),
                "border": ("INT", {"default": 3, "min": 0, "max": 64,
                                   "tooltip": "Panel outline width in pixels (0 = none)."}),
                "layout_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                        "tooltip": "Seed for the classic comic mix of single panels and side-by-side pairs: "
                                                   "the same seed gives the same pages."}),
            }
        }

    def compose(self, images, captions, layout, rows, columns, page_width, page_height, margin, gutter,
                background, caption_position, caption_height, max_font_size, border, layout_seed):
        panels = tensor_to_images(images)
        caption_list = split_captions(captions, len(panels))
        has_captions = any(c.strip() for c in caption_list)
        aspect = panels[0].width / panels[0].height
        fraction = caption_height if has_captions and caption_position == comic.CAPTION_BELOW else 0.0
        if page_height == 0:
            rows, columns = self.rows_and_columns(len(panels), layout, rows, columns)
            page_height = comic.auto_page_height(page_width, margin, gutter, rows, columns, layout, aspect, fraction)
        style = comic.PageStyle(
            page_w=page_width, page_h=page_height, background=comic.parse_colour(background), border=border,
            caption_position=caption_position, caption_fraction=caption_height, max_font_size=max_font_size)
        pages = comic.layout_pages(len(panels), layout, page_width, page_height, margin, gutter, rows, columns,
                                   seed=layout_seed, panel_aspect=aspect * (1.0 - fraction))
        rendered = comic.render_pages(panels, caption_list, pages, style,
                                      progress=comfy_adapter.progress_bar(len(pages)))
        return (images_to_tensor(rendered),)

    @staticmethod
    def rows_and_columns(panel_count, layout, rows, columns):
        """For an automatic page height: a story shorter than one page gets a page of its own size (3
        panels on a 2 x 2 grid: 2 columns, 2 rows; 2 panels: one row), not a tall page of large panels."""
        if layout == comic.LAYOUT_STRIP:
            return rows, min(columns, panel_count)
        if panel_count < rows * columns:
            columns = min(columns, panel_count)
            rows = min(rows, -(-panel_count // columns))
        return rows, columns

NODE_CLASS_MAPPINGS = {"StoryDiffusionComicPage": StoryDiffusionComicPage}
NODE_DISPLAY_NAME_MAPPINGS = {"StoryDiffusionComicPage": "Comic Page (StoryDiffusion)"}
