"""Tiny random Wan 2.1 FLF2V files for the tests: the diffusion model, its VAE, a umt5 text encoder and CLIP vision H.

What ComfyUI's loaders detect, and how small each file can be:

- diffusion model (UNETLoader): comfy.model_detection reads every size of a Wan 2.1 model from its state dict
  (dim, ffn_dim, layers, in_dim, img_emb, emb_pos), so the file is tiny and is detected as WAN21_I2V with the
  FLF2V position embedding of 2 x 257 tokens. Two widths are fixed by ComfyUI's WanModel, not read from the file:
  the text input (text_dim 4096, umt5-xxl's width) and the CLIP image input (img_emb 1280, ViT-H's width).
- VAE (VAELoader): comfy.sd.VAE reads the Wan 2.1 VAE's base width from decoder.head.0.gamma: tiny.
- CLIP vision (CLIPVisionLoader): comfy.clip_vision.load picks ViT-H from the layer count and builds it from its
  own config, and Wan needs ViT-H's 1280-wide penultimate tokens (257 at 224 px). So the file is a full-size
  random ViT-H (0.63 B parameters, fp16), written once per machine into .harness/cache/wan.
- text encoder (CLIPLoader type "wan"): comfy.sd detects umt5-xxl by `encoder.block.23...wi_1` with a 4096 input
  (0.29.0: with umt5-xxl's d_ff, 10240 rows, which the test node below supplies for tiny files) and then builds
  it from umt5_config_xxl.json (5.7 B parameters), whatever the file's shapes; the tokenizer is the
  sentencepiece model stored in the file itself (`spiece_model`, as in umt5_xxl_fp8_e4m3fn_scaled.safetensors).
  No file can make core ComfyUI build a smaller umt5, so the test server loads one test-only custom node,
  tests/comfy_test_nodes/storydiffusion_tiny_umt5 (`server_args`): it reads the umt5 sizes from a text encoder's
  state dict (ComfyUI's own model_options["umt5xxl_model_config"]) when they differ from umt5-xxl's. The file keeps
  umt5-xxl's layout (24 blocks, d_model 4096, per-block relative attention bias) with 2 heads of 4 and d_ff 8; its
  tokenizer is the sentencepiece model ComfyUI ships for T5-pile (32000 pieces), so the embedding has 32000 rows.
  Everything else is ComfyUI's: WanT5Tokenizer, the T5 class, CLIPTextEncode, and the detection up to 0.8.0.
"""
from __future__ import annotations

import json
import os

import torch

import comfy_env
import tiny_models

REPO = comfy_env.REPO
TEST_NODES = os.path.join(REPO, "tests", "comfy_test_nodes")

# ComfyUI's WanModel: text_dim and the image projection's input are fixed (not read from the file)
DIM, TEXT_DIM, CLIP_TOKENS, CLIP_WIDTH = 128, 4096, 257, 1280

# the tiny umt5: umt5-xxl's layout and width, tiny everywhere else
UMT5_TINY = {"num_layers": 24, "num_heads": 2, "d_kv": 4, "d_ff": 8}
VAE_DIM = 8  # the real Wan 2.1 VAE: 96


