"""Wan 2.1 FLF2V per-frame semantics (wan/): a tiny random Wan 2.1 FLF2V model loaded through ComfyUI's own
detection (img_emb.emb_pos of 2 x 257 tokens, clip_fea 1280 wide, everything else narrow) and sampled with a
real KSampler. Strength 0 is bit-identical to the unpatched model (node and installed patch); at strength 1
and 0.5 every block's image cross-attention is checked against an independent reference computed from the
block's inputs (forward hooks): latent frame t's video tokens attend to the projection of the mean embedding
of the video frames it packs; Wan 2.2 (no img_emb) and non-Wan models are refused."""
from __future__ import annotations

import pytest
import torch

import tiny_models
from wan_fixtures import CLIP_TOKENS, CLIP_WIDTH, DIM, TEXT_DIM, wan_state_dict

LATENT_FRAMES, SIZE = 3, 8  # 3 latent frames = 9 video frames; 8x8 latent -> 4x4 = 16 tokens per frame
VIDEO_FRAMES = 4 * (LATENT_FRAMES - 1) + 1


def load(sd):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(sd)


@pytest.fixture(scope="module")
def wan(pack, comfy_nodes):
    import comfyui_storydiffusion.wan.comfy_adapter as adapter

    return adapter


@pytest.fixture(scope="module")
def flf_model(wan):
    return load(wan_state_dict(seed=3))


def clip_output(states):
    import comfy.clip_vision

    out = comfy.clip_vision.Output()
    out["penultimate_hidden_states"] = states
    return out


def conditioning(seed=0, start=None, end=None):
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(1, CLIP_TOKENS, CLIP_WIDTH, generator=g) if start is None else start
    end = torch.randn(1, CLIP_TOKENS, CLIP_WIDTH, generator=g) if end is None else end
    mask = torch.ones(1, 4, LATENT_FRAMES, SIZE, SIZE)
    mask[:, :, 0] = 0.0
    mask[:, :, -1] = 0.0
    values = {"concat_latent_image": torch.randn(1, 16, LATENT_FRAMES, SIZE, SIZE, generator=g), "concat_mask": mask,
              "clip_vision_output": clip_output(torch.cat([start, end], dim=-2))}
    positive = [[torch.randn(1, 5, TEXT_DIM, generator=g), dict(values)]]
    negative = [[torch.randn(1, 5, TEXT_DIM, generator=g), dict(values)]]
    return positive, negative


def predicted(frames=VIDEO_FRAMES, seed=7):
    return torch.randn(frames, CLIP_TOKENS, CLIP_WIDTH, generator=torch.Generator().manual_seed(seed))


def ksampler(model, seed=5, steps=2, cfg=3.0, cond=None):
    import nodes

    positive, negative = cond or conditioning()
    latent = {"samples": torch.zeros(1, 16, LATENT_FRAMES, SIZE, SIZE)}
    return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


# ---------------------------------------------------------------------------------------------------
# plain torch: frames -> latent frames


