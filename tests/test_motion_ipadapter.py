"""Per-frame semantic conditioning through IP-Adapter weights: file parsing, routing, patch, nodes."""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

import ipadapter_fixtures as fx
import tiny_models


@pytest.fixture(scope="module")
def ipa(pack):
    import comfyui_storydiffusion.ipadapter.comfy_adapter as adapter
    from comfyui_storydiffusion.common import attention
    from comfyui_storydiffusion.ipadapter import frames, weights

    public = {k: v for module in (weights, frames, attention) for k, v in vars(module).items() if not k.startswith("_")}
    core = types.SimpleNamespace(**public)
    return types.SimpleNamespace(core=core, comfy=adapter)


@pytest.fixture(scope="module")
def sd15(comfy_nodes):
    model = tiny_models.make_model("sd15")
    clip = tiny_models.make_clip("sd15")
    encode = comfy_nodes.CLIPTextEncode()
    return types.SimpleNamespace(model=model, positive=encode.encode(clip, "a cat walking")[0],
                                 negative=encode.encode(clip, "blurry")[0])


@pytest.fixture(scope="module")
def sdxl(comfy_nodes):
    model = tiny_models.make_model("sdxl")
    clip = tiny_models.make_clip("sdxl")
    encode = comfy_nodes.CLIPTextEncode()
    return types.SimpleNamespace(model=model, positive=encode.encode(clip, "a dog")[0], negative=encode.encode(clip, "")[0])


