"""Tiny, seeded, properly initialised ComfyUI models and checkpoint files for tests and benches.

ComfyUI builds its layers with `disable_weight_init` (weights left as torch.empty): every model here
is initialised explicitly, so outputs are finite and the same for the same seed.

In-process models keep the real block layout (which input/middle/output blocks carry transformers)
of SD1.5 and SDXL but shrink the widths. Checkpoint *files* must pass ComfyUI's own model detection,
so their UNets keep 320 channels and the detected transformer depths but use few levels / narrow
levels, and their text encoders are the real full-size CLIP-L (and CLIP-G for SDXL).
"""
from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------------
# initialisation


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic fan-in scaled init for every parameter (ComfyUI leaves them uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 0:
            continue
        if p.ndim == 1:
            if "norm" in name or "ln_" in name or "layer_norm" in name:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            else:
                p.zero_()
            continue
        if "embedding" in name or "emb" in leaf:
            std = 0.02
        else:
            fan_in = p[0].numel()
            std = 0.7 / math.sqrt(max(fan_in, 1))
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    # norms are not always named "norm" (UNet GroupNorms are in_layers.0 / out_layers.0 / out.0)
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(m, "weight", None) is not None:
            m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
    for name, b in module.named_buffers():
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return module


# ---------------------------------------------------------------------------------------------------
# in-process UNets


def _import():
    import comfy.model_patcher
    import comfy.supported_models

    return comfy.supported_models, comfy.model_patcher


def sd15_unet_config(width: int = 32, context_dim: int = 64) -> dict:
    """SD1.5 layout (transformers at input 1,2,4,5,7,8, middle, output 3-11) with a small width."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": width,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": context_dim, "num_heads": 8, "num_head_channels": -1,
        # ComfyUI pops this list from the end: output blocks 0-2 have no attention, 3-11 do
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sdxl_unet_config(width: int = 32, context_dim: int = 112, pooled_dim: int = 48, depth: int = 2) -> dict:
    """SDXL layout (no attention at level 0; input 4,5,7,8; middle; output 0-5) with small widths.

    `depth` stands in for SDXL's 10-deep level-2 stacks (2 keeps the j index > 0 path exercised).
    """
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": pooled_dim + 6 * 256,
        "in_channels": 4, "model_channels": width, "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 1, 1, depth, depth], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": depth, "use_linear_in_transformer": True, "context_dim": context_dim,
        "num_head_channels": 16, "transformer_depth_output": [0, 0, 0, 1, 1, 1, depth, depth, depth],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def make_model(family: str = "sd15", seed: int = 0, **kw):
    """A ModelPatcher around a tiny SD1.5- or SDXL-layout UNet with initialised weights."""
    supported_models, model_patcher = _import()
    import comfy.model_management as mm

    if family == "sd15":
        config = supported_models.SD15(sd15_unet_config(**kw))
    elif family == "sdxl":
        config = supported_models.SDXL(sdxl_unet_config(**kw))
    else:
        raise ValueError(family)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


# ---------------------------------------------------------------------------------------------------
# in-process CLIP (tiny text encoders with the real tokenizers)


def _tiny_text_config(hidden: int, layers: int = 3, heads: int = 2) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": hidden * 2,
            "num_attention_heads": heads, "projection_dim": hidden}


def make_clip(family: str = "sd15", seed: int = 0, l_dim: int = 64, g_dim: int = 48):
    """A comfy.sd.CLIP with tiny text encoders: SD1.5 cond is [*, 77, l_dim]; SDXL cond is
    [*, 77, l_dim + g_dim] with pooled [*, g_dim]: the defaults match `sdxl_unet_config()`."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    if family == "sd15":
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        options = {"clip_l_model_config": _tiny_text_config(l_dim)}
    elif family == "sdxl":
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        options = {"clip_l_model_config": _tiny_text_config(l_dim),
                   "clip_g_model_config": _tiny_text_config(g_dim)}
    else:
        raise ValueError(family)
    clip = comfy.sd.CLIP(target, model_options=options)
    init_weights(clip.cond_stage_model, seed)
    return clip


# ---------------------------------------------------------------------------------------------------
# in-process VAE


def vae_state_dict(seed: int = 0, ch: int = 32) -> dict:
    """LDM-format AutoencoderKL weights; `ch` must stay 128 for files ComfyUI loads (its config is fixed)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1 if ch != 128 else 2, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(model, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_vae(seed: int = 0):
    """A comfy.sd.VAE with full-size (ch 128) random weights: ComfyUI's SD VAE config is fixed."""
    import comfy.sd

    return comfy.sd.VAE(sd=vae_state_dict(seed, ch=128))


# ---------------------------------------------------------------------------------------------------
# checkpoint files that CheckpointLoaderSimple detects


def _file_unet_config(family: str) -> dict:
    if family == "sd15":
        # detection keys: model_channels 320, context 768, conv proj_in, no label_emb
        return {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
            "num_res_blocks": [1, 1], "transformer_depth": [1, 0], "channel_mult": [1, 1],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
            "num_heads": 8, "num_head_channels": -1, "transformer_depth_output": [1, 1, 0, 0],
            "use_temporal_attention": False, "use_temporal_resblock": False,
        }
    if family == "sdxl":
        # detection keys: model_channels 320, linear proj_in, input depths [0,0,2,2,10,10],
        # context 2048, adm 2816; levels stay 320 wide and output/middle stacks are shallow
        return {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 1, 1], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
            "context_dim": 2048, "num_head_channels": 64,
            "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
            "use_temporal_attention": False, "use_temporal_resblock": False,
        }
    raise ValueError(family)