def test_latent_frame_weights_pack_four_frames_the_first_alone(pack):
    from comfyui_storydiffusion.wan.frames import latent_frame_weights

    w = latent_frame_weights(3, 9)  # exact indices: latent 0 = frame 0, 1 = frames 1..4, 2 = frames 5..8
    expected = torch.zeros(3, 9, dtype=torch.float64)
    expected[0, 0] = 1
    expected[1, 1:5] = 0.25
    expected[2, 5:9] = 0.25
    assert torch.equal(w, expected)
    w = latent_frame_weights(3, 2)  # start/end only: frames spread linearly between them
    assert torch.allclose(w.sum(1), torch.ones(3, dtype=torch.float64))
    assert w[0, 0] == 1 and torch.allclose(w[2], torch.tensor([1 - 6.5 / 8, 6.5 / 8], dtype=torch.float64))
    assert torch.equal(latent_frame_weights(4, 1), torch.ones(4, 1, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# detection, refusals


def test_tiny_model_is_detected_as_wan21_flf2v(flf_model, wan):
    import comfy.supported_models as sm

    assert isinstance(flf_model.model.model_config, sm.WAN21_I2V)
    dm = flf_model.model.diffusion_model
    assert dm.img_emb.emb_pos.shape == (1, 2 * CLIP_TOKENS, CLIP_WIDTH)
    assert wan.image_cross_attention_blocks(flf_model) == [0, 1]


def test_wan22_and_non_wan_models_are_refused(wan):
    from comfyui_storydiffusion.wan.frames import WanSemanticsError

    wan22 = load(wan_state_dict(image=False, layers=1))
    assert wan22.model.diffusion_model.img_emb is None
    with pytest.raises(WanSemanticsError, match="Wan 2.1 I2V or FLF2V") as info:
        wan.apply_per_frame_semantics(wan22, clip_output(predicted()), 0.5)
    assert "Wan 2.2" in str(info.value)
    sd15 = tiny_models.make_model("sd15")
    with pytest.raises(WanSemanticsError, match="Wan 2.1 I2V or FLF2V.*not Wan"):
        wan.apply_per_frame_semantics(sd15, clip_output(predicted()), 0.5)


def test_embeddings_of_another_width_are_refused(flf_model, wan):
    from comfyui_storydiffusion.wan.frames import WanSemanticsError

    with pytest.raises(WanSemanticsError, match="1024 wide"):
        wan.apply_per_frame_semantics(flf_model, clip_output(torch.zeros(9, 257, 1024)), 0.5)


def test_another_packs_forward_patch_is_refused_not_dropped(flf_model, wan):
    """The per-frame forward replaces WanI2VCrossAttention.forward whole, so it cannot chain another node's
    object patch of it: it says so. Applying the node twice replaces its own patch."""
    from comfyui_storydiffusion.wan.frames import WanSemanticsError

    embeds = clip_output(torch.zeros(9, 257, 1280))
    twice = wan.apply_per_frame_semantics(wan.apply_per_frame_semantics(flf_model, embeds, 0.5), embeds, 0.7)
    assert "diffusion_model.blocks.0.cross_attn.forward" in twice.object_patches
    foreign = flf_model.clone()
    foreign.add_object_patch("diffusion_model.blocks.0.cross_attn.forward", lambda *a, **k: None)
    with pytest.raises(WanSemanticsError, match="cannot stack with it"):
        wan.apply_per_frame_semantics(foreign, embeds, 0.5)


# ---------------------------------------------------------------------------------------------------
# strength 0: plain FLF2V, bit-identical


def test_strength_0_is_bit_identical_to_the_unpatched_model(flf_model, wan, comfy_nodes):
    from comfyui_storydiffusion.nodes.wan import WanPerFrameSemantics

    plain = ksampler(flf_model)
    node = WanPerFrameSemantics().apply(flf_model, clip_output(predicted()), 0.0)[0]
    installed = wan.apply_per_frame_semantics(flf_model, clip_output(predicted()), 0.0, install_at_zero=True)
    assert installed.object_patches and installed.get_wrappers("diffusion_model", wan.WRAPPER_KEY)
    assert torch.isfinite(plain).all()
    assert torch.equal(ksampler(node), plain)
    assert torch.equal(ksampler(installed), plain)
    assert torch.equal(ksampler(flf_model), plain)  # the input model is untouched afterwards


def test_the_same_embedding_everywhere_is_plain_flf2v(flf_model, wan):
    """Start = end = every predicted frame: each latent frame's tokens are the original pair."""
    e = predicted(frames=1)
    cond = conditioning(start=e, end=e)
    plain = ksampler(flf_model, cond=cond)
    patched = wan.apply_per_frame_semantics(flf_model, clip_output(e.expand(VIDEO_FRAMES, -1, -1)), 1.0)
    out = ksampler(patched, cond=cond)
    assert torch.allclose(out, plain, atol=1e-5, rtol=1e-4), (out - plain).abs().max()


# ---------------------------------------------------------------------------------------------------
# strength > 0: routing per latent frame, against an independent reference


def attend(q, k, v, heads):
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2).double() for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, lq, c).float()


