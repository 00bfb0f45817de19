"""Nodes: load an IP-Adapter file; condition every latent frame on its own CLIP image embedding."""
from __future__ import annotations

import torch

from ..common.sockets import CATEGORY, EMBEDS_TYPE, IPADAPTER_TYPE
from ..ipadapter import comfy_adapter
from ..ipadapter.weights import inspect_ipadapter


class IPAdapterLoader:
    DESCRIPTION = ("Loads a public IP-Adapter weight file (plain, plus or full-face; SD1.5 or SDXL) from "
                   "models/ipadapter for per-frame semantic conditioning.")
    CATEGORY = f"{CATEGORY}/motion"
    RETURN_TYPES = (IPADAPTER_TYPE,)
    RETURN_NAMES = ("ipadapter",)
    OUTPUT_TOOLTIPS = ("The IP-Adapter weights (the same IPADAPTER value ComfyUI_IPAdapter_plus uses).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_file": (comfy_adapter.ipadapter_filenames(), {
            "tooltip": "An IP-Adapter file in models/ipadapter, e.g. ip-adapter_sd15.safetensors or "
                       "ip-adapter-plus_sdxl_vit-h.safetensors (.safetensors or .bin)."})}}

    def load(self, ipadapter_file):
        return (comfy_adapter.load_ipadapter(ipadapter_file),)


class PerFrameSemanticConditioning:
    DESCRIPTION = ("Patches a copy of the model so that latent frame j cross-attends to image embedding j "
                   "(IP-Adapter decoupled cross-attention). The latent batch is the frames: use it with a plain "
                   "UNet (frames as panels), with the consistent attention patch, or with AnimateDiff motion "
                   "modules. Feed the Semantic Motion Predictor's per-frame embeddings, or CLIP Vision Encode of "
                   "one image per frame.")
    CATEGORY = f"{CATEGORY}/motion"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The patched model; the input model is left unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model (matching the IP-Adapter's family)."}),
                "ipadapter": (IPADAPTER_TYPE, {"tooltip": "From the IP-Adapter loader (this pack's or IPAdapter_plus's)."}),
                "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05,
                                     "tooltip": "Strength of the image branch: 0 leaves the model unchanged."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Fraction of the sampling schedule where the image conditioning starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Fraction of the sampling schedule where it stops."}),
            },
            "optional": {
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "Per-frame CLIP embeddings, batch = number of frames (or 1 for all frames): from "
                               "CLIP Vision Encode or the Semantic Motion Predictor. Plain adapters read image_embeds, "
                               "plus/full ones penultimate_hidden_states."}),
                "embeds": (EMBEDS_TYPE, {
                    "tooltip": "Per-frame embeddings as a raw tensor (IPAdapter_plus EMBEDS layout: [frames, dim] for "
                               "plain adapters, [frames, tokens, dim] for plus). Used when clip_vision_output is not connected."}),
                "negative_embeds": (EMBEDS_TYPE, {
                    "tooltip": "Embeddings for the negative (uncond) pass, 1 or one per frame. Default: IP-Adapter's own "
                               "unconditional input (zeros for plain adapters, a black image for plus/full-face)."}),
                "clip_vision": ("CLIP_VISION", {
                    "tooltip": "Used to encode the black image for plus/full-face adapters (their unconditional input, "
                               "as in the reference implementation). Without it, zeros as before (a warning is logged). "
                               "Plain adapters do not need it."}),
            },
        }

    def apply(self, model, ipadapter, weight, start_percent, end_percent, clip_vision_output=None, embeds=None,
              negative_embeds=None, clip_vision=None):
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): swap them.")
        spec = inspect_ipadapter(comfy_adapter.unwrap_ipadapter(ipadapter), "the IPADAPTER input")
        frames = self._embeddings(spec, clip_vision_output, embeds)
        negative = None if negative_embeds is None else self._as_tensor(negative_embeds, "negative_embeds")
        return (comfy_adapter.apply_per_frame_ipadapter(model, ipadapter, frames, negative, weight, start_percent, end_percent,
                                                        clip_vision=clip_vision),)

    @staticmethod
    def _as_tensor(value, name) -> torch.Tensor:
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            value = torch.cat(list(value), dim=0)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of embeddings, got {type(value).__name__}.")
        return value

    def _embeddings(self, spec, clip_vision_output, embeds) -> torch.Tensor:
        if clip_vision_output is not None:
            value = getattr(clip_vision_output, spec.input_field, None)
            if value is None:
                raise ValueError(f"The CLIP_VISION_OUTPUT has no {spec.input_field}, which this {spec.kind} IP-Adapter needs.")
            return value
        if embeds is not None:
            return self._as_tensor(embeds, "embeds")
        raise ValueError("Connect per-frame embeddings: clip_vision_output (CLIP Vision Encode or the Semantic Motion "
                         "Predictor) or embeds.")


NODE_CLASS_MAPPINGS = {
    "StoryDiffusionIPAdapterLoader": IPAdapterLoader,
    "StoryDiffusionPerFrameSemanticConditioning": PerFrameSemanticConditioning,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StoryDiffusionIPAdapterLoader": "IP-Adapter Loader (StoryDiffusion)",
    "StoryDiffusionPerFrameSemanticConditioning": "Per-frame Semantic Conditioning (StoryDiffusion)",
}