# SD1.5 at its real channel widths (320/640/1280/1280, two res blocks per level: AnimateDiff's motion modules
# are built at these widths and injected after each res block), shallow: spatial transformers only at the
# 320-wide level (input 1-2, output 9-11) and the middle block. context 768 like SD1.5.
REAL_WIDTH_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 0, 0, 0, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 8, "num_head_channels": -1,
    # popped from the end: output blocks 9-11 (the 320-wide level) carry a transformer
    "transformer_depth_output": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def checkpoint_state_dict(model, clip, vae) -> dict:
    """UNet + CLIP + VAE in the LDM checkpoint layout, by ComfyUI's own BaseModel.state_dict_for_saving. ComfyUI
    0.29.0 takes the UNet's state dict as a new first argument (its ModelPatcher passes it in), where 0.3.75 and 0.8.0
    read it themselves: pass it when the installed signature asks for it, so every version writes the same file."""
    import inspect

    extra = {}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        extra["unet_state_dict"] = model.diffusion_model.state_dict()
    return model.state_dict_for_saving(clip_state_dict=clip.get_sd(), vae_state_dict=vae.get_sd(), **extra)


def write_real_width_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Like write_checkpoint("sd15") but with SD1.5's real level widths and res-block layout (shallow
    transformers): what AnimateDiff motion modules need. ~1.3 GB (fp16); write it once and cache it."""
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    config = comfy.supported_models.SD15(dict(REAL_WIDTH_SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    clip = comfy.sd.CLIP(config.clip_target({}))
    init_weights(clip.cond_stage_model, seed + 1)
    vae = make_vae(seed + 2)
    sd = checkpoint_state_dict(model, clip, vae)
    del model
    sd = {k: (v.half() if v.is_floating_point() and "position_ids" not in k else v).contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, path)
    return path


def write_checkpoint(path: str, family: str = "sd15", seed: int = 0) -> str:
    """Write a .safetensors checkpoint (UNet + full-size CLIP + VAE) in the original LDM key layout,
    using ComfyUI's own save path, so CheckpointLoaderSimple detects it as `family`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    cls = comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL
    config = cls(_file_unet_config(family))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    clip = comfy.sd.CLIP(config.clip_target({}))
    init_weights(clip.cond_stage_model, seed + 1)
    vae = make_vae(seed + 2)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    sd = checkpoint_state_dict(model, clip, vae)
    sd = {k: (v.half() if v.is_floating_point() and "position_ids" not in k else v).contiguous() for k, v in sd.items()}
    del patcher
    comfy.utils.save_torch_file(sd, path)
    return path


