"""Style presets: a positive template around each panel prompt, and a negative prompt.

The names are the nine styles of the official StoryDiffusion demo, so workflows and habits carry
over; the template wording is this pack's own. `{prompt}` marks where the panel prompt goes.
"""
from __future__ import annotations

NO_STYLE = "(No style)"

# name -> (positive template, negative prompt)
STYLES: dict[str, tuple[str, str]] = {
    NO_STYLE: ("{prompt}", ""),
    "Japanese Anime": (
        ("anime illustration of {prompt}, japanese animation studio style, expressive, clean cel shading, "
         "best quality, high resolution"),
        "low quality, low resolution, blurry, photo, 3d render",
    ),
    "Digital/Oil Painting": (
        ("{prompt}, digital oil painting, visible brush strokes, rich colours, painterly lighting, "
         "fine art, highly detailed"),
        "photo, photorealistic, 3d render, anime, cartoon, flat colours, low quality, blurry",
    ),
    "Pixar/Disney Character": (
        ("3d animated feature film character, {prompt}, pixar and disney style, soft studio lighting, "
         "high quality render"),
        ("lowres, bad anatomy, bad hands, extra fingers, missing fingers, text, watermark, signature, "
         "worst quality, low quality, jpeg artifacts, blurry, photo, grayscale"),
    ),
    "Photographic": (
        ("photograph of {prompt}, 35mm film, natural light, shallow depth of field, sharp focus, "
         "professional photography, highly detailed"),
        "drawing, painting, illustration, sketch, cartoon, anime, 3d render, deformed, blurry, noisy, ugly",
    ),
    "Comic book": (
        ("comic book panel, {prompt}, bold ink outlines, halftone shading, graphic novel art, "
         "vibrant colours, highly detailed"),
        "photograph, photorealistic, stock photo, 3d render, deformed, glitch, noisy, blurry",
    ),
    "Line art": (
        ("line art drawing of {prompt}, clean black lines on white, minimalist, vector illustration, "
         "professional, sleek"),
        ("photograph, photorealistic, colour, shading, painting, oil, acrylic, blurry, noisy, deformed, "
         "bad anatomy, 3d render"),
    ),
    "Black and White Film Noir": (
        ("black and white film noir still, {prompt}, high contrast, hard shadows, venetian blind light, "
         "1940s detective movie, dramatic, grainy monochrome"),
        "colour, colorful, saturated, bright daylight, cartoon, anime, painting, low contrast, blurry",
    ),
    "Isometric Rooms": (
        ("isometric cutaway diorama of a room, {prompt}, tiny detailed 3d scene, soft lighting, "
         "clean background, miniature, high quality render"),
        "photograph, flat, perspective distortion, blurry, noisy, deformed, text, watermark, low quality",
    ),
}

STYLE_NAMES: tuple[str, ...] = tuple(STYLES)


def _check(style: str) -> tuple[str, str]:
    if style not in STYLES:
        raise ValueError(f"unknown style preset {style!r}; choose one of: {', '.join(STYLE_NAMES)}")
    return STYLES[style]


def apply_style(style: str, prompt: str) -> str:
    """The panel prompt wrapped in the style's positive template."""
    template, _ = _check(style)
    return template.replace("{prompt}", prompt)


def style_negative(style: str, negative: str = "") -> str:
    """The style's negative prompt followed by the user's; empty parts are left out."""
    _, style_neg = _check(style)
    parts = [p.strip() for p in (style_neg, negative) if p and p.strip()]
    return ", ".join(parts)
