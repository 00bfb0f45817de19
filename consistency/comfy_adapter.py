"""The one module of consistency/ that speaks ComfyUI: encoding panels and references with a CLIP_VISION
(core's `encode_image`: its own resize, crop and normalisation for CLIP, SigLIP and DINOv2 files) and turning
the scores into the node's outputs (floats, report, heatmap IMAGE). The numbers are consistency/score.py, the
picture consistency/heatmap.py.

What core's encoders give, checked in comfy/clip_vision.py of ComfyUI 0.3.75 (and 0.8.0, 0.29.0):
`image_embeds` is CLIP's projected pooled vector [N, D], DINOv2's (and DINOv3's) class token after the final
norm [N, D], and for SigLIP the final-norm features of every token [N, T, D] (ComfyUI does not load SigLIP's
attention-pooling head, so there is no pooled vector); score.pooled averages those tokens. The node always uses
image_embeds; penultimate_hidden_states (what IP-Adapter plus reads) are not an image-level embedding.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .heatmap import Group, render_heatmap
from .images import center_region, rgb, size_groups
from .score import (
    CharacterReference,
    ConsistencyError,
    StoryScores,
    check_references,
    format_report,
    panel_rows,
    pooled,
    score_story,
)

log = logging.getLogger("StoryDiffusion")

ENCODER_NAMES = {"Dinov2Model": "DINOv2", "DINOv3ViTModel": "DINOv3"}


@dataclass(frozen=True)
class ConsistencyResult:
    scores: StoryScores
    report: str
    heatmap: torch.Tensor  # IMAGE [1, H, W, 3]
    encode_calls: int  # how many times the CLIP vision model ran (one per distinct image size)


def encoder_name(clip_vision, image_embeds: torch.Tensor) -> str:
    """'CLIP ViT, 224 px, 768-d image_embeds' and the like, for the report."""
    model = getattr(clip_vision, "model", None)
    kind = ENCODER_NAMES.get(type(model).__name__)
    if kind is None:
        kind = "SigLIP" if image_embeds.ndim == 3 else "CLIP"
    size = getattr(clip_vision, "image_size", "?")
    if image_embeds.ndim == 3:
        return (f"{kind} at {size} px, image_embeds = {image_embeds.shape[1]} token features of width "
                f"{image_embeds.shape[2]}, averaged (ComfyUI loads no pooling head for it)")
    return f"{kind} at {size} px, {image_embeds.shape[-1]}-d image_embeds"


def encode(clip_vision, batches: list[torch.Tensor], crop: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Encode image batches with as few model calls as their sizes allow (one per distinct height x width).

    Returns (pooled float64 [n_i, D] per batch, the raw image_embeds per batch, number of calls)."""
    if not callable(getattr(clip_vision, "encode_image", None)):
        raise TypeError(f"clip_vision must be a CLIP_VISION from Load CLIP Vision, got {type(clip_vision).__name__}")
    batches = [rgb(b) for b in batches]
    pooled_out: list = [None] * len(batches)
    raw_out: list = [None] * len(batches)
    groups = size_groups(batches)
    with torch.no_grad():
        for _, members in groups:
            joined = torch.cat([batches[i] for i in members]) if len(members) > 1 else batches[members[0]]
            embeds = clip_vision.encode_image(joined, crop=crop)["image_embeds"]
            vectors = pooled(embeds)
            start = 0
            for i in members:
                count = batches[i].shape[0]
                pooled_out[i] = vectors[start:start + count]
                raw_out[i] = embeds[start:start + count]
                start += count
    return pooled_out, raw_out, len(groups)


def _legend(c, story_rows) -> str:
    def num(v):
        return "-" if v is None else f"{v:.3f}"

    panels = [str(story_rows[r]) for r in c.rows]
    shown = ", ".join(panels[:12]) + (", ..." if len(panels) > 12 else "")
    text = f"[{c.name}] self {num(c.self_mean)} (min {num(c.self_min)})"
    if c.reference_count:
        text += f", cross {num(c.cross_mean)}"
    return text + (f", panels {shown}" if shown else ", no scored panel")


def score(clip_vision, panels: torch.Tensor, story, references=(), crop: bool = True, region: float = 1.0,
          selected_rows=None) -> ConsistencyResult:
    """Score a story's panels (IMAGE batch, story order or `selected_rows`) and optional CharacterReferences."""
    if panels is None or not isinstance(panels, torch.Tensor) or panels.ndim != 4:
        shape = tuple(panels.shape) if isinstance(panels, torch.Tensor) else type(panels).__name__
        raise ConsistencyError(f"panels must be an IMAGE batch [panels, height, width, 3], got {shape}.")
    story_length = len(story.panels)
    rows = panel_rows(int(panels.shape[0]), story_length, selected_rows)
    names = [c.name for c in story.characters]
    references = tuple(references or ())
    for ref in references:
        if not isinstance(ref, CharacterReference):
            raise TypeError(f"references must come from Story Consistency Reference nodes, got {type(ref).__name__}")
    check_references(references, names)
    panels = center_region(rgb(panels), region)

    batches = [panels] + [ref.images for ref in references]
    vectors, raw, calls = encode(clip_vision, batches, crop)
    reference_embeds = {ref.character: vectors[i + 1] for i, ref in enumerate(references)}
    characters = [story.panels[r].characters for r in rows]
    scores = score_story(vectors[0], characters, names, reference_embeds, story_rows=rows)

    encoder = encoder_name(clip_vision, raw[0])
    report = format_report(scores, f"{encoder}, crop {'center' if crop else 'none'}"
                                   + (f", centre region {region:g}" if region < 1.0 else ""), story_length)
    sizes = sorted({(int(b.shape[2]), int(b.shape[1])) for b in batches})
    if len(sizes) > 1:
        note = (f"Images of {len(sizes)} sizes ({', '.join(f'{w}x{h}' for w, h in sizes)}) were encoded in {calls} "
                f"batches; ComfyUI's CLIP vision preprocessing resizes every image to the encoder's "
                f"{getattr(clip_vision, 'image_size', '?')} px input ({'centre-cropped' if crop else 'squashed'}), "
                "as CLIP Vision Encode does.")
        log.info("Story Consistency: %s", note)
        report += "\n" + note
    for c in scores.characters:
        if c.reference_count and not c.rows:
            log.warning("Story Consistency: references for [%s], but no scored panel shows it.", c.name)

    groups = [Group(c.name, c.rows, _legend(c, rows)) for c in scores.characters]
    title = f"self {_fmt(scores.self_consistency)} (worst pair {_fmt(scores.self_min)})"
    if not math.isnan(scores.cross_consistency):
        title += f", cross {_fmt(scores.cross_consistency)}"
    title += f"  |  {encoder.split(',')[0]}"
    picture = render_heatmap(scores.matrix.numpy(), panels.cpu().float().numpy(), [str(r) for r in rows], groups, title,
                             unscored=scores.unscored)
    heatmap = torch.from_numpy(picture).float().div(255.0).unsqueeze(0)
    return ConsistencyResult(scores, report, heatmap, calls)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"