def sample(nodes, model, positive, negative, frames=3, steps=2, seed=7, size=16):
    """KSampler's own code path on an empty latent batch of `frames` frames."""
    latent = {"samples": torch.zeros(frames, 4, size // 2, size // 2)}
    out = nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", positive, negative, latent)
    return out[0]["samples"]


# ---------------------------------------------------------------------------------------------------
# files


def test_full_size_sd15_plain_file_recognised_in_both_formats(ipa, tmp_path):
    groups = fx.ipadapter_state_dict(fx.SD15_WIDTHS, 768, kind="plain", clip_dim=1024, num_tokens=4, dtype=torch.float16)
    for name in ("ip-adapter_sd15.safetensors", "ip-adapter_sd15.bin"):
        loaded = ipa.core.load_ipadapter_file(fx.write_ipadapter(str(tmp_path / name), groups))
        spec = ipa.core.inspect_ipadapter(loaded)
        assert (spec.kind, spec.clip_dim, spec.context_dim, spec.num_tokens) == ("plain", 1024, 768, 4)
        assert spec.layer_dims == tuple(fx.SD15_WIDTHS) and spec.family == "SD1.5"
        assert spec.input_field == "image_embeds"
        assert torch.equal(loaded["ip_adapter"]["31.to_v_ip.weight"], groups["ip_adapter"]["31.to_v_ip.weight"])
    adapter = ipa.core.IPAdapter(loaded)
    tokens = adapter.project(torch.randn(3, 1024))
    assert tokens.shape == (3, 4, 768)


@pytest.mark.parametrize("name,widths,context,kind,clip_dim,tokens,kw", [
    ("ip-adapter_sdxl_vit-h", fx.SDXL_WIDTHS, 2048, "plain", 1024, 4, {}),
    ("ip-adapter_sdxl (vit-G)", fx.SDXL_WIDTHS, 2048, "plain", 1280, 4, {}),
    ("ip-adapter-plus_sdxl_vit-h", fx.SDXL_WIDTHS, 2048, "plus", 1280, 16, {"resampler_dim": 1280, "resampler_inner": 1280, "depth": 4}),
    ("ip-adapter-plus_sd15", fx.SD15_WIDTHS, 768, "plus", 1280, 16, {"resampler_dim": 768, "resampler_inner": 768, "depth": 4}),
    ("ip-adapter-full-face_sd15", fx.SD15_WIDTHS, 768, "full", 1280, 0, {}),
])
def test_full_size_layouts_recognised(ipa, name, widths, context, kind, clip_dim, tokens, kw):
    groups = fx.ipadapter_state_dict(widths, context, kind=kind, clip_dim=clip_dim, num_tokens=tokens or 4,
                                     device="meta", **kw)
    spec = ipa.core.inspect_ipadapter(groups, name)
    assert (spec.kind, spec.clip_dim, spec.context_dim, spec.num_tokens) == (kind, clip_dim, context, tokens)
    assert len(spec.layer_dims) == (70 if context == 2048 else 16)


def test_sites_follow_the_file_order(ipa, sd15, sdxl):
    sites = ipa.comfy.cross_attention_sites(sd15.model)
    assert [s.key for s in sites] == fx.SD15_KEYS  # the real SD1.5 block layout
    assert [s.inner_dim for s in sites] == fx.TINY_SD15_WIDTHS
    sites = ipa.comfy.cross_attention_sites(sdxl.model)
    assert [s.key for s in sites] == fx.TINY_SDXL_KEYS
    assert [s.inner_dim for s in sites] == fx.TINY_SDXL_WIDTHS and {s.context_dim for s in sites} == {112}


def test_bad_files_give_clear_errors(ipa, tmp_path):
    Err = ipa.core.IPAdapterFormatError
    good = fx.tiny_ipadapter("sd15")
    path = fx.write_ipadapter(str(tmp_path / "cut.safetensors"), good)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(Err, match="corrupt, incomplete or not an IP-Adapter file"):
        ipa.core.load_ipadapter_file(path)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(Err, match="corrupt, incomplete or not an IP-Adapter file"):
        ipa.core.load_ipadapter_file(str(tmp_path / "junk.bin"))
    no_ip = fx.write_ipadapter(str(tmp_path / "lora.safetensors"), {"unet": {"x": torch.zeros(2)}})
    with pytest.raises(Err, match="no 'image_proj' weights"):
        ipa.core.load_ipadapter_file(no_ip)
    broken = {"image_proj": dict(good["image_proj"]), "ip_adapter": dict(good["ip_adapter"])}
    del broken["ip_adapter"]["5.to_v_ip.weight"]
    with pytest.raises(Err, match=r"ip_adapter\.5\.to_v_ip\.weight' is missing"):
        ipa.core.inspect_ipadapter(broken)
    faceid = {"image_proj": good["image_proj"], "ip_adapter": {**good["ip_adapter"], "0.to_q_lora.down.weight": torch.zeros(1, 1)}}
    with pytest.raises(Err, match="FaceID"):
        ipa.core.inspect_ipadapter(faceid)
    plus = fx.tiny_ipadapter("sd15", "plus")
    del plus["image_proj"]["layers.1.1.3.weight"]
    with pytest.raises(Err, match="does not match its weights"):
        ipa.core.IPAdapter(plus)


def test_wrong_family_names_both_sides(ipa, sd15):
    sd15_spec = ipa.core.inspect_ipadapter(fx.ipadapter_state_dict(fx.SD15_WIDTHS, 768, device="meta", clip_dim=1024))
    sdxl_sites = [ipa.comfy.CrossAttentionSite(k, 2048, w) for k, w in zip(fx.SDXL_KEYS, fx.SDXL_WIDTHS)]
    with pytest.raises(ipa.core.IPAdapterFormatError, match=r"for SD1\.5 .*model is SDXL"):
        ipa.comfy.check_ipadapter_fits(types.SimpleNamespace(spec=sd15_spec), sdxl_sites)
    # tiny models: the SDXL-layout adapter on the SD1.5 model
    with pytest.raises(ipa.core.IPAdapterFormatError, match="112-wide.*64"):
        ipa.comfy.apply_per_frame_ipadapter(sd15.model, fx.tiny_ipadapter("sdxl"), fx.frame_embeddings(2),
                                            None, 1.0, 0.0, 1.0)


def test_wrong_embedding_width_is_explained(ipa):
    adapter = ipa.core.IPAdapter(fx.tiny_ipadapter("sd15", clip_dim=32))
    with pytest.raises(ValueError, match="width 32.*shape \\(2, 48\\)"):
        adapter.project(torch.zeros(2, 48))


# ---------------------------------------------------------------------------------------------------
# routing and math


def test_route_frames_follows_cond_or_uncond(ipa):
    cond = torch.arange(3.0).reshape(3, 1, 1)
    uncond = -1 - torch.arange(3.0).reshape(3, 1, 1)
    rows = lambda t: t.flatten().tolist()
    assert rows(ipa.core.route_frames(cond, uncond, [1, 0], 6)) == [-1, -2, -3, 0, 1, 2]
    assert rows(ipa.core.route_frames(cond, uncond, [0], 3)) == [0, 1, 2]
    assert rows(ipa.core.route_frames(cond, uncond, [1, 0, 0], 9)) == [-1, -2, -3, 0, 1, 2, 0, 1, 2]
    one = ipa.core.route_frames(cond[:1], uncond[:1], [0, 1], 4)
    assert rows(one) == [0, 0, -1, -1]
    window = ipa.core.route_frames(cond, uncond, [0], 2, frame_indices=[2, 0])
    assert rows(window) == [2, 0]
    with pytest.raises(ipa.core.FrameCountError, match="3 embeddings but the latent batch has 4 frames"):
        ipa.core.route_frames(cond, uncond, [0, 1], 8)


def test_decoupled_attention_math(ipa):
    torch.manual_seed(0)
    q, k, v, ki, vi = (torch.randn(2, n, 16) for n in (5, 7, 7, 3, 3))
    out = ipa.core.decoupled_cross_attention(q, k, v, ki, vi, heads=2, weight=0.5)
    ref = lambda k_, v_: torch.softmax((q.view(2, 5, 2, 8).transpose(1, 2) @ k_.view(2, -1, 2, 8).transpose(1, 2).transpose(-1, -2)) / 8 ** 0.5, -1) @ v_.view(2, -1, 2, 8).transpose(1, 2)
    expected = (ref(k, v) + 0.5 * ref(ki, vi)).transpose(1, 2).reshape(2, 5, 16)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(ipa.core.decoupled_cross_attention(q, k, v, ki, vi, 2, 0.0), ipa.core.multihead_attention(q, k, v, 2))


def test_plus_projection_tokens(ipa):
    adapter = ipa.core.IPAdapter(fx.tiny_ipadapter("sd15", "plus"))
    hidden = fx.frame_embeddings(2, 32, tokens=5)
    tokens = adapter.project(hidden)
    assert tokens.shape == (2, 16, fx.TINY_SD15_CONTEXT)
    again = adapter.project(torch.stack([hidden[0], hidden[0] + 1]))
    assert torch.equal(tokens[0], again[0]) and not torch.allclose(tokens[1], again[1])


def record_routes(ipa, monkeypatch) -> list:
    """(cond_or_uncond, routed tokens) of every call of the IP branch."""
    seen = []
    real_route = ipa.comfy.route_frames

    def route(c, u, cond_or_uncond, rows, frame_indices=None):
        out = real_route(c, u, cond_or_uncond, rows, frame_indices)
        seen.append((list(cond_or_uncond), out))
        return out

    monkeypatch.setattr(ipa.comfy, "route_frames", route)
    return seen


def test_each_frame_gets_its_own_embedding(ipa, sd15, comfy_nodes, monkeypatch):
    """Hook on the IP branch's inputs: row c*B+j holds proj(embedding j) (positive chunk) or proj(0)
    (negative chunk: a *plain* adapter's unconditional input is zeros; plus / full-face adapters use the
    encoding of a black image, see the next test); the patch names chunks by their role."""
    groups = fx.tiny_ipadapter("sd15")
    embeds = fx.frame_embeddings(3, 32, seed=3)
    patched = ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, embeds, None, 1.0, 0.0, 1.0)
    adapter = ipa.core.IPAdapter(groups)
    assert adapter.spec.kind == "plain"
    cond, uncond = adapter.project(embeds), adapter.project(torch.zeros_like(embeds))
    seen = []
    real_route, real_attention = ipa.comfy.route_frames, ipa.comfy.image_attention

    def route(c, u, cond_or_uncond, rows, frame_indices=None):
        out = real_route(c, u, cond_or_uncond, rows, frame_indices)
        seen.append((list(cond_or_uncond), out))
        return out

    calls = []
    monkeypatch.setattr(ipa.comfy, "route_frames", route)
    monkeypatch.setattr(ipa.comfy, "image_attention", lambda q, k, v, h, a: calls.append(k.shape) or real_attention(q, k, v, h, a))
    sample(comfy_nodes, patched, sd15.positive, sd15.negative, frames=3, steps=1)
    assert len(seen) == len(calls) and len(calls) >= 16 and len(calls) % 16 == 0  # every attn2, every call
    for cond_or_uncond, tokens in seen:
        for c, kind in enumerate(cond_or_uncond):
            for j in range(3):
                assert torch.allclose(tokens[c * 3 + j], (uncond if kind == "negative" else cond)[j], atol=1e-6)
    assert any("positive" in c for c, _ in seen) and any("negative" in c for c, _ in seen)


@pytest.mark.parametrize("kind", ["plus", "full"])
def test_plus_and_full_face_uncond_is_the_black_image_encoding(ipa, sd15, comfy_nodes, monkeypatch, caplog, kind):
    """Plus / full-face adapters: the negative chunk gets proj(CLIP-vision encoding of a black image) (reference
    implementation, IPAdapter_plus) when clip_vision is connected; without it zeros, with a warning."""
    import motion_fixtures

    clip_vision = motion_fixtures.make_clip_vision()
    black = clip_vision.encode_image(torch.zeros(1, 224, 224, 3), crop=True)["penultimate_hidden_states"]
    groups = fx.tiny_ipadapter("sd15", kind)
    embeds = fx.frame_embeddings(3, 32, tokens=black.shape[1], seed=3)
    adapter = ipa.core.IPAdapter(groups)
    cond, uncond_black, uncond_zero = (adapter.project(e) for e in (embeds, black, torch.zeros_like(black)))
    assert (uncond_black - uncond_zero).abs().max() > 1e-3  # a black image is not a zero embedding

    for vision, expected in ((clip_vision, uncond_black), (None, uncond_zero)):
        seen = record_routes(ipa, monkeypatch)
        caplog.clear()
        patched = ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, embeds, None, 1.0, 0.0, 1.0, clip_vision=vision)
        warned = [r for r in caplog.records if "black image" in r.getMessage()]
        assert bool(warned) == (vision is None)
        sample(comfy_nodes, patched, sd15.positive, sd15.negative, frames=3, steps=1)
        assert seen and any("negative" in c for c, _ in seen)
        for cond_or_uncond, tokens in seen:
            for c, role in enumerate(cond_or_uncond):
                for j in range(3):
                    want = expected[0] if role == "negative" else cond[j]
                    assert torch.allclose(tokens[c * 3 + j], want, atol=1e-5)
    # the node passes its clip_vision input through
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionPerFrameSemanticConditioning"]()
    seen = record_routes(ipa, monkeypatch)
    (patched,) = node.apply(sd15.model, groups, 1.0, 0.0, 1.0, embeds=embeds, clip_vision=clip_vision)
    sample(comfy_nodes, patched, sd15.positive, sd15.negative, frames=3, steps=1)
    negative = [tokens[c * 3] for roles, tokens in seen for c, r in enumerate(roles) if r == "negative"]
    assert negative and all(torch.allclose(t, uncond_black[0], atol=1e-5) for t in negative)


