"""CLIP vision, SigLIP and DINOv2 encoders for the Story Consistency tests and bench (random weights, no downloads).

Two kinds, because `comfy.clip_vision.load` builds every model from its own full-size config (picked from the
file's layer count and widths), so a loadable file is a full-size file:
- tiny in-process encoders: ComfyUI's own ClipVisionModel from a small JSON config of each model_type
  (clip_vision_model, siglip_vision_model, dinov2), weights seeded; its encode_image is core's preprocessing and
  forward, as in a real run. Each of these runs a panel in milliseconds.
- full-size files with the public key names and shapes (CLIP ViT-L/14 from workflow_fixtures, SigLIP so400m
  patch14-384 with its attention-pooling head, DINOv2 large), written once per machine into .harness/cache and
  checked to load through core's loader with every weight used. A forward at these sizes takes 10-70 s per image
  on a small CPU, so the tests run the node on one of them only (ViT-L).
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import torch

import comfy_env
import tiny_models

KINDS = ("clip", "siglip", "dinov2")


def tiny_config(kind: str) -> dict:
    """A small config of core's model class for `kind` (DINOv2's embeddings fix 518 px / patch 14 in core)."""
    if kind == "clip":
        return {"hidden_act": "gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
                "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
                "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 24}
    if kind == "siglip":
        return {"hidden_act": "gelu_pytorch_tanh", "hidden_size": 32, "image_size": 28, "intermediate_size": 64,
                "model_type": "siglip_vision_model", "num_attention_heads": 2, "num_channels": 3,
                "num_hidden_layers": 2, "patch_size": 7, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    if kind == "dinov2":
        return {"hidden_size": 16, "patch_size": 14, "image_size": 518, "num_channels": 3, "num_attention_heads": 2,
                "hidden_act": "gelu", "mlp_ratio": 4, "model_type": "dinov2", "num_hidden_layers": 2,
                "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False, "layerscale_value": 1.0,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    raise ValueError(f"unknown encoder kind {kind!r}; one of {KINDS}")


def make_encoder(kind: str, seed: int = 0):
    """comfy.clip_vision.ClipVisionModel of `kind` with tiny seeded weights."""
    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"tiny_{kind}.json")
        with open(path, "w") as f:
            json.dump(tiny_config(kind), f)
        model = comfy.clip_vision.ClipVisionModel(path)
    with torch.no_grad():
        tiny_models.init_weights(model.model, seed)
        for name, p in model.model.named_parameters():
            if name.endswith("lambda1"):  # DINOv2 layer scale: zero would cut every block off the residual stream
                p.fill_(1.0)
    return model


class TinyEncoderNode:
    """Test-only node: a tiny in-process CLIP_VISION of one kind."""

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "make"
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(KINDS),), "seed": ("INT", {"default": 0})}}

    def make(self, kind, seed):
        return (make_encoder(kind, seed),)


# ---------------------------------------------------------------------------------------------------
# full-size files in the public layouts


def _random(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Trained-looking scales: norms 1/0, layer scales 1, other vectors 0, embeddings std 0.02, weights fan-in."""
    if len(shape) == 1 or name.endswith("lambda1"):
        if name.endswith("lambda1") or ("norm" in name and name.endswith("weight")):
            return torch.ones(shape, dtype=torch.float16)
        return torch.zeros(shape, dtype=torch.float16)
    std = 0.02 if ("embedding" in name or "token" in name or "probe" in name) and "patch" not in name \
        else 0.7 / math.sqrt(math.prod(shape[1:]))
    return (std * torch.randn(shape, generator=gen)).to(torch.float16)


def _core_state_dict_shapes(config_name: str, model_class: str) -> dict[str, tuple]:
    """Key -> shape of core's own model for one of its shipped configs (built on the meta device)."""
    import comfy.clip_model
    import comfy.image_encoders.dino2
    import comfy.ops

    folder = os.path.dirname(comfy.clip_model.__file__)
    with open(os.path.join(folder, config_name)) as f:
        config = json.load(f)
    cls = {"clip": comfy.clip_model.CLIPVisionModelProjection, "dinov2": comfy.image_encoders.dino2.Dinov2Model}[model_class]
    with torch.device("meta"):
        model = cls(config, torch.float16, "meta", comfy.ops.manual_cast)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def siglip_head_shapes(width: int = 1152, mlp: int = 4304) -> dict[str, tuple]:
    """The attention-pooling head of the public SigLIP files (vision_model.head.*): in the file, unused by core."""
    return {"vision_model.head.probe": (1, 1, width),
            "vision_model.head.attention.in_proj_weight": (3 * width, width),
            "vision_model.head.attention.in_proj_bias": (3 * width,),
            "vision_model.head.attention.out_proj.weight": (width, width),
            "vision_model.head.attention.out_proj.bias": (width,),
            "vision_model.head.layernorm.weight": (width,), "vision_model.head.layernorm.bias": (width,),
            "vision_model.head.mlp.fc1.weight": (mlp, width), "vision_model.head.mlp.fc1.bias": (mlp,),
            "vision_model.head.mlp.fc2.weight": (width, mlp), "vision_model.head.mlp.fc2.bias": (width,)}


def write_siglip_384(path: str, seed: int = 0) -> str:
    """Random SigLIP so400m/14 at 384 px (27 layers x 1152, 729 positions), public key names, fp16."""
    import safetensors.torch

    shapes = _core_state_dict_shapes("clip_vision_siglip_384.json", "clip")
    shapes.update(siglip_head_shapes())
    gen = torch.Generator().manual_seed(seed)
    safetensors.torch.save_file({k: _random(k, s, gen) for k, s in sorted(shapes.items())}, path)
    return path


def write_dinov2_large(path: str, seed: int = 0) -> str:
    """Random DINOv2 ViT-L/14 (24 layers x 1024, 1370 positions), the public (transformers) key names, fp16."""
    import safetensors.torch

    shapes = _core_state_dict_shapes(os.path.join("image_encoders", "dino2_large.json"), "dinov2")
    gen = torch.Generator().manual_seed(seed)
    safetensors.torch.save_file({k: _random(k, s, gen) for k, s in sorted(shapes.items())}, path)
    return path


def cached_full_size(kind: str) -> str:
    """The full-size random file of `kind`, written once per machine (.harness/cache/clip_vision)."""
    if kind == "clip":
        import workflow_fixtures

        return workflow_fixtures.cached_clip_vision_vit_l()
    writers = {"siglip": ("siglip_so400m_384_random_seed0_v1.safetensors", write_siglip_384),
               "dinov2": ("dinov2_large_random_seed0_v1.safetensors", write_dinov2_large)}
    name, write = writers[kind]
    return comfy_env.cached_file("clip_vision", name, write)
