"""Model files for the shipped workflows, sized to the tiny *checkpoint files* (tiny_models.write_checkpoint).

The checkpoint files keep the real text encoders and the real cross-attention context widths (SD1.5:
768, SDXL: 2048 = CLIP-L 768 + CLIP-G 1280) with a shrunk UNet, so every file that talks to them
must match those widths: PhotoMaker's projections add up to 2048, the IP-Adapter's to_k_ip read 768.
Layer lists are read from the checkpoint file itself (its attention weights), never assumed.

Core `comfy.clip_vision.load` only recognises the real ViT-L/H/G layouts, so the CLIP vision file is a
full-size ViT-L/14 with random fp16 weights (the smallest layout it accepts: 0.3 B parameters).
"""
from __future__ import annotations

import math
import re

import torch

import identity_fixtures
import ipadapter_fixtures

VIT_L_PROJECTION = 768  # CLIP ViT-L/14 image_embeds width (what a plain SD1.5 IP-Adapter projects)


def _random_like_trained(name: str, shape: tuple, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Norms 1/0, other biases 0, embeddings std 0.02, weights fan-in scaled (as tiny_models.init_weights)."""
    if len(shape) == 1:
        fill = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
        if "class_embedding" in name:
            return (0.02 * torch.randn(shape, generator=gen)).to(dtype)
        return torch.full(shape, fill, dtype=dtype)
    std = 0.02 if "embedding" in name and "patch" not in name else 0.7 / math.sqrt(math.prod(shape[1:]))
    return (std * torch.randn(shape, generator=gen)).to(dtype)


def _checkpoint_shapes(checkpoint: str, pattern: str) -> dict[str, tuple]:
    from safetensors import safe_open

    regex = re.compile(pattern)
    with safe_open(checkpoint, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if regex.search(k)}


# ---------------------------------------------------------------------------------------------------
# PhotoMaker v1 for the tiny SDXL checkpoint file


def sdxl_checkpoint_lora_shapes(checkpoint: str, rank: int = 4) -> dict[str, tuple]:
    """PhotoMaker `lora_weights` keys (diffusers attention-processor names) for every attention layer of
    the checkpoint's UNet, with the layer's real in/out widths read from the file."""
    import comfy.utils

    import tiny_models

    to_diffusers = comfy.utils.unet_to_diffusers(tiny_models._file_unet_config("sdxl"))
    shapes = _checkpoint_shapes(checkpoint, r"\.attn[12]\.to_(q|k|v|out\.0)\.weight$")
    out = {}
    for diffusers_key, ldm_key in to_diffusers.items():
        full = f"model.diffusion_model.{ldm_key}"
        if full not in shapes:
            continue
        width_out, width_in = shapes[full]
        base = "unet." + diffusers_key[:-len(".weight")].replace(".to_", ".processor.to_")
        base = base[:-2] if base.endswith(".to_out.0") else base
        out[f"{base}_lora.down.weight"] = (rank, width_in)
        out[f"{base}_lora.up.weight"] = (width_out, rank)
    if not out:
        raise RuntimeError(f"{checkpoint} has no attention layers that map to diffusers names")
    return out


def write_sdxl_photomaker(path: str, checkpoint: str, seed: int = 0) -> str:
    """A tiny ViT (sizes are read from the file) whose two projections give 768 + 1280 = 2048, the SDXL
    text embedding width, and a LoRA over the checkpoint's own attention layers."""
    encoder = identity_fixtures.random_tensors(identity_fixtures.id_encoder_shapes(proj=768, proj2=1280), seed)
    lora = identity_fixtures.random_tensors(sdxl_checkpoint_lora_shapes(checkpoint), seed + 1)
    return identity_fixtures.write_photomaker(path, {"id_encoder": encoder, "lora_weights": lora})


# ---------------------------------------------------------------------------------------------------
# CLIP vision ViT-L/14 and an IP-Adapter for the tiny SD1.5 checkpoint file


def write_clip_vision_vit_l(path: str, seed: int = 0) -> str:
    """A random fp16 CLIP ViT-L/14 vision model in the layout `comfy.clip_vision.load` detects
    (`vision_model.*`, `visual_projection.weight`): key names and shapes come from ComfyUI's own model
    built on the meta device from its ViT-L config, so nothing stays uninitialised after strict=False."""
    import json
    import os

    import comfy.clip_model
    import comfy.ops
    import safetensors.torch

    config_path = os.path.join(os.path.dirname(comfy.clip_model.__file__), "clip_vision_config_vitl.json")
    with open(config_path) as f:
        config = json.load(f)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
    gen = torch.Generator().manual_seed(seed)
    sd = {name: _random_like_trained(name, tuple(t.shape), gen, torch.float16)
          for name, t in model.state_dict().items()}
    safetensors.torch.save_file(sd, path)
    return path


def cached_clip_vision_vit_l() -> str:
    """write_clip_vision_vit_l once per machine (.harness/cache/clip_vision; the public ViT-L layout, the same file
    for every ComfyUI version)."""
    import comfy_env

    return comfy_env.cached_file("clip_vision", "clip_vit_l_random_seed0_v1.safetensors", write_clip_vision_vit_l)


def sd15_checkpoint_cross_attention(checkpoint: str) -> tuple[list[int], int]:
    """(inner width of every attn2 layer in IP-Adapter order: input, output, middle blocks; context width)."""
    shapes = _checkpoint_shapes(checkpoint, r"\.attn2\.to_k\.weight$")
    section_rank = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}

    def order(key: str):
        m = re.search(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:\d+\.)?transformer_blocks\.(\d+)\.", key)
        return section_rank[m.group(1)], int(m.group(2)), int(m.group(3))

    keys = sorted(shapes, key=order)
    contexts = {shapes[k][1] for k in keys}
    if len(contexts) != 1:
        raise RuntimeError(f"{checkpoint}: cross-attention context widths differ: {contexts}")
    return [shapes[k][0] for k in keys], contexts.pop()


def write_sd15_ipadapter(path: str, checkpoint: str, seed: int = 0) -> str:
    """A plain IP-Adapter (`image_proj.proj`: ViT-L image_embeds -> 4 tokens) with one to_k_ip/to_v_ip
    pair per cross-attention layer of the checkpoint."""
    widths, context = sd15_checkpoint_cross_attention(checkpoint)
    groups = ipadapter_fixtures.ipadapter_state_dict(widths, context, kind="plain", clip_dim=VIT_L_PROJECTION, seed=seed)
    return ipadapter_fixtures.write_ipadapter(path, groups)
