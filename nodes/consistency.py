"""Nodes: score how consistent a story's characters look (Story Consistency) and bind reference images to them."""
from __future__ import annotations

from ..common.sockets import CATEGORY, CONSISTENCY_REFERENCES_TYPE, PANELS_TYPE, STORY_TYPE
from ..consistency import comfy_adapter
from ..consistency.score import CharacterReference, ConsistencyError

SUBCATEGORY = f"{CATEGORY}/consistency"
CROPS = ("center", "none")


class StoryConsistencyReference:
    DESCRIPTION = ("Reference images of one story character: for Identity Bank From Images (panels then share "
                   "attention tokens with these images) and for Story Consistency's cross score (how close the "
                   "character's panels are to these images). Chain one node per character, like PhotoMaker Character.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = (CONSISTENCY_REFERENCES_TYPE,)
    RETURN_NAMES = ("references",)
    OUTPUT_TOOLTIPS = (("The references bound so far: connect to the next Story Consistency Reference, to Identity "
                        "Bank From Images or to Story Consistency."),)
    FUNCTION = "bind"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "character": ("STRING", {"default": "", "tooltip": "The character's name exactly as in the Story node's "
                                                               "characters text ([Mia] ... -> Mia)."}),
            "images": ("IMAGE", {"tooltip": "One or more images of this character (any size: each batch is resized "
                                            "and cropped to the encoder's input as CLIP Vision Encode does). A tight "
                                            "crop of the character scores the character rather than the scenery."}),
        }, "optional": {
            "references": (CONSISTENCY_REFERENCES_TYPE, {"tooltip": "References bound so far (chain the nodes)."}),
        }}

    def bind(self, character, images, references=None):
        name = character.strip()
        if not name:
            raise ConsistencyError("Story Consistency Reference needs the character's name (as in the story's "
                                   "characters text).")
        if images is None or images.ndim != 4 or images.shape[0] == 0:
            raise ConsistencyError(f"Story Consistency Reference for {name!r}: the IMAGE batch is empty; connect at "
                                   "least one image.")
        previous = tuple(references or ())
        if any(r.character == name for r in previous):
            raise ConsistencyError(f"{name!r} already has a Story Consistency Reference node in this chain: give each "
                                   "character one node (batch its images together).")
        return (previous + (CharacterReference(name, images),),)


class StoryConsistency:
    DESCRIPTION = (
        "Measures how consistent each character looks across the story: every panel is encoded once (one batch) "
        "with a CLIP vision model (CLIP, SigLIP or DINOv2, as Load CLIP Vision loads it) and compared by cosine "
        "similarity. 'self' = the panels of one character compared with each other (mean and worst pair); "
        "'cross' = the character's panels compared with its reference images. [NC] panels and panels without the "
        "character are left out. Also a report (per character, per panel, the least consistent panel) and a "
        "panel x panel heatmap. Real encoder weights are needed for meaningful numbers.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("self_consistency", "self_min", "cross_consistency", "report", "heatmap")
    OUTPUT_TOOLTIPS = (
        ("Mean over characters of the mean cosine similarity between the panels that show the character (1 = "
         "identical embeddings). NaN when no character appears in two scored panels."),
        "The lowest similarity of any pair of panels of one character (the worst pair of the story); NaN likewise.",
        ("Mean over characters of the mean similarity of their panels to their reference images; NaN without "
         "references."),
        "Per character and per panel: self and cross scores, the worst pair and the least consistent panel.",
        ("Panel x panel similarity heatmap: panel thumbnails on both axes, each character's pairs outlined in its "
         "colour, a colour bar and one legend line per character."),
    )
    OUTPUT_NODE = True
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", {
                    "tooltip": "The image encoder, from Load CLIP Vision: CLIP (ViT-L/H/bigG; the paper's "
                               "character similarity is CLIP), DINOv2 (image-to-image similarity, used for DINO-I "
                               "scores) or SigLIP (its token features are averaged: ComfyUI loads no pooling head)."}),
                "panels": ("IMAGE", {"tooltip": "The story's panels in story order (VAE Decode, or Panels In Story "
                                                "Order), one image per story panel; all are encoded in one batch."}),
                "story": (STORY_TYPE, {"tooltip": "The Story node's story: which characters each panel shows."}),
                "crop": (list(CROPS), {"default": "center",
                                       "tooltip": "center: the shorter side is scaled to the encoder's input and the "
                                                  "centre square kept (as CLIP Vision Encode); none: the whole image "
                                                  "squashed to a square."}),
                "center_region": ("FLOAT", {
                    "default": 1.0, "min": 0.2, "max": 1.0, "step": 0.05,
                    "tooltip": "Keep only the middle part of each panel before encoding (0.6 = the central 60% of its "
                               "width and height), where story panels usually put the character: less background in "
                               "the score. Not a character detector. References are always used whole."}),
            },
            "optional": {
                "references": (CONSISTENCY_REFERENCES_TYPE, {
                    "tooltip": "Reference images per character (Story Consistency Reference nodes, chained): each "
                               "character's panels are compared with its own references only."}),
                "panel_indices": (PANELS_TYPE, {
                    "tooltip": "To score only some panels: Select Story Panels' `panels` output, for the images "
                               "sampled from that selection. Not connected = one image per story panel."}),
            },
        }

    def score(self, clip_vision, panels, story, crop, center_region, references=None, panel_indices=None):
        if crop not in CROPS:
            raise ConsistencyError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}.")
        selected = None
        if panel_indices is not None:
            if panel_indices.story_length != len(story.panels):
                raise ConsistencyError(f"panel_indices comes from a story of {panel_indices.story_length} panels but "
                                       f"this story has {len(story.panels)}: connect the selection of this story.")
            selected = panel_indices.rows
        result = comfy_adapter.score(clip_vision, panels, story, references or (), crop=crop == "center",
                                     region=float(center_region), selected_rows=selected)
        s = result.scores
        return {"ui": {"text": [result.report]},
                "result": (s.self_consistency, s.self_min, s.cross_consistency, result.report, result.heatmap)}


NODE_CLASS_MAPPINGS = {
    "StoryDiffusionStoryConsistency": StoryConsistency,
    "StoryDiffusionConsistencyReference": StoryConsistencyReference,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StoryDiffusionStoryConsistency": "Story Consistency (StoryDiffusion)",
    "StoryDiffusionConsistencyReference": "Story Consistency Reference (StoryDiffusion)",
}
