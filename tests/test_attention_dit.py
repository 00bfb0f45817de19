"""Consistent Self-Attention on DiT models (Flux.1, Flux.2, Chroma): the attention override against a naive joint
attention written here, real KSampler runs on tiny random Flux/Chroma models against a second,
independent override, story groups, windows, chaining to another override, Kontext reference tokens,
and the errors for models and nodes that do not apply."""
from __future__ import annotations

import pytest
import torch

import tiny_models

STEPS = 2
TEXT = 5  # text tokens of the random conditioning
CONTEXT_DIM, POOLED_DIM = 16, 8  # tiny_models.flux_unet_config defaults


@pytest.fixture(scope="module")
def flux():
    return tiny_models.make_dit("flux", seed=1)


@pytest.fixture(scope="module")
def chroma():
    return tiny_models.make_dit("chroma", seed=2)


def conds(panels: int, seed: int = 0, reference=None):
    """Per-panel random prompts (CONDITIONING batch of N, with the pooled output Flux needs) and a negative."""
    g = torch.Generator().manual_seed(seed)

    def one():
        extra = {"pooled_output": torch.randn(panels, POOLED_DIM, generator=g)}
        if reference is not None:
            extra["reference_latents"] = [reference]
        return [[torch.randn(panels, TEXT, CONTEXT_DIM, generator=g), extra]]

    return one(), one()


def ksampler(model, panels=3, seed=5, steps=STEPS, size=8, cfg=3.0, cond_seed=0, reference=None, channels=16):
    import nodes

    positive, negative = conds(panels, cond_seed, reference)
    latent = {"samples": torch.zeros(panels, channels, size, size)}
    return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def patch(csa, model, **kw):
    args = dict(rate=0.5, rate_high_res=0.5, window=0, layer_choice="output blocks (official)", custom_layers="",
                start_percent=0.0, end_percent=1.0, official_schedule=False, seed=3, story=None)
    args.update(kw)
    return csa.patch_model(model, **args)


def make_story(panel_chars):
    from comfyui_storydiffusion.story.model import Character, Panel, Story

    names = sorted({c for chars in panel_chars for c in chars})
    return Story(characters=tuple(Character(n, f"{n} description") for n in names),
                 panels=tuple(Panel(f"panel {i}", "", tuple(c)) for i, c in enumerate(panel_chars)),
                 identity_panels={})


# ---------------------------------------------------------------------------------------------------
# the reference: naive joint attention, written independently of attention/dit.py