def test_plain_adapter_keeps_zero_uncond_with_clip_vision(ipa, sd15):
    import motion_fixtures

    groups = fx.tiny_ipadapter("sd15")
    embeds = fx.frame_embeddings(2, 32, seed=3)
    patched = ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, embeds, None, 1.0, 0.0, 1.0,
                                                  clip_vision=motion_fixtures.make_clip_vision())
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
    zeros = ipa.core.IPAdapter(groups).project(torch.zeros_like(embeds))
    assert torch.allclose(patch.tokens.uncond, zeros, atol=1e-6)


def test_frame_only_depends_on_its_embedding(ipa, sd15, comfy_nodes):
    groups = fx.tiny_ipadapter("sd15")
    embeds = fx.frame_embeddings(3, 32, seed=1)
    changed = embeds.clone()
    changed[2] = fx.frame_embeddings(1, 32, seed=99)[0]
    a = sample(comfy_nodes, ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, embeds, None, 1.0, 0.0, 1.0), sd15.positive, sd15.negative)
    b = sample(comfy_nodes, ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, changed, None, 1.0, 0.0, 1.0), sd15.positive, sd15.negative)
    assert torch.allclose(a[:2], b[:2], atol=1e-6)
    assert (a[2] - b[2]).abs().max() > 1e-3


