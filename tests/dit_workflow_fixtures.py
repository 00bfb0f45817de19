"""Model files for the DiT workflows (comic_flux, comic_zimage): a Flux.1 dev and a Z-Image Turbo diffusion
model that UNETLoader's detection recognises, and the Flux VAE (ae.safetensors, also Z-Image's VAE).

ComfyUI's detection fixes most DiT widths instead of reading them from the file, so these files cannot be
narrow the way the tiny UNet checkpoints are:
- Flux.1: 24 heads and rope axes (16, 56, 56) = head width 128, so hidden 3072 and mlp ratio 4 are forced;
  only the depth is free (1 double-stream + 1 single-stream block, ~0.5 B parameters).
- Z-Image: recognised by its width (dim 3840, 30 heads, ffn 8/3); anything narrower is detected as Lumina 2
  (another model class, shift and text encoder). NextDiT always builds 2 noise-refiner + 2 context-refiner
  blocks, so the smallest Z-Image is 1 main layer + 4 refiners (~0.9 B parameters).
- The text widths are read from the file (Flux txt_in / vector_in, Z-Image cap_embedder), so they match the
  tiny text encoders of tests/tiny_text_encoders.py (`text_widths()`). ComfyUI builds T5-XXL, CLIP-L and
  Qwen3-4B from fixed configs; the test server loads those tiny files with their own configs through the
  test-only custom node tests/comfy_test_nodes/storydiffusion_tiny_text_encoders (`server_args`).
- The Flux VAE config is fixed too (ch 128, 16 latent channels, no quant convs): a full-size random one.

Layouts come from ComfyUI's own model classes built on the meta device, and each one is checked against
ComfyUI's detection (`detected_config`) before a file is written; files are bf16 like the public ones, and
cached once per machine in .harness/cache/dit (keyed by the layout, so ComfyUI versions whose layouts differ
get their own file).
"""
from __future__ import annotations

import hashlib
import math
import os

import torch

import comfy_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEST_NODES = os.path.join(REPO, "tests", "comfy_test_nodes")


def text_widths() -> dict:
    """Widths of the tiny text encoders' outputs: T5-XXL tokens (Flux context_in_dim), CLIP-L pooled (Flux
    vec_in_dim), Qwen3-4B hidden states (Z-Image cap_feat_dim)."""
    import tiny_text_encoders as te

    clip_l = te._CONFIGS["clip_l"][1]
    return {"t5xxl": te._CONFIGS["t5xxl"][1]["d_model"], "clip_l_pooled": clip_l.get("projection_dim", clip_l["hidden_size"]),
            "qwen3_4b": te._CONFIGS["qwen3_4b"][1]["hidden_size"]}