def naive_attention(q, k, v):
    """[H, Nq, D] x [H, Nk, D] -> [Nq, H*D], softmax in float64."""
    scores = torch.einsum("hqd,hkd->hqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    out = torch.einsum("hqk,hkd->hqd", scores.softmax(-1), v.double())
    return out.permute(1, 0, 2).reshape(q.shape[1], -1).to(q.dtype)


def reference_rate_1(q, k, v, chunks, text, image, share, window=0, hidden_key=None):
    """Every panel: joint attention over its own tokens plus ALL image tokens of the panels it shares with
    inside its chunk (and its window; a panel's output is the mean over its windows). hidden_key: an own
    key (a text token) every query ignores."""
    total = q.shape[0]
    panels = total // chunks
    windows = [list(range(panels))] if window in (0, panels) else [list(range(s, s + window)) for s in range(panels - window + 1)]
    out = torch.zeros(total, q.shape[2], q.shape[1] * q.shape[3], dtype=q.dtype)
    counts = torch.zeros(panels)
    for members in windows:
        for i in members:
            counts[i] += 1
            for c in range(chunks):
                row = c * panels + i
                own = [t for t in range(k.shape[2]) if t != hidden_key]
                keys, values = [k[row][:, own]], [v[row][:, own]]
                for j in members:
                    if j != i and share[i][j]:
                        keys.append(k[c * panels + j][:, text:text + image])
                        values.append(v[c * panels + j][:, text:text + image])
                out[row] += naive_attention(q[row], torch.cat(keys, 1), torch.cat(values, 1))
    return out / counts.repeat(chunks)[:, None, None]


def reference_override(layers, text, image, share_of=None):
    """A second, independent override: CSA at rate 1 on `layers` (block_type, block_index), plain elsewhere."""

    def override(func, q, k, v, heads, **kwargs):
        options = kwargs["transformer_options"]
        if (options.get("block_type"), options.get("block_index")) not in layers:
            return func(q, k, v, heads, **kwargs)
        chunks = len(options["cond_or_uncond"])
        panels = q.shape[0] // chunks
        share = share_of(panels) if share_of else [[True] * panels for _ in range(panels)]
        return reference_rate_1(q, k, v, chunks, text, image, share)

    return override


# ---------------------------------------------------------------------------------------------------
# calling the override directly, as ComfyUI's wrap_attn does


def call_override(csa, model, q, k, v, kinds, block=("single", 0), text=TEXT, image=16, sigma=0.5, batch=None,
                  mask=None):
    from comfy.ldm.modules import attention

    options = dict(model.model_options["transformer_options"])
    config = options[csa.CONFIG_KEY]
    run = csa.start_run(config, batch or q.shape[0] // len(kinds), [1.0, 0.5, 0.0])
    options.update({csa.RUN_KEY: run, csa.TOKENS_KEY: (image, q.shape[2] - text - image), "block_type": block[0], "block_index": block[1],
                    "cond_or_uncond": kinds, "sigmas": torch.full((q.shape[0],), sigma)})
    override = options[csa.OVERRIDE_SLOT]
    func = attention.optimized_attention
    return override(func, q, k, v, q.shape[1], mask=mask, skip_reshape=True, transformer_options=options,
                    _inside_attn_wrapper=True)


def qkv(rows, tokens, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, tokens, dim, generator=g) for _ in range(3)]


def assert_relative(actual, expected, tol=1e-5):
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error < tol, f"relative error {error}"


# ---------------------------------------------------------------------------------------------------


def test_families_blocks_and_the_layer_syntax(csa, flux, chroma):
    from comfyui_storydiffusion.attention import schedule

    assert csa.dit_family(flux) is csa.FLUX1 and csa.dit_family(chroma) is csa.CHROMA
    assert csa.dit_family(tiny_models.make_dit("flux2")) is csa.FLUX2
    dm = flux.model.diffusion_model
    assert csa.FLUX1.blocks(dm) == [("double", 0, 0), ("double", 1, 0), ("single", 0, 0), ("single", 1, 0)]
    assert csa.FLUX1.default_blocks(dm) == [("single", 1, 0)]  # the later part of the single stack
    real = type("FluxDev", (), {"double_blocks": [None] * 19, "single_blocks": [None] * 38})()
    default = csa.FLUX1.default_blocks(real)
    assert default == [("single", i, 0) for i in range(11, 38)]  # single 11-37 (Story2Board), 27 of 57 blocks
    assert schedule.select_layers(csa.FLUX1.blocks(real), schedule.LAYERS_CUSTOM, "single 11-37") == default
    flux2 = type("Flux2Dev", (), {"double_blocks": [None] * 8, "single_blocks": [None] * 48})()
    assert csa.FLUX2.default_blocks(flux2) == [("single", i, 0) for i in range(14, 48)]  # the same share of the stack
    assert schedule.select_layers(csa.FLUX1.blocks(dm), schedule.LAYERS_CUSTOM, "double 0, single 1") == \
        [("double", 0, 0), ("single", 1, 0)]
    ordinals = [schedule.layer_ordinal(key) for key in csa.FLUX1.blocks(real)]
    unet = [schedule.layer_ordinal((kind, b, i)) for kind in ("input", "middle", "output") for b in range(12) for i in range(10)]
    assert len(set(ordinals)) == len(ordinals) and not set(ordinals) & set(unet)
    assert schedule.layer_ordinal(("double", 3, 0)) == 4_003_000  # stable: part of the sampling seed
    patched = patch(csa, flux, layer_choice="custom list", custom_layers="double 0, single 1")
    assert patched.model_options["transformer_options"][csa.CONFIG_KEY].layers == (("double", 0, 0), ("single", 1, 0))
    with pytest.raises(ValueError, match="matches no transformer block"):
        patch(csa, flux, layer_choice="custom list", custom_layers="output 3-11")


def test_rate_0_is_bit_identical_and_the_input_model_is_untouched(csa, flux):
    before = ksampler(flux)
    assert torch.equal(ksampler(patch(csa, flux, rate=0.0)), before)
    patched = patch(csa, flux)
    first = ksampler(patched)
    assert (first - before).abs().max() > 1e-3
    assert torch.equal(ksampler(patched), first)  # deterministic
    assert torch.equal(ksampler(patched.clone()), first)  # survives clone()
    assert not torch.equal(ksampler(patch(csa, flux, seed=4)), first)
    assert torch.equal(ksampler(flux), before)  # the input model is untouched
    options = flux.model_options["transformer_options"]
    assert csa.OVERRIDE_SLOT not in options and csa.CONFIG_KEY not in options and "wrappers" not in options
    assert torch.equal(ksampler(patch(csa, flux, start_percent=1.0, end_percent=1.0)), before)


@pytest.mark.parametrize("kinds", [[0], [1, 0], [0, 1, 0]])
def test_override_at_rate_1_equals_naive_joint_attention(csa, flux, kinds):
    panels, text, image, ref = 3, TEXT, 16, 6  # + 6 Kontext-style tokens after the image: never shared
    patched = patch(csa, flux, rate=1.0, layer_choice="all blocks")
    q, k, v = qkv(len(kinds) * panels, text + image + ref)
    out = call_override(csa, patched, q, k, v, kinds)
    share = [[True] * panels for _ in range(panels)]
    assert_relative(out, reference_rate_1(q, k, v, len(kinds), text, image, share))
    # each chunk alone gives the same rows: cond only shares with cond
    alone = call_override(csa, patched, q[:panels], k[:panels], v[:panels], [kinds[0]])
    torch.testing.assert_close(out[:panels], alone, atol=1e-6, rtol=0)


def test_override_story_groups_window_and_mask(csa, flux):
    text, image = TEXT, 16
    story = make_story([("Ann",), ("Ann", "Bob"), ("Bob",), ()])
    patched = patch(csa, flux, rate=1.0, layer_choice="all blocks", story=story)
    q, k, v = qkv(8, text + image, seed=1)
    out = call_override(csa, patched, q, k, v, [0, 1])
    sets = [set(p.characters) for p in story.panels]
    share = [[bool(a & b) for b in sets] for a in sets]
    assert_relative(out, reference_rate_1(q, k, v, 2, text, image, share))
    # [NC] (panel 3) reads nothing but itself
    plain = reference_rate_1(q, k, v, 2, text, image, [[False] * 4 for _ in range(4)])
    torch.testing.assert_close(out[3], plain[3], atol=1e-5, rtol=0)
    assert (out[0] - plain[0]).abs().max() > 1e-3

    windowed = patch(csa, flux, rate=1.0, layer_choice="all blocks", window=2)
    out = call_override(csa, windowed, q, k, v, [0, 1])
    everyone = [[True] * 4 for _ in range(4)]
    assert_relative(out, reference_rate_1(q, k, v, 2, text, image, everyone, window=2))

    # a per-row attention mask that hides text token 1 of each panel: cut per panel, extended (open) per shared key
    every = patch(csa, flux, rate=1.0, layer_choice="all blocks")
    mask = torch.zeros(8, text + image, text + image)
    mask[:, :, 1] = float("-inf")
    out = call_override(csa, every, q, k, v, [0, 1], mask=mask)
    assert_relative(out, reference_rate_1(q, k, v, 2, text, image, everyone, hidden_key=1))
    assert (out - reference_rate_1(q, k, v, 2, text, image, everyone)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["flux", "chroma", "flux2"])
def test_ksampler_at_rate_1_equals_an_independent_override(csa, flux, chroma, family):
    model = {"flux": flux, "chroma": chroma}.get(family) or tiny_models.make_dit(family, seed=4)
    # Flux.2: 1x1 patches of a 128-channel 4x4 latent, prompts padded to 512 tokens; the others 2x2 patches of 8x8
    text, shape = (512, dict(channels=128, size=4)) if family == "flux2" else (TEXT, {})
    layers = {("single", 1)}  # the default blocks of the tiny models (the later part of the single stack)
    patched = patch(csa, model, rate=1.0)
    reference = model.clone()
    reference.model_options["transformer_options"]["optimized_attention_override"] = reference_override(layers, text, 16)
    expected = ksampler(reference, **shape)
    actual = ksampler(patched, **shape)
    assert (expected - ksampler(model, **shape)).abs().max() > 1e-3
    assert_relative(actual, expected, 1e-5)
    assert torch.equal(ksampler(patch(csa, model, rate=0.0), **shape), ksampler(model, **shape))


def test_ksampler_story_groups_nc_and_window(csa, flux):
    plain = ksampler(flux, panels=4)
    story = make_story([("Ann",), ("Ann",), ("Bob",), ()])
    grouped = ksampler(patch(csa, flux, story=story), panels=4)
    torch.testing.assert_close(grouped[3], plain[3], atol=1e-5, rtol=0)  # [NC] shares nothing
    torch.testing.assert_close(grouped[2], plain[2], atol=1e-5, rtol=0)  # Bob is alone in his group
    assert (grouped[0] - plain[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="the story has 4 panels but the latent batch has 3"):
        ksampler(patch(csa, flux, story=story), panels=3)
    batch = ksampler(patch(csa, flux), panels=4)
    window = patch(csa, flux, window=2)
    w1 = ksampler(window, panels=4)
    assert not torch.equal(w1, batch) and torch.equal(ksampler(window, panels=4), w1)
    official = patch(csa, flux, official_schedule=True)
    assert torch.equal(ksampler(official, panels=4), ksampler(official, panels=4))


def test_chains_to_the_override_the_model_had(csa, flux):
    seen = []

    def foreign(func, q, k, v, heads, **kwargs):  # another pack's attention backend: a softer temperature
        seen.append((kwargs["transformer_options"].get("block_type"), q.shape[2], k.shape[2]))
        return func(q * 0.5, k, v, heads, **kwargs)

    with_foreign = flux.clone()
    with_foreign.model_options["transformer_options"]["optimized_attention_override"] = foreign
    only_foreign = ksampler(with_foreign)
    assert torch.equal(ksampler(patch(csa, with_foreign, rate=0.0)), only_foreign)  # plain path goes through it
    seen.clear()
    both = ksampler(patch(csa, with_foreign))
    assert not torch.equal(both, only_foreign) and not torch.equal(both, ksampler(patch(csa, flux)))
    assert any(kn > qn for _, qn, kn in seen)  # CSA's extended keys went through the foreign override
    assert any(kn == qn for _, qn, kn in seen)  # and so did the plain blocks
    # patching twice keeps the foreign override and replaces ours
    twice = patch(csa, patch(csa, with_foreign, seed=9))
    assert twice.model_options["transformer_options"][csa.OVERRIDE_SLOT].inner is foreign
    assert torch.equal(ksampler(twice), both)
    assert with_foreign.model_options["transformer_options"]["optimized_attention_override"] is foreign


def test_kontext_reference_tokens_are_not_shared(csa, flux):
    reference = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    seen = []

    def recorder(func, q, k, v, heads, **kwargs):
        seen.append((q.shape[0], q.shape[2], k.shape[2]))
        return func(q, k, v, heads, **kwargs)

    with_recorder = flux.clone()
    with_recorder.model_options["transformer_options"]["optimized_attention_override"] = recorder
    patched = patch(csa, with_recorder, rate=1.0, layer_choice="all blocks")
    plain = ksampler(flux, reference=reference)
    out = ksampler(patched, reference=reference)
    assert (out - plain).abs().max() > 1e-3 and torch.isfinite(out).all()
    own = TEXT + 16 + 16  # text, image, reference image tokens
    # one query panel per call: its own tokens + the 16 image tokens of each of the 2 other panels, no references
    assert {(qn, kn) for _, qn, kn in seen} == {(own, own + 2 * 16)}


def test_interrupted_run_then_new_run_reproduces(csa, flux):
    import comfy.model_management
    import comfy.sample

    patched = patch(csa, flux)
    positive, negative = conds(3)
    latent = torch.zeros(3, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 5)

    def run(callback=None):
        return comfy.sample.sample(patched, noise, STEPS, 3.0, "euler", "normal", positive, negative, latent,
                                   callback=callback, disable_pbar=True, seed=5)

    clean = run()

    def interrupt(step, *args):
        if step == 1:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(interrupt)
    assert torch.equal(run(), clean)


def test_unsupported_models_are_refused(csa, flux):
    import comfy.ldm.wan.model
    import comfy.ops

    wan = comfy.ldm.wan.model.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64,
                                       freq_dim=32, text_dim=16, out_dim=16, num_heads=2, num_layers=1,
                                       operations=comfy.ops.disable_weight_init)
    tiny_wan = type("Patcher", (), {"model": type("M", (), {"diffusion_model": wan})()})()
    with pytest.raises(ValueError, match=r"does not support Wan \(video\) models yet; it works on UNet models "
                                         r"\(SD1.5, SD2, SDXL\) and the DiT families Flux.1 .* and Chroma"):
        patch(csa, tiny_wan)

    class MysteryDiT(torch.nn.Module):
        pass

    fake = type("Patcher", (), {"model": type("M", (), {"diffusion_model": MysteryDiT()})()})()
    with pytest.raises(ValueError, match="works on UNet models .*Flux.1.*Chroma; this MODEL is a MysteryDiT"):
        patch(csa, fake)


def test_the_node_patches_flux(flux, comfy_nodes, pack):
    node = pack.NODE_CLASS_MAPPINGS["StoryDiffusionConsistentSelfAttention"]()
    (patched,) = node.patch(flux, 0.5, 0.5, 0, "output blocks (official)", "", 0.0, 1.0, "every step", 3)
    assert (ksampler(patched) - ksampler(flux)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="entry 1 'double x'"):
        node.patch(flux, 0.5, 0.5, 0, "custom list", "double x", 0.0, 1.0, "every step", 3)


def test_flux_dev_with_guidance_embedding(csa):
    dev = tiny_models.make_dit("flux_guidance", seed=3)
    before = ksampler(dev)
    assert torch.equal(ksampler(patch(csa, dev, rate=0.0)), before)
    assert (ksampler(patch(csa, dev)) - before).abs().max() > 1e-3