def cached_checkpoint(family: str = "sd15") -> str:
    """write_checkpoint(family) once per machine (.harness/cache/checkpoints): the SDXL one is 2 GB, mostly its
    full-size CLIP-G. The file is the public LDM layout, which every ComfyUI version reads, so one file serves the
    0.3.75 and 0.8.0 suites (bump v1 when write_checkpoint changes)."""
    import comfy_env

    return comfy_env.cached_file("checkpoints", f"tiny_{family}_seed0_v1.safetensors",
                                 lambda path: write_checkpoint(path, family))


# ---------------------------------------------------------------------------------------------------
# in-process DiTs (Flux.1, Chroma)


def flux_unet_config(hidden: int = 64, heads: int = 2, depth: int = 2, single: int = 2, context_dim: int = 16,
                     pooled_dim: int = 8, guidance_embed: bool = False) -> dict:
    """Flux.1 layout (double-stream then single-stream blocks, 2x2 patches of a 16-channel latent), small widths."""
    head_dim = hidden // heads
    third = (head_dim // 3) // 2 * 2
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": pooled_dim,
            "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 2.0, "num_heads": heads,
            "depth": depth, "depth_single_blocks": single, "axes_dim": [head_dim - 2 * third, third, third],
            "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed,
            **_newer_flux_params(txt_ids_dims=[])}


def _newer_flux_params(params: str = "flux", **values) -> dict:
    """Parameter fields that newer ComfyUI versions require (0.8.0: txt_ids_dims, Chroma's vec_in_dim), only
    where the installed version's FluxParams / ChromaParams has them."""
    import dataclasses

    if params == "chroma":
        from comfy.ldm.chroma.model import ChromaParams as Params
    else:
        from comfy.ldm.flux.model import FluxParams as Params
    names = {f.name for f in dataclasses.fields(Params)}
    return {key: value for key, value in values.items() if key in names}


def chroma_unet_config(hidden: int = 64, heads: int = 2, depth: int = 2, single: int = 2, context_dim: int = 16) -> dict:
    """Chroma layout (Flux blocks without per-block modulation, a distilled guidance approximator), small widths."""
    config = flux_unet_config(hidden, heads, depth, single, context_dim)
    for key in ("vec_in_dim", "guidance_embed", "txt_ids_dims"):
        config.pop(key, None)
    config.update({"image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64, "out_dim": hidden,
                   "hidden_dim": 32, "n_layers": 1, **_newer_flux_params("chroma", txt_ids_dims=[], vec_in_dim=64)})
    return config


def flux2_unet_config(hidden: int = 64, heads: int = 2, depth: int = 2, single: int = 2, context_dim: int = 16) -> dict:
    """Flux.2 layout (shared modulation, 4 position axes, 1x1 patches of a 128-channel latent), small widths.
    Flux.2 pads every prompt to 512 text tokens (model_base.Flux2.extra_conds)."""
    config = flux_unet_config(hidden, heads, depth, single, context_dim)
    quarter = hidden // heads // 4
    config.update({"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
                   "axes_dim": [quarter] * 4, "theta": 2000, "patch_size": 1, "qkv_bias": False,
                   "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
                   "default_ref_method": "index", "ref_index_scale": 10.0, **_newer_flux_params(txt_ids_dims=[3])})
    return config


def make_dit(family: str = "flux", seed: int = 0, **kw):
    """A ModelPatcher around a tiny Flux.1 ("flux", "flux_guidance"), Flux.2 ("flux2") or Chroma DiT with
    initialised weights."""
    supported_models, model_patcher = _import()
    import comfy.model_management as mm

    if family == "flux":
        config = supported_models.FluxSchnell(flux_unet_config(**kw))
    elif family == "flux_guidance":
        config = supported_models.Flux(flux_unet_config(guidance_embed=True, **kw))
    elif family == "flux2":
        config = supported_models.Flux2(flux2_unet_config(**kw))
    elif family == "chroma":
        config = supported_models.Chroma(chroma_unet_config(**kw))
    else:
        raise ValueError(family)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    with torch.no_grad():  # q/k RMSNorm gains ("...query_norm.scale"): 1, or every query and key is zero
        for name, p in model.diffusion_model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
    model.diffusion_model.eval()
    return model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
