"""Node: Wan 2.1 I2V / FLF2V image cross-attention steered frame by frame by per-frame CLIP embeddings."""
from __future__ import annotations

from ..common.sockets import CATEGORY
from ..wan import comfy_adapter


class WanPerFrameSemantics:
    DESCRIPTION = ("Patches a copy of a Wan 2.1 I2V / FLF2V model so that each latent frame's video tokens attend to "
                   "the CLIP image tokens predicted for its own time (the Semantic Motion Predictor's per-frame "
                   "embeddings) instead of the fixed start/end pair from WanFirstLastFrameToVideo. Wan packs 4 video "
                   "frames into one latent frame (the first alone): a latent frame uses the mean embedding of its frames; "
                   "embeddings are spread over the video by time. Strength 0 leaves the model unchanged. Wan 2.2 has no "
                   "image cross-attention and is refused.")
    CATEGORY = f"{CATEGORY}/video"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The patched Wan model; the input model is left unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Wan 2.1 I2V or FLF2V model (it has image cross-attention). Wan 2.2 and "
                                           "text-to-video models are refused."}),
            "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                "tooltip": "Per-frame CLIP vision output from the Semantic Motion Predictor (penultimate tokens, "
                           "frames x 257 x 1280, ViT-H as in the Wan workflow). Frame 0 maps to the first video frame and "
                           "the last to the last video frame; other counts are spread over the video by time."}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "Blend of the image cross-attention: 0 = plain FLF2V/I2V (unchanged), 1 = each "
                                              "latent frame sees only its predicted tokens. Above 0 this is off the model's "
                                              "training distribution (trained with the fixed start/end images): start low."}),
        }}

    def apply(self, model, clip_vision_output, strength):
        return (comfy_adapter.apply_per_frame_semantics(model, clip_vision_output, strength),)


NODE_CLASS_MAPPINGS = {"StoryDiffusionWanPerFrameSemantics": WanPerFrameSemantics}
NODE_DISPLAY_NAME_MAPPINGS = {"StoryDiffusionWanPerFrameSemantics": "Wan Per-frame Semantics (StoryDiffusion)"}