def wan_state_dict(seed=0, flf=True, image=True, layers=2):
    """A Wan 2.1 I2V (FLF2V with `flf`) state dict with the real key names; `image` False = Wan 2.2 14B I2V layout."""
    import comfy.ldm.wan.model as wan
    import comfy.ops

    model = wan.WanModel(model_type="i2v" if image else "t2v", in_dim=36, dim=DIM, ffn_dim=2 * DIM, out_dim=16,
                         num_heads=DIM // 128, num_layers=layers, text_dim=TEXT_DIM,
                         flf_pos_embed_token_number=2 * CLIP_TOKENS if flf else None,
                         operations=comfy.ops.disable_weight_init)
    tiny_models.init_weights(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(sd: dict, path: str) -> str:
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def write_wan21_flf2v(path: str, seed: int = 3) -> str:
    """The tiny Wan 2.1 FLF2V diffusion model (models/diffusion_models, UNETLoader), fp16 like the public file."""
    return _save({k: v.to(torch.float16) for k, v in wan_state_dict(seed=seed).items()}, path)


def wan21_vae_state_dict(seed: int = 0, dim: int = VAE_DIM) -> dict:
    """A Wan 2.1 VAE (comfy.ldm.wan.vae.WanVAE, the config comfy.sd.VAE builds for it) at base width `dim`."""
    import comfy.ldm.wan.vae as wan_vae

    model = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    with torch.no_grad():
        tiny_models.init_weights(model, seed)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # RMS_norm scales (init_weights zeroes 1-d tensors not named norm)
                p.fill_(1.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_wan21_vae(path: str) -> str:
    return _save(wan21_vae_state_dict(), path)


def umt5_config(**sizes) -> dict:
    """ComfyUI's umt5-xxl config with `sizes` replaced."""
    import comfy.text_encoders.t5

    with open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "umt5_config_xxl.json")) as f:
        config = json.load(f)
    config.update(sizes)
    return config


def pile_spiece_model() -> bytes:
    """The sentencepiece model ComfyUI ships (comfy/text_encoders/t5_pile_tokenizer): 32000 pieces."""
    import comfy.text_encoders.t5

    with open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_pile_tokenizer", "tokenizer.model"),
              "rb") as f:
        return f.read()


def umt5_tiny_state_dict(seed: int = 0) -> dict:
    """The tiny umt5 text encoder in umt5-xxl's key layout, with the tokenizer in `spiece_model` (uint8 bytes)."""
    import comfy.ops
    import sentencepiece
    from comfy.text_encoders import t5

    spiece = pile_spiece_model()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    config = umt5_config(**UMT5_TINY, vocab_size=vocab)
    model = t5.T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    with torch.no_grad():
        tiny_models.init_weights(model, seed)
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
    sd = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return sd


def write_clip_vision_h(path: str, seed: int = 0) -> str:
    """A random fp16 CLIP ViT-H/14 vision model in the layout comfy.clip_vision.load detects (as
    workflow_fixtures.write_clip_vision_vit_l does for ViT-L)."""
    import comfy.clip_model
    import comfy.ops

    from workflow_fixtures import _random_like_trained

    with open(os.path.join(os.path.dirname(comfy.clip_model.__file__), "clip_vision_config_h.json")) as f:
        config = json.load(f)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
    gen = torch.Generator().manual_seed(seed)
    sd = {name: _random_like_trained(name, tuple(t.shape), gen, torch.float16) for name, t in model.state_dict().items()}
    return _save(sd, path)


def _cached(name: str, write) -> str:
    return comfy_env.cached_file("wan", name, write)


def cached_clip_vision_h() -> str:
    return _cached("clip_vision_h_random_seed0_v1.safetensors", write_clip_vision_h)


def cached_umt5_tiny() -> str:
    return _cached("umt5_tiny_pile_spiece_seed0_v1.safetensors", lambda p: _save(umt5_tiny_state_dict(), p))


def server_args(workdir: str) -> tuple:
    """main.py arguments that load tests/comfy_test_nodes (the tiny-umt5 loader shim) into that server only."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "wan_test_nodes.yaml")
    with open(path, "w") as f:
        f.write(f"storydiffusion_test_nodes:\n    custom_nodes: {TEST_NODES}/\n")
    return ("--extra-model-paths-config", path)


# model kinds (workflow_specs ModelFile.kind) -> writer(path, checkpoint), as tests/test_workflows.py MODEL_WRITERS;
# the big files are written once per machine (CACHED) and linked in
WRITERS = {"wan21_flf2v_tiny": lambda path, checkpoint=None: write_wan21_flf2v(path),
           "wan21_vae_tiny": lambda path, checkpoint=None: write_wan21_vae(path)}
CACHED = {"clip_vision_h": cached_clip_vision_h, "umt5_xxl_tiny": cached_umt5_tiny}