def test_weight_zero_is_bit_identical_and_weight_one_is_not(ipa, sd15, comfy_nodes):
    groups, embeds = fx.tiny_ipadapter("sd15"), fx.frame_embeddings(2, 32)
    plain = sample(comfy_nodes, sd15.model, sd15.positive, sd15.negative, frames=2)
    zero = sample(comfy_nodes, ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, embeds, None, 0.0, 0.0, 1.0), sd15.positive, sd15.negative, frames=2)
    late = sample(comfy_nodes, ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, embeds, None, 1.0, 0.3, 0.7), sd15.positive, sd15.negative, frames=2)
    on = ipa.comfy.apply_per_frame_ipadapter(sd15.model, groups, embeds, None, 1.0, 0.0, 1.0)
    one, again = (sample(comfy_nodes, on, sd15.positive, sd15.negative, frames=2) for _ in range(2))
    assert torch.equal(plain, zero)
    assert torch.equal(plain, late)  # both steps (sigma 14.6, 0.03) lie outside the 30-70 % window
    assert torch.equal(one, again)  # deterministic
    assert (plain - one).abs().max() > 1e-3
    assert "attn2" not in sd15.model.model_options["transformer_options"].get("patches_replace", {})  # input model untouched


def test_patch_survives_clone_and_moves_dtype(ipa, sd15):
    patched = ipa.comfy.apply_per_frame_ipadapter(sd15.model, fx.tiny_ipadapter("sd15"), fx.frame_embeddings(2), None, 1.0, 0.0, 1.0)
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(replace) == 16
    clone = patched.clone()
    assert clone.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)] is replace[("middle", 0, 0)]
    half = [p.to(torch.float16) for p in replace.values()]
    assert all(p.to_k_ip.dtype == torch.float16 and p.tokens.cond.dtype == torch.float16 for p in half)
    assert len({id(p.tokens) for p in half}) == 1  # one shared token copy, not one per layer
    assert replace[("middle", 0, 0)].to_k_ip.dtype == torch.float32


