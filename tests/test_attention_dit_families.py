"""Consistent Self-Attention on the DiT families beyond Flux that ComfyUI loads natively: SD3 / SD3.5 (MMDiT,
with an MMDiT-X attn2 block), Qwen-Image, Lumina 2, Z-Image (padded caption and image tokens) and HiDream
(image tokens first). Tiny random models through a real KSampler: rate 0 is bit-identical to the unpatched
model, rate 1 equals an independent reference override that finds its blocks with forward pre-hooks on the
block modules and places the image tokens from the token layout written out here; plus the family table,
the attention-call bookkeeping and the refusals."""
from __future__ import annotations

import pytest
import torch

import tiny_dits
from test_attention_dit import assert_relative, make_story, patch, reference_rate_1

IMAGE = 16  # an 8x8 latent in 2x2 patches


@pytest.fixture(scope="module")
def models():
    return {}


def model_of(models, family):
    if family not in models:
        models[family] = tiny_dits.make(family, seed=11)
    return models[family]


def ksampler(model, family, panels=3, seed=5, steps=2, cfg=3.0):
    import nodes

    positive, negative = tiny_dits.conds(family, panels)
    latent = {"samples": torch.zeros(panels, 16, 8, 8)}
    return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


# ---------------------------------------------------------------------------------------------------
# the reference: blocks found by forward pre-hooks, token layout written out per family


# family -> (modules of each block kind, tokens before the image, tokens of a joint call)
def layout(family, dm):
    text = tiny_dits.TEXT
    if family == "sd3":
        return {"double": dm.joint_blocks}, text, text + IMAGE
    if family == "qwen":
        return {"double": dm.transformer_blocks}, text, text + IMAGE
    if family == "lumina":
        return {"single": dm.layers, None: list(dm.context_refiner) + list(dm.noise_refiner)}, text, text + IMAGE
    if family == "z_image":  # caption 5 -> 32 tokens, image 16 -> 32 tokens (pad tokens after the image)
        return {"single": dm.layers, None: list(dm.context_refiner) + list(dm.noise_refiner)}, 32, 32 + 32
    if family == "hidream":  # image first, then T5 + two Llama layers
        return ({"double": dm.double_stream_blocks, "single": dm.single_stream_blocks}, 0,
                IMAGE + text + 2 * tiny_dits.LLAMA)
    raise ValueError(family)


class Reference:
    """CSA at rate 1 on `layers`, plain elsewhere: an override plus forward pre-hooks that say which block runs."""

    def __init__(self, family, model, layers):
        self.layers, self.current, self.hooks, self.calls = set(layers), None, [], []
        modules, self.before, self.joint = layout(family, model.model.diffusion_model)
        for kind, blocks in modules.items():
            for i, block in enumerate(blocks):
                key = None if kind is None else (kind, i)
                self.hooks.append(block.register_forward_pre_hook(lambda m, a, key=key: setattr(self, "current", key)))

    def close(self):
        for hook in self.hooks:
            hook.remove()

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        skip = kwargs.get("skip_reshape", False)
        tokens = k.shape[2] if skip else k.shape[1]
        self.calls.append((self.current, tokens))
        if self.current not in self.layers or tokens != self.joint:  # MMDiT-X attn2: the image only
            return func(q, k, v, heads, *args, **kwargs)
        if not skip:
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        options = kwargs["transformer_options"]
        chunks = len(options["cond_or_uncond"])
        panels = q.shape[0] // chunks
        share = getattr(self, "share", None) or [[True] * panels for _ in range(panels)]
        return reference_rate_1(q, k, v, chunks, self.before, IMAGE, share)


