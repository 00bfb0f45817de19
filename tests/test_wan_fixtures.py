"""The tiny Wan 2.1 files of tests/wan_fixtures.py load through ComfyUI's own detection as the real kinds (what
story_to_video_wan's browser test relies on), and the test-server hook for the tiny umt5
(tests/comfy_test_nodes/storydiffusion_tiny_umt5) leaves real-size files to ComfyUI."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import wan_fixtures


@pytest.fixture(scope="module")
def umt5_hook(comfy_nodes):
    """The hook module, installed for this module only (the server imports it as a custom node)."""
    import comfy.sd

    before = comfy.sd.load_text_encoder_state_dicts
    path = os.path.join(wan_fixtures.TEST_NODES, "storydiffusion_tiny_umt5", "__init__.py")
    spec = importlib.util.spec_from_file_location("storydiffusion_tiny_umt5_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert comfy.sd.load_text_encoder_state_dicts is module.load_text_encoder_state_dicts
    yield module
    comfy.sd.load_text_encoder_state_dicts = before


def test_tiny_flf2v_file_is_detected_as_wan21_flf2v(tmp_path, comfy_nodes):
    import comfy.sd
    import comfy.supported_models as sm

    path = wan_fixtures.write_wan21_flf2v(str(tmp_path / "wan2.1_flf2v_720p_14B_fp16.safetensors"))
    model = comfy.sd.load_diffusion_model(path)
    assert isinstance(model.model.model_config, sm.WAN21_I2V)
    dm = model.model.diffusion_model
    assert dm.img_emb.emb_pos.shape == (1, 2 * wan_fixtures.CLIP_TOKENS, wan_fixtures.CLIP_WIDTH)
    assert dm.text_embedding[0].in_features == wan_fixtures.TEXT_DIM  # umt5-xxl's width


def test_tiny_vae_file_is_a_wan21_vae(tmp_path, comfy_nodes):
    import comfy.ldm.wan.vae
    import comfy.sd
    import comfy.utils

    path = wan_fixtures.write_wan21_vae(str(tmp_path / "wan_2.1_vae.safetensors"))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))
    assert type(vae.first_stage_model) is comfy.ldm.wan.vae.WanVAE and vae.latent_channels == 16
    with torch.inference_mode():
        latent = vae.encode(torch.rand(5, 32, 32, 3))  # 5 frames = 2 latent frames, 8x spatial
        assert latent.shape == (1, 16, 2, 4, 4) and torch.isfinite(latent).all()
        frames = vae.decode(latent)
    assert frames.shape[-4:] == (5, 32, 32, 3) and torch.isfinite(frames).all() and frames.std() > 0


def test_tiny_umt5_loads_as_the_wan_text_encoder_with_its_own_tokenizer(umt5_hook):
    import comfy.sd
    import comfy.text_encoders.wan
    import comfy.utils

    sd = comfy.utils.load_torch_file(wan_fixtures.cached_umt5_tiny())
    # core detection reads block 23's wi_1: 0.3.75 and 0.8.0 its width (d_model 4096, which the tiny file keeps), 0.29.0
    # its d_ff (10240 in umt5-xxl, 8 here; else it builds a 768-wide T5-base). With umt5-xxl's d_ff there core says
    # T5-XXL on every version; for the tiny file the hook says it (the load below builds the 24-block WanT5Model)
    key = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"
    assert sd[key].shape[-1] == 4096
    assert comfy.sd.detect_te_model({**sd, key: torch.empty(10240, 4096, device="meta")}) == comfy.sd.TEModel.T5_XXL
    # the sizes that differ from umt5-xxl's (it keeps the 24 blocks detection looks for)
    assert umt5_hook.umt5_sizes(sd) == {"num_heads": 2, "d_kv": 4, "d_ff": 8, "vocab_size": 32000}
    clip = comfy.sd.load_clip([wan_fixtures.cached_umt5_tiny()], clip_type=comfy.sd.CLIPType.WAN)
    assert isinstance(clip.tokenizer, comfy.text_encoders.wan.WanT5Tokenizer)
    assert isinstance(clip.cond_stage_model, comfy.text_encoders.wan.WanT5Model)
    assert clip.cond_stage_model.umt5xxl.transformer.num_layers == 24
    tokens = clip.tokenize("a comic character walking through a rainy city")
    ids = [t for t, _ in tokens["umt5xxl"][0]]
    assert len(set(ids)) > 5 and max(ids) < 32000  # the file's sentencepiece model, not a stand-in
    cond = clip.encode_from_tokens_scheduled(tokens)
    assert cond[0][0].shape[-1] == wan_fixtures.TEXT_DIM and torch.isfinite(cond[0][0]).all()


def test_umt5_hook_leaves_real_size_files_alone(umt5_hook):
    """A state dict with umt5-xxl's real shapes (built on the meta device) gets no override; T5 (bias in block 0
    only) and CLIP files are not umt5."""
    import comfy.ops
    from comfy.text_encoders import t5

    with torch.device("meta"):
        real = t5.T5(wan_fixtures.umt5_config(), torch.float16, "meta", comfy.ops.manual_cast).state_dict()
        t5_v1 = t5.T5(wan_fixtures.umt5_config(model_type="t5", num_layers=2), torch.float16, "meta",
                      comfy.ops.manual_cast).state_dict()
    assert umt5_hook.umt5_sizes(real) == {}
    assert umt5_hook.umt5_sizes(t5_v1) == {}
    assert umt5_hook.umt5_sizes({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1)}) == {}
