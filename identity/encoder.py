"""PhotoMaker v1 ID encoder: CLIP ViT-L/14 image tower + two projections + the fuse MLP.

The module tree mirrors the `id_encoder` part of the public `photomaker-v1.bin`, so its
state dict loads key for key:

    vision_model.*                 transformers CLIPVisionTransformer (ViT-L/14: 24 layers, width 1024)
    visual_projection.weight       1024 -> 768  (no bias)
    visual_projection_2.weight     1024 -> 1280 (no bias)
    fuse_module.mlp1/mlp2/layer_norm.*   see identity/fuse.py

The sizes are read from the state dict shapes, never assumed, so the real file and the tiny
files the tests write both load. Plain torch + transformers; no ComfyUI.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..common.errors import StoryDiffusionError
from .fuse import FuseModule

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HEAD_DIM = 64  # every released CLIP ViT uses 64-wide heads; head count is not in the state dict

# transformers' CLIPVisionConfig fields for the real ViT-L/14 (what a full photomaker-v1.bin holds)
VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
           "patch_size": 14, "image_size": 224, "projection_dim": 768}

# keys that older transformers versions saved as buffers; harmless when present
IGNORED_KEYS = {"vision_model.embeddings.position_ids"}


class IdWeightsError(StoryDiffusionError):
    """The id_encoder weights do not match the PhotoMaker v1 layout (message lists the keys)."""


def _shape(sd: dict, key: str, default: tuple) -> tuple:
    """A size-defining tensor's shape; the ViT-L/14 value when absent (the key check then names it)."""
    return tuple(sd[key].shape) if key in sd else default


def config_from_state_dict(sd: dict) -> dict:
    """The encoder sizes implied by the shapes of an `id_encoder` state dict."""
    v = VIT_L14
    hidden, channels, patch, _ = _shape(sd, "vision_model.embeddings.patch_embedding.weight",
                                        (v["hidden_size"], 3, v["patch_size"], v["patch_size"]))
    positions = _shape(sd, "vision_model.embeddings.position_embedding.weight",
                       ((v["image_size"] // patch) ** 2 + 1,))[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise IdWeightsError(f"vision_model.embeddings.position_embedding has {positions} rows; expected a square "
                             f"patch grid + 1 class token (257 for ViT-L/14 at 224 px).")
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise IdWeightsError(f"PhotoMaker id_encoder weights have no vision_model.encoder.layers.* keys (it has "
                             f"{len(sd)} keys, e.g. {sorted(sd)[:5]}): this is not a PhotoMaker v1 file.")
    intermediate = _shape(sd, "vision_model.encoder.layers.0.mlp.fc1.weight", (4 * hidden,))[0]
    projection = _shape(sd, "visual_projection.weight", (v["projection_dim"],))[0]
    projection_2 = _shape(sd, "visual_projection_2.weight", (2048 - projection,))[0]
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": max(layer_ids) + 1,
            "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM), "patch_size": patch, "num_channels": channels,
            "image_size": grid * patch, "projection_dim": projection, "projection_2_dim": projection_2}


class PhotoMakerIDEncoder(nn.Module):
    """Reference photos -> one ID embedding per photo, and the fuse of those into class-word embeddings."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel  # heavy: imported when a model is built

        self.config = dict(config)
        vision_config = CLIPVisionConfig(
            hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
            patch_size=config["patch_size"], image_size=config["image_size"],
            num_channels=config.get("num_channels", 3), projection_dim=config["projection_dim"],
            hidden_act="quick_gelu", layer_norm_eps=1e-5, attn_implementation="eager")
        tower = CLIPVisionModel(vision_config)
        # transformers 4.x wraps the tower in `.vision_model`; 5.x is the tower itself: same keys below us
        self.vision_model = getattr(tower, "vision_model", tower)
        self.visual_projection = nn.Linear(config["hidden_size"], config["projection_dim"], bias=False)
        self.visual_projection_2 = nn.Linear(config["hidden_size"], config["projection_2_dim"], bias=False)
        self.fuse_module = FuseModule(self.embed_dim)

    @property
    def embed_dim(self) -> int:
        """Width of an ID embedding = width of the text embedding it is fused into (2048 for SDXL)."""
        return self.config["projection_dim"] + self.config["projection_2_dim"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @classmethod
    def from_state_dict(cls, sd: dict, dtype: torch.dtype = torch.float32) -> PhotoMakerIDEncoder:
        """Build with the sizes found in `sd` and load it strictly (missing/unexpected keys are listed)."""
        sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
        encoder = cls(config_from_state_dict(sd))
        expected = set(encoder.state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise IdWeightsError("PhotoMaker id_encoder weights do not match the PhotoMaker v1 layout: "
                                 f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}.")
        own = encoder.state_dict()
        wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in sd.items()
                 if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise IdWeightsError(f"PhotoMaker id_encoder weights have inconsistent shapes: {_listing(wrong)}.")
        encoder.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
        return encoder.to(dtype).eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, H, W, C] floats in 0..1 -> normalised [N, 3, S, S] pixels (S = 224 for ViT-L/14).

        The CLIP image processor's recipe: shortest side to S (bicubic, antialiased), centre crop,
        8-bit quantisation (the reference photos were 8-bit images), CLIP mean/std.
        """
        size = self.image_size
        x = images[..., :3].movedim(-1, 1).float()
        if x.shape[2] != size or x.shape[3] != size:
            scale = size / min(x.shape[2], x.shape[3])
            x = torch.nn.functional.interpolate(x, size=(round(scale * x.shape[2]), round(scale * x.shape[3])),
                                                mode="bicubic", antialias=True)
            top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
            x = x[:, :, top:top + size, left:left + size]
        x = torch.clip(255.0 * x, 0, 255).round() / 255.0
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def id_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, S, S] -> ID embeddings [N, embed_dim] (the two projections, concatenated)."""
        weight = self.visual_projection.weight
        pooled = self.vision_model(pixel_values.to(weight.device, weight.dtype)).pooler_output
        return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI-style IMAGE batch [N, H, W, C] -> ID embeddings [N, embed_dim]."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"PhotoMaker needs a batch of 1 or more reference photos; got a tensor of shape "
                             f"{tuple(images.shape)}.")
        return self.id_embeddings(self.preprocess(images))


def _listing(keys: list, limit: int = 12) -> str:
    if not keys:
        return "none"
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
