"""The DiT workflow files (tests/dit_workflow_fixtures.py) are what UNETLoader / VAELoader detect them as.

Layouts are checked on the meta device (no 1-2 GB file is written here); the browser test
(test_workflows.py, comic_flux / comic_zimage) loads and runs the real files.
"""
from __future__ import annotations

import torch

import dit_workflow_fixtures as dit


def test_flux_dev_layout_is_detected_as_flux_dev_with_the_tiny_text_widths():
    config = dit.flux_dev_config()
    name, detected = dit.detected_config(dit.layout(config))
    widths = dit.text_widths()
    assert name == "Flux" and detected["guidance_embed"] is True  # dev, not schnell
    assert (detected["context_in_dim"], detected["vec_in_dim"]) == (widths["t5xxl"], widths["clip_l_pooled"])
    assert (detected["depth"], detected["depth_single_blocks"], detected["hidden_size"]) == (1, 1, 3072)


def test_z_image_layout_is_detected_as_z_image_and_a_narrower_one_is_not():
    shapes, gains = dit.z_image_layout()
    # the file is this ComfyUI's layout plus the norm_final gain that 0.3.75 builds and 0.8.0 ignores
    assert set(dit.layout(dit.z_image_config())) <= set(shapes) and "norm_final.weight" in gains
    name, detected = dit.detected_config(shapes)
    assert name == "ZImage" and detected["z_image_modulation"] is True
    assert detected["cap_feat_dim"] == dit.text_widths()["qwen3_4b"] and detected["n_layers"] == 1
    # why the file is full width: detection recognises Z-Image by dim 3840 only
    narrow = dict(dit.z_image_config(), dim=256, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48])
    narrow_name, _ = dit.detected_config(dit.layout(dict(narrow, z_image_modulation=False)))
    assert narrow_name == "Lumina2"


def test_random_weights_keep_norm_gains_at_one():
    config = dit.flux_dev_config()
    shapes = {k: v for k, v in dit.layout(config).items() if k.startswith("double_blocks.0.img_attn.")}
    sd = dit.random_state_dict(shapes, dit._norm_params(config), seed=0)
    # the RMSNorm gain is `.scale` up to ComfyUI 0.8.0 and `.weight` in 0.29.0 (its own RMSNorm op)
    (gain,) = [k for k in sd if k.startswith("double_blocks.0.img_attn.norm.query_norm.")]
    assert torch.all(sd[gain] == 1)
    assert torch.all(sd["double_blocks.0.img_attn.qkv.bias"] == 0)
    assert sd["double_blocks.0.img_attn.qkv.weight"].std() > 0


def test_flux_vae_is_read_as_the_16_channel_autoencoder():
    import comfy.sd

    vae = comfy.sd.VAE(sd=dit.flux_vae_state_dict())
    assert vae.latent_channels == 16
    image = vae.decode(torch.randn(1, 16, 8, 8) * 0.5)
    assert tuple(image.shape[-3:]) == (64, 64, 3) and torch.isfinite(image).all()
