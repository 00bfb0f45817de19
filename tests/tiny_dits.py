"""Tiny random DiTs of the families ComfyUI loads natively beyond Flux (SD3 / SD3.5, Qwen-Image, Lumina 2 /
Z-Image, HiDream), built in-process from comfy.supported_models configs with initialised weights, and the
conditioning each family's model_base expects (kept apart from tiny_models.py).

Token layout of one panel for a latent of `size` x `size` (2x2 patches: size**2 // 4 image tokens):
    sd3      [TEXT context tokens, image]               (MMDiT-X attn2 over the image only on block 0)
    qwen     [TEXT, image]
    lumina   [TEXT, image]; z_image pads the caption and the image tokens to multiples of 32
    hidream  [image, TEXT T5 tokens, LLAMA tokens (last layer), LLAMA tokens (the block's layer)]
"""
from __future__ import annotations

import torch

from tiny_models import init_weights

TEXT = 5  # text tokens of the random conditioning (T5 tokens on HiDream)
LLAMA = 3  # HiDream: tokens of each Llama layer
CONTEXT_DIM, POOLED_DIM = 16, 8


def sd3_unet_config(depth: int = 3, attn2_layers=(0,)) -> dict:
    """SD3.5 Medium layout (MMDiT-X: an image-only attn2 on some blocks, RMS q/k norms), hidden 64 * depth."""
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
            "adm_in_channels": POOLED_DIM, "pos_embed_scaling_factor": None, "pos_embed_max_size": 8, "num_patches": 64,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 64 * depth}},
            "qk_norm": "rms", "x_block_self_attn_layers": list(attn2_layers)}


def qwen_unet_config(layers: int = 4) -> dict:
    return {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": layers,
            "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM,
            "axes_dims_rope": (8, 12, 12)}


def lumina_unet_config(layers: int = 4, z_image: bool = False) -> dict:
    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": layers,
              "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 2.0,
              "qk_norm": True, "cap_feat_dim": CONTEXT_DIM, "axes_dims": [8, 12, 12], "axes_lens": [300, 64, 64]}
    if z_image:
        # Z-Image's modulation reads a 256-wide time embedding: dim 256 at least
        config.update({"z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32, "dim": 256,
                       "n_heads": 8, "n_kv_heads": 8})
    return config


def hidream_unet_config(double: int = 2, single: int = 2) -> dict:
    return {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": double,
            "num_single_layers": single, "attention_head_dim": 32, "num_attention_heads": 2,
            "caption_channels": [CONTEXT_DIM, CONTEXT_DIM], "text_emb_dim": POOLED_DIM, "num_routed_experts": 2,
            "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8], "max_resolution": [32, 32],
            "llama_layers": list(range(double + single))}


def make(family: str, seed: int = 0, **kw):
    """A ModelPatcher around a tiny "sd3", "qwen", "lumina", "z_image" or "hidream" DiT with initialised weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    if family == "sd3":
        config = sm.SD3(sd3_unet_config(**kw))
    elif family == "qwen":
        config = sm.QwenImage(qwen_unet_config(**kw))
    elif family in ("lumina", "z_image"):
        cls = sm.ZImage if family == "z_image" else sm.Lumina2
        config = cls(lumina_unet_config(z_image=family == "z_image", **kw))
    elif family == "hidream":
        config = sm.HiDream(hidream_unet_config(**kw))
    else:
        raise ValueError(family)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale" or (p.ndim == 1 and "norm" in name and leaf == "weight"):
                p.fill_(1.0)  # q/k RMSNorm gains: 1, or every query and key is zero
            elif name.endswith(("pad_token", "register")):
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in model.diffusion_model.named_buffers():
            if name == "pos_embed":  # SD3's fixed position table
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def conds(family: str, panels: int, seed: int = 0):
    """Per-panel random prompts (a CONDITIONING batch of N with what the family's model_base reads) and a negative."""
    g = torch.Generator().manual_seed(seed)

    def one():
        extra = {}
        if family in ("sd3", "hidream"):
            extra["pooled_output"] = torch.randn(panels, POOLED_DIM, generator=g)
        if family == "hidream":
            layers = len(hidream_unet_config()["llama_layers"])
            extra["conditioning_llama3"] = torch.randn(panels, layers, LLAMA, CONTEXT_DIM, generator=g)
        return [[torch.randn(panels, TEXT, CONTEXT_DIM, generator=g), extra]]

    return one(), one()