def test_wraps_an_existing_attn2_replace(ipa, sd15, comfy_nodes):
    calls = []

    def text_part(q, k, v, extra_options):
        calls.append(q.shape)
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"])

    base = sd15.model.clone()
    base.set_model_attn2_replace(text_part, "middle", 0, 0)
    patched = ipa.comfy.apply_per_frame_ipadapter(base, fx.tiny_ipadapter("sd15"), fx.frame_embeddings(2), None, 1.0, 0.0, 1.0)
    assert patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)].previous is text_part
    sample(comfy_nodes, patched, sd15.positive, sd15.negative, frames=2, steps=1)
    assert calls  # the earlier patch still computes the text attention


def test_sdxl_ksampler_run_with_plus_adapter(ipa, comfy_nodes, sdxl):
    model, positive, negative = sdxl.model, sdxl.positive, sdxl.negative
    groups = fx.tiny_ipadapter("sdxl", "plus")
    embeds = fx.frame_embeddings(2, 32, tokens=5)
    plain = sample(comfy_nodes, model, positive, negative, frames=2, steps=1)
    patched = ipa.comfy.apply_per_frame_ipadapter(model, groups, embeds, None, 1.0, 0.0, 1.0)
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == 17
    out = sample(comfy_nodes, patched, positive, negative, frames=2, steps=1)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3
    with pytest.raises(ipa.core.FrameCountError, match="2 embeddings but the latent batch has 3 frames"):
        sample(comfy_nodes, patched, positive, negative, frames=3, steps=1)