def server_args(workdir: str) -> tuple:
    """main.py arguments that load tests/comfy_test_nodes (there: the tiny text encoders' loader hook) into that
    server only."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "dit_test_nodes.yaml")
    with open(path, "w") as f:
        f.write(f"storydiffusion_test_nodes:\n    custom_nodes: {TEST_NODES}/\n")
    return ("--extra-model-paths-config", path)


# ---------------------------------------------------------------------------------------------------
# configs, as ComfyUI's detection (comfy/model_detection.py) reads them back


def flux_dev_config(depth: int = 1, single: int = 1) -> dict:
    """Flux.1 dev (guidance_in) at the widths detection fixes, `depth` double + `single` single blocks."""
    import tiny_models

    widths = text_widths()
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": widths["clip_l_pooled"],
            "context_in_dim": widths["t5xxl"], "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": depth,
            "depth_single_blocks": single, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
            "qkv_bias": True, "guidance_embed": True, **tiny_models._newer_flux_params(txt_ids_dims=[])}


def z_image_config(layers: int = 1) -> dict:
    """Z-Image (NextDiT with z_image_modulation) at the widths detection fixes for dim 3840."""
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": text_widths()["qwen3_4b"],
            "n_layers": layers, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
            "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
            "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}


def _meta_model(unet_config: dict):
    """(supported-model config, diffusion model on the meta device) for a unet config."""
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None:
        raise RuntimeError(f"no ComfyUI model matches {unet_config}")
    model_config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = model_config.get_model({}, device="meta")
    return model_config, model.diffusion_model


def layout(unet_config: dict) -> dict[str, tuple]:
    """{key: shape} of the diffusion model file for `unet_config` (ComfyUI's own class, built on meta)."""
    _, model = _meta_model(unet_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def detected_config(shapes: dict[str, tuple]):
    """What UNETLoader would detect from a file with these keys/shapes: (supported-model class name, unet_config)."""
    import comfy.model_detection

    state_dict = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    model_config = comfy.model_detection.model_config_from_unet(state_dict, "")
    if model_config is None:
        return None, None
    return type(model_config).__name__, model_config.unet_config


def _norm_params(unet_config: dict) -> set[str]:
    """Names of the norm gains (LayerNorm/RMSNorm weight or scale): 1, else queries, keys or features vanish."""
    _, model = _meta_model(unet_config)
    out = set()
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for leaf in ("weight", "scale"):
                if getattr(module, leaf, None) is not None:
                    out.add(f"{name}.{leaf}" if name else leaf)
    return out


def random_state_dict(shapes: dict[str, tuple], gains: set[str], seed: int = 0, dtype=torch.bfloat16) -> dict:
    """Seeded weights shaped like a trained model's: norm gains 1, other 1-D params 0, matrices fan-in scaled."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name in gains:
            out[name] = torch.ones(shape, dtype=dtype)
        elif len(shape) <= 1:
            out[name] = torch.zeros(shape, dtype=dtype)
        else:
            std = 0.7 / math.sqrt(max(math.prod(shape[1:]), 1))
            out[name] = (torch.randn(shape, generator=gen) * std).to(dtype)
    return out


def _expect(shapes: dict, family: str, unet_config: dict) -> None:
    """Refuse to write a file that detection would read as another model (or with other widths)."""
    name, detected = detected_config(shapes)
    if name != family:
        raise RuntimeError(f"ComfyUI detects this {family} layout as {name}: {detected}")
    for key in ("hidden_size", "context_in_dim", "vec_in_dim", "depth", "depth_single_blocks", "dim", "cap_feat_dim",
                "n_layers", "guidance_embed", "z_image_modulation"):
        if key in unet_config and detected.get(key) != unet_config[key]:
            raise RuntimeError(f"{family}: detection reads {key}={detected.get(key)!r}, the file has {unet_config[key]!r}")


def write_diffusion_model(path: str, unet_config: dict, family: str, seed: int = 0,
                          shapes: dict | None = None, gains: set | None = None) -> str:
    """A random `family` file for `unet_config`: ComfyUI's own layout unless `shapes` (with norm `gains`) is given."""
    import safetensors.torch

    shapes = layout(unet_config) if shapes is None else shapes
    gains = _norm_params(unet_config) if gains is None else gains
    _expect(shapes, family, unet_config)
    safetensors.torch.save_file(random_state_dict(shapes, gains, seed), path)
    return path


def write_flux_dev(path: str, seed: int = 0) -> str:
    """flux1-dev.safetensors: detected as Flux (dev: guidance_in), 1 double + 1 single block, ~1 GB bf16."""
    return write_diffusion_model(path, flux_dev_config(), "Flux", seed)


# ComfyUI 0.3.75's NextDiT builds a `norm_final` that Z-Image never uses; 0.8.0 no longer builds it and ignores the
# key when a file has it. The cached file always carries it (a gain of 1), so one 1.8 GB file serves both versions.
_Z_IMAGE_EXTRA_NORMS = ("norm_final.weight",)


def z_image_layout() -> tuple[dict, set]:
    """({key: shape}, norm gains) of the Z-Image file: this ComfyUI's layout plus _Z_IMAGE_EXTRA_NORMS."""
    config = z_image_config()
    shapes, gains = layout(config), _norm_params(config)
    for key in _Z_IMAGE_EXTRA_NORMS:
        shapes.setdefault(key, (config["dim"],))
        gains.add(key)
    return shapes, gains


def write_z_image(path: str, seed: int = 0) -> str:
    """z_image_turbo_bf16.safetensors: detected as ZImage, 1 main layer (+ the 4 refiner blocks), ~1.8 GB bf16."""
    shapes, gains = z_image_layout()
    return write_diffusion_model(path, z_image_config(), "ZImage", seed, shapes=shapes, gains=gains)


# ---------------------------------------------------------------------------------------------------
# the Flux VAE (ae.safetensors)


def flux_vae_state_dict(seed: int = 0) -> dict:
    """The Flux autoencoder in the layout comfy.sd.VAE reads as 16-channel (ch 128, ch_mult 1 2 4 4, no quant
    convs: AutoencodingEngine), random fan-in scaled weights, GroupNorm gains 1."""
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    import tiny_models

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    module = torch.nn.ModuleDict({"encoder": Encoder(**ddconfig), "decoder": Decoder(**ddconfig)})
    tiny_models.init_weights(module, seed)
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()}


def write_flux_vae(path: str, seed: int = 0) -> str:
    import safetensors.torch

    safetensors.torch.save_file(flux_vae_state_dict(seed), path)
    return path


# ---------------------------------------------------------------------------------------------------
# cached files (written once per machine and layout)


def _layout_tag(shapes: dict) -> str:
    text = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(shapes.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _cached(name: str, write) -> str:
    return comfy_env.cached_file("dit", name, write)


def cached_flux_dev() -> str:
    return _cached(f"flux1_dev_d1s1_seed0_{_layout_tag(layout(flux_dev_config()))}.safetensors", write_flux_dev)


def cached_z_image() -> str:
    return _cached(f"z_image_l1_seed0_{_layout_tag(z_image_layout()[0])}.safetensors", write_z_image)


def cached_flux_vae() -> str:
    return _cached("flux_ae_seed0_v1.safetensors", write_flux_vae)


# kind (workflow_specs ModelFile.kind) -> cached file; tests/test_workflows.py links them into the models folder
CACHED_FILES = {"flux1_dev": cached_flux_dev, "z_image_turbo": cached_z_image, "flux_vae": cached_flux_vae}