def reference_cross_attention(module, dm, x, context, img_len, embeddings, strength, frame_of=lambda t: t):
    """Wan's I2V cross-attention written out, latent frame t's video tokens attending to
    img_emb([e_t, e_t]) with e_t the mean predicted embedding of the video frames latent frame t packs."""
    per = x.shape[1] // LATENT_FRAMES
    ctx_img, ctx = context[:, :img_len], context[:, img_len:]
    q = module.norm_q(module.q(x))
    text = attend(q, module.norm_k(module.k(ctx)), module.v(ctx), module.num_heads)
    orig = attend(q, module.norm_k_img(module.k_img(ctx_img)), module.v_img(ctx_img), module.num_heads)
    parts = []
    for t in range(LATENT_FRAMES):
        u = frame_of(t)
        frames = [0] if u == 0 else list(range(4 * u - 3, 4 * u + 1))
        e = embeddings[frames].mean(0, keepdim=True)
        tokens = dm.img_emb(torch.cat([e, e], dim=1))  # both FLF2V slots, with emb_pos
        k, v = module.norm_k_img(module.k_img(tokens)), module.v_img(tokens)
        rows = slice(t * per, (t + 1) * per)
        parts.append(attend(q[:, rows], k.expand(q.shape[0], -1, -1), v.expand(q.shape[0], -1, -1), module.num_heads))
    new = torch.cat(parts, dim=1)
    return module.o(text + (1 - strength) * orig + strength * new)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_each_latent_frame_attends_to_its_own_predicted_tokens(flf_model, wan, strength):
    dm = flf_model.model.diffusion_model
    embeddings = predicted()
    patched = wan.apply_per_frame_semantics(flf_model, clip_output(embeddings), strength)
    seen = []
    hooks = [block.cross_attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((m, args[0].detach(), args[1].detach(), kwargs["context_img_len"], out.detach())),
        with_kwargs=True) for block in dm.blocks]
    try:
        ksampler(patched)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * len(dm.blocks)  # 2 steps, cond + uncond batched in one call
    with torch.no_grad():
        for module, x, context, img_len, out in seen:
            assert img_len == 2 * CLIP_TOKENS and x.shape == (2, LATENT_FRAMES * 16, DIM)
            expected = reference_cross_attention(module, dm, x, context, img_len, embeddings, strength)
            assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()
            # the check tells frames apart: another frame's tokens or the plain model give other outputs
            shifted = reference_cross_attention(module, dm, x, context, img_len, embeddings, strength,
                                                frame_of=lambda t: (t + 1) % LATENT_FRAMES)
            assert (out - shifted).abs().max() > 100 * (out - expected).abs().max() + 1e-4
            plain = reference_cross_attention(module, dm, x, context, img_len, embeddings, 0.0)
            assert (out - plain).abs().max() > 100 * (out - expected).abs().max() + 1e-4


def test_node_metadata_and_registration(pack):
    node = pack.NODE_CLASS_MAPPINGS["StoryDiffusionWanPerFrameSemantics"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["StoryDiffusionWanPerFrameSemantics"] == "Wan Per-frame Semantics (StoryDiffusion)"
    assert node.CATEGORY == "StoryDiffusion/video" and node.DESCRIPTION
    inputs = node.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "clip_vision_output", "strength"]
    assert all(spec[1]["tooltip"] for spec in inputs.values())
    assert inputs["strength"][1]["default"] == 0.5 and "training distribution" in inputs["strength"][1]["tooltip"]


def test_conditioning_without_clip_vision_is_refused_when_sampling(flf_model, wan):
    from comfyui_storydiffusion.wan.frames import WanSemanticsError

    positive, negative = conditioning()
    for cond in (positive, negative):
        del cond[0][1]["clip_vision_output"]
    patched = wan.apply_per_frame_semantics(flf_model, clip_output(predicted()), 0.5)
    with pytest.raises(WanSemanticsError, match="no CLIP vision output"):
        ksampler(patched, cond=(positive, negative))