# ---------------------------------------------------------------------------------------------------
# nodes and a ComfyUI prompt


def test_node_inputs_have_tooltips(pack, comfy_nodes, models_dir):
    for node_id in ("StoryDiffusionIPAdapterLoader", "StoryDiffusionPerFrameSemanticConditioning"):
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (kind, *opts) in group.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("StoryDiffusion/")


def test_comfyui_prompt_end_to_end(comfy, comfy_nodes, checkpoint_files, models_dir):
    """CheckpointLoaderSimple (tiny SD1.5 file) -> IP-Adapter loader -> per-frame conditioning -> KSampler."""
    comfy_nodes.NODE_CLASS_MAPPINGS["TestFrameEmbeddings"] = fx.TestFrameEmbeddingsNode
    ckpt = checkpoint_files("sd15")
    # an adapter that fits the tiny checkpoint: real 768 context, 4 cross-attentions 320 wide
    # (input 1, output 2, output 3, middle: see tiny_models._file_unet_config)
    widths = [320] * 4
    fx.write_ipadapter(str(models_dir / "ipadapter" / "tiny-ip-adapter_sd15.safetensors"),
                       fx.ipadapter_state_dict(widths, 768, clip_dim=32, dtype=torch.float16))

    def prompt(frames, weight, redraw_frame=-1):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "StoryDiffusionIPAdapterLoader", "inputs": {"ipadapter_file": "tiny-ip-adapter_sd15.safetensors"}},
            "3": {"class_type": "TestFrameEmbeddings", "inputs": {"frames": frames, "dim": 32, "tokens": 5, "seed": 0,
                                                                  "redraw_frame": redraw_frame}},
            "4": {"class_type": "StoryDiffusionPerFrameSemanticConditioning",
                  "inputs": {"model": ["1", 0], "ipadapter": ["2", 0], "clip_vision_output": ["3", 0],
                             "weight": weight, "start_percent": 0.0, "end_percent": 1.0}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a fox"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1, "steps": 1, "cfg": 4.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "positive": ["5", 0],
                                                       "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
            "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0],
                                                         "filename_prefix": f"ipa_{frames}_{weight}_{redraw_frame}"}},
        }

    def latents(outputs):
        import folder_paths
        from safetensors.torch import load_file

        saved = outputs["9"]["latents"][0]
        path = os.path.join(folder_paths.get_output_directory(), saved["subfolder"], saved["filename"])
        return load_file(path)["latent_tensor"]

    base = latents(comfy.run(prompt(2, 1.0)))
    redrawn = latents(comfy.run(prompt(2, 1.0, redraw_frame=1)))
    plain = latents(comfy.run(prompt(2, 0.0)))
    assert base.shape[0] == 2
    assert torch.equal(redrawn[0], base[0])  # frame 0 does not see embedding 1
    assert (redrawn[1] - base[1]).abs().max() > 1e-3  # frame 1 follows its own embedding
    assert (base[0] - plain[0]).abs().max() > 1e-3  # and frame 0 follows embedding 0
    import harness

    with pytest.raises(harness.PromptFailed, match="3 embeddings but the latent batch has 2 frames"):
        comfy.run(prompt(3, 1.0))