FAMILIES = ["sd3", "qwen", "lumina", "z_image", "hidream"]
DEFAULTS = {  # default blocks of the tiny models (the later half; HiDream: the later half of its single stack)
    "sd3": [("double", 1), ("double", 2)], "qwen": [("double", 2), ("double", 3)],
    "lumina": [("single", 2), ("single", 3)], "z_image": [("single", 2), ("single", 3)],
    "hidream": [("single", 1)],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_ksampler_rate_0_bit_identical_and_rate_1_equals_the_reference(csa, models, family):
    model = model_of(models, family)
    plain = ksampler(model, family)
    assert torch.equal(ksampler(patch(csa, model, rate=0.0), family), plain)
    assert torch.equal(ksampler(model, family), plain)  # the input model is untouched

    reference = Reference(family, model, DEFAULTS[family])
    try:
        with_reference = model.clone()
        with_reference.model_options["transformer_options"]["optimized_attention_override"] = reference
        expected = ksampler(with_reference, family)
        actual = ksampler(patch(csa, model, rate=1.0), family)
    finally:
        reference.close()
    assert (expected - plain).abs().max() > 1e-3
    assert_relative(actual, expected, 1e-5)
    assert {block for block, _ in reference.calls} >= {tuple(key) for key in DEFAULTS[family]}
    # the official-schedule and story paths run and repeat
    patched = patch(csa, model, official_schedule=True)
    assert torch.equal(ksampler(patched, family), ksampler(patched, family))


def test_the_family_table(csa, models):
    from comfyui_storydiffusion.attention import schedule

    expected = {"sd3": csa.SD3, "qwen": csa.QWEN_IMAGE, "lumina": csa.LUMINA2, "z_image": csa.Z_IMAGE,
                "hidream": csa.HIDREAM}
    for family, table in expected.items():
        model = model_of(models, family)
        assert csa.dit_family(model) is table
        dm = model.model.diffusion_model
        assert table.default_blocks(dm) == [(kind, i, 0) for kind, i in DEFAULTS[family]]
        layers = patch(csa, model).model_options["transformer_options"][csa.CONFIG_KEY].layers
        assert layers == tuple(table.default_blocks(dm))

    def real(**lists):
        return type("Real", (), {name: [None] * n for name, n in lists.items()})()

    assert csa.QWEN_IMAGE.default_blocks(real(transformer_blocks=60))[0] == ("double", 30, 0)
    assert len(csa.QWEN_IMAGE.default_blocks(real(transformer_blocks=60))) == 30
    assert csa.SD3.default_blocks(real(joint_blocks=38)) == [("double", i, 0) for i in range(19, 38)]  # SD3.5 Large
    assert csa.SD3.default_blocks(real(joint_blocks=24)) == [("double", i, 0) for i in range(12, 24)]  # SD3.5 Medium
    assert csa.LUMINA2.default_blocks(real(layers=26)) == [("single", i, 0) for i in range(13, 26)]
    assert csa.Z_IMAGE.default_blocks(real(layers=30)) == [("single", i, 0) for i in range(15, 30)]
    hidream = csa.HIDREAM.default_blocks(real(double_stream_blocks=16, single_stream_blocks=32))
    assert hidream == [("single", i, 0) for i in range(16, 32)]
    lumina = model_of(models, "lumina").model.diffusion_model
    assert schedule.select_layers(csa.LUMINA2.blocks(lumina), schedule.LAYERS_CUSTOM, "single 0, single 3") == \
        [("single", 0, 0), ("single", 3, 0)]


@pytest.mark.parametrize("family", ["sd3", "hidream"])
def test_all_blocks_story_groups_and_nc(csa, models, family):
    model = model_of(models, family)
    plain = ksampler(model, family, panels=4)
    story = make_story([("Ann",), ("Ann",), ("Bob",), ()])
    grouped = ksampler(patch(csa, model, rate=1.0, layer_choice="all blocks", story=story), family, panels=4)
    torch.testing.assert_close(grouped[3], plain[3], atol=1e-5, rtol=0)  # [NC] shares nothing
    torch.testing.assert_close(grouped[2], plain[2], atol=1e-5, rtol=0)  # Bob is alone in his group
    assert (grouped[0] - plain[0]).abs().max() > 1e-3
    window = patch(csa, model, window=2)
    assert torch.equal(ksampler(window, family, panels=4), ksampler(window, family, panels=4))


def test_sd3_chains_to_a_block_replace_and_an_override_it_had(csa, models):
    model = model_of(models, "sd3")
    seen, blocks = [], []

    def foreign(func, q, k, v, heads, **kwargs):
        seen.append(k.shape[1] if not kwargs.get("skip_reshape") else k.shape[2])
        return func(q, k, v, heads, **kwargs)

    def replace(args, extra):  # another pack's dit block replace on joint block 2
        blocks.append(args["txt"].shape[1])
        return extra["original_block"](args)

    theirs = model.clone()
    theirs.model_options["transformer_options"]["optimized_attention_override"] = foreign
    theirs.set_model_patch_replace(replace, "dit", "double_block", 2)
    only_theirs = ksampler(theirs, "sd3")
    assert blocks and seen
    assert torch.equal(ksampler(patch(csa, theirs, rate=0.0), "sd3"), only_theirs)
    seen.clear()
    blocks.clear()
    both = ksampler(patch(csa, patch(csa, theirs, seed=9), rate=1.0), "sd3")  # patching twice keeps theirs
    assert blocks and max(seen) > tiny_dits.TEXT + IMAGE  # CSA's extended keys went through their override
    assert (both - only_theirs).abs().max() > 1e-3
    replaces = patch(csa, theirs).model_options["transformer_options"]["patches_replace"]["dit"]
    assert replaces[("double_block", 2)].inner is replace and replaces[("double_block", 0)].inner is None


def test_attention_calls_are_checked(csa):
    calls = csa.AttentionCalls("Lumina 2", [(None, 0, 0, 5), (("single", 0, 0), 5, 16, 21)])
    assert calls.next(5) == (None, 0, 0)
    with pytest.raises(ValueError, match="attention call 2 attends over 22 tokens, not the 21"):
        calls.next(22)
    with pytest.raises(ValueError, match="more than the 2 attention calls"):
        calls.next(21)


def test_an_extra_attention_call_is_refused(csa, models):
    """A foreign override that runs attention twice per call makes the counted calls disagree: refused, not guessed."""
    model = model_of(models, "lumina")

    def twice(func, q, k, v, heads, *args, **kwargs):
        kwargs_again = dict(kwargs)
        del kwargs_again["_inside_attn_wrapper"]
        from comfy.ldm.modules import attention
        attention.optimized_attention_masked(q, k, v, heads, *args, **kwargs_again)  # re-enters the override chain
        return func(q, k, v, heads, *args, **kwargs)

    theirs = model.clone()
    theirs.model_options["transformer_options"]["optimized_attention_override"] = twice
    with pytest.raises(ValueError, match="Lumina 2 attention call"):
        ksampler(patch(csa, theirs), "lumina")


def test_hidream_e1_is_refused(csa, models):
    model = model_of(models, "hidream")
    family = csa.dit_family(model)
    x = torch.zeros(1, 16, 8, 8)
    with pytest.raises(ValueError, match="HiDream E1"):
        family.call_options(model.model.diffusion_model, {"x": x, "context": torch.zeros(1, 5, 16),
                                                          "encoder_hidden_states_llama3": torch.zeros(1, 4, 3, 16, 16),
                                                          "image_cond": x})


def test_qwen_image_edit_reference_tokens_are_not_shared(csa, models):
    """Qwen-Image Edit appends reference-latent tokens after the image tokens: a panel never shares them."""
    import nodes

    model = model_of(models, "qwen")
    reference = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    seen = []

    def recorder(func, q, k, v, heads, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return func(q, k, v, heads, *args, **kwargs)

    theirs = model.clone()
    theirs.model_options["transformer_options"]["optimized_attention_override"] = recorder
    positive, negative = tiny_dits.conds("qwen", 3)
    for cond in (positive, negative):
        cond[0][1]["reference_latents"] = [reference]
    latent = {"samples": torch.zeros(3, 16, 8, 8)}

    def run(m):
        return nodes.KSampler().sample(m, 5, 2, 3.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    plain = run(model)
    out = run(patch(csa, theirs, rate=1.0, layer_choice="all blocks"))
    assert (out - plain).abs().max() > 1e-3 and torch.isfinite(out).all()
    own = tiny_dits.TEXT + IMAGE + IMAGE  # text, image, reference image tokens
    assert {(qn, kn) for qn, kn in seen} == {(own, own + 2 * IMAGE)}  # + the 16 image tokens of each other panel
