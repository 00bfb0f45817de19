"""Consistent Self-Attention never silently off, never silently wrong: another pack taking the attention slot
after ours, an attention call that never comes, arguments ComfyUI reorders, and a post_input patch that
lengthens Flux's text. Each case ran without a word before; now it warns, refuses, or is right."""
from __future__ import annotations

import inspect
import logging

import pytest
import torch

import test_attention_comfy as unet_tests
import test_attention_dit as flux_tests
import tiny_models
from test_attention_dit import assert_relative, reference_override
from test_attention_dit_families import ksampler as family_ksampler
from test_attention_dit_families import model_of

UNREACHED = r"Consistent Self-Attention ran in 0 of the \d+ .* layers it was to share"


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.fixture(scope="module")
def sd15():
    return unet_tests.make_sd15()


@pytest.fixture(scope="module")
def flux():
    return tiny_models.make_dit("flux", seed=1)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "StoryDiffusion" in r.getMessage()]


# ---------------------------------------------------------------------------------------------------
# another node takes the slot after ours


def test_a_unet_attn1_replace_set_after_csa_turns_it_off_with_a_warning(csa, sd15, caplog):
    patched = unet_tests.patch(csa, sd15)
    theirs = patched.clone()
    config = patched.model_options["transformer_options"][csa.CONFIG_KEY]

    def plain(q, k, v, extra_options):  # another pack's replace that does not call what it found
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    for layer in config.layers:
        theirs.set_model_attn1_replace(plain, *layer)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        off = unet_tests.ksampler(theirs)
    torch.testing.assert_close(off, unet_tests.ksampler(sd15), atol=1e-6, rtol=0)  # CSA really is off ...
    messages = _warnings(caplog)
    assert len(messages) == 1  # ... and said, once per run
    assert "attn1 replace" in messages[0] and "0 of the" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        unet_tests.ksampler(patched)
    assert not _warnings(caplog)  # a run where CSA is everywhere says nothing

    from comfyui_storydiffusion.attention.bank import IdentityBank

    bank = IdentityBank()
    writer = csa.with_bank(theirs, csa.MODE_WRITE, bank)
    with pytest.raises(ValueError, match=UNREACHED + r".*Nothing was written to the identity bank"):
        unet_tests.ksampler(writer, panels=2)
    assert bank.empty


def test_only_some_unet_layers_lost_is_said_too(csa, sd15, caplog):
    patched = unet_tests.patch(csa, sd15)
    theirs = patched.clone()
    layer = patched.model_options["transformer_options"][csa.CONFIG_KEY].layers[0]
    theirs.set_model_attn1_replace(lambda q, k, v, extra: q, *layer)
    with caplog.at_level(logging.WARNING):
        unet_tests.ksampler(theirs)
    (message,) = _warnings(caplog)
    total = len(patched.model_options["transformer_options"][csa.CONFIG_KEY].layers)
    assert f"ran in {total - 1} of the {total} UNet layers" in message and f"{layer[0]} {layer[1]}" in message


def test_an_override_set_after_csa_on_flux_turns_it_off_with_a_warning(csa, flux, caplog):
    patched = flux_tests.patch(csa, flux)
    theirs = patched.clone()
    theirs.model_options["transformer_options"][csa.OVERRIDE_SLOT] = \
        lambda func, *args, **kwargs: func(*args, **kwargs)  # does not call the override it replaced
    with caplog.at_level(logging.WARNING):
        off = flux_tests.ksampler(theirs)
    torch.testing.assert_close(off, flux_tests.ksampler(flux), atol=1e-6, rtol=0)
    (message,) = _warnings(caplog)
    assert "0 of the 1 Flux.1 layers" in message and "attention override" in message

    from comfyui_storydiffusion.attention.bank import IdentityBank

    with pytest.raises(ValueError, match=UNREACHED):
        flux_tests.ksampler(csa.with_bank(theirs, csa.MODE_WRITE, IdentityBank()), panels=2)


def test_an_overwritten_sd3_block_replace_is_said(csa, models, caplog):
    model = model_of(models, "sd3")
    patched = flux_tests.patch(csa, model, layer_choice="all blocks")
    theirs = patched.clone()
    theirs.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 1)
    with caplog.at_level(logging.WARNING):
        family_ksampler(theirs, "sd3")
    (message,) = _warnings(caplog)
    blocks = len(patched.model_options["transformer_options"][csa.CONFIG_KEY].layers)
    assert f"ran in {blocks - 1} of the {blocks} SD3 layers" in message and "double 1" in message


# ---------------------------------------------------------------------------------------------------
# a listed attention call that never came


def test_a_skipped_lumina_attention_call_is_refused_not_shifted(csa, models):
    """A foreign override that runs one main-layer attention itself (not through the chain it found) shifts every
    later call of a Lumina model call onto the wrong block; the count after the call catches it."""
    model = model_of(models, "lumina")
    dm = model.model.diffusion_model
    first_layer = len(dm.context_refiner) + len(dm.noise_refiner) + 1  # after the caption and noise refiners
    seen = []

    def skips_one(func, q, k, v, heads, *args, **kwargs):
        seen.append(k.shape[2] if kwargs.get("skip_reshape") else k.shape[1])
        if len(seen) == first_layer:
            from comfy.ldm.modules.attention import optimized_attention
            return optimized_attention(q, k, v, heads, *args, **{n: a for n, a in kwargs.items()
                                                                  if n in ("mask", "skip_reshape", "_inside_attn_wrapper")})
        return func(q, k, v, heads, *args, **kwargs)

    patched = flux_tests.patch(csa, model, layer_choice="all blocks")
    theirs = patched.clone()
    inner = patched.model_options["transformer_options"][csa.OVERRIDE_SLOT]
    theirs.model_options["transformer_options"][csa.OVERRIDE_SLOT] = \
        lambda func, *a, **kw: skips_one(lambda *aa, **kk: inner(func, *aa, **kk), *a, **kw)
    with pytest.raises(ValueError, match=r"made \d+ of the \d+ attention calls its blocks make"):
        family_ksampler(theirs, "lumina")


# ---------------------------------------------------------------------------------------------------
# arguments by name, text length from what is known


def test_the_token_layout_binds_arguments_by_name(csa, flux):
    """A ComfyUI that inserts an argument before transformer_options (Qwen-Image's list changed between 0.3.75
    and 0.8.0) still gets its layout: the wrapper binds the model's _forward signature, never a position."""
    from comfyui_storydiffusion.attention.comfy.dit_families import DiTTokenLayout

    def forward(x, timestep, context, y=None, guidance=None, ref_latents=None, control=None, new_arg=None,
                transformer_options=None, **kwargs):
        raise AssertionError("never called")

    seen = {}

    class Executor:
        class_obj = flux.model.diffusion_model

        def __call__(self, *args, **kwargs):
            seen["options"] = inspect.signature(forward).bind(*args, **kwargs).arguments["transformer_options"]
            return "out"

    layout = DiTTokenLayout(csa.FLUX1, inspect.signature(forward))
    options = {csa.CONFIG_KEY: object()}
    x = torch.zeros(2, 16, 8, 6)
    refs = [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 5, 5)]
    assert layout(Executor(), x, None, torch.zeros(2, 7, 4), None, None, refs, None, "new", options) == "out"
    assert seen["options"][csa.TOKENS_KEY] == (4 * 3, 4 + 9)  # image patches, then the padded reference patches
    assert options == {csa.CONFIG_KEY: options[csa.CONFIG_KEY]}  # the caller's dict is untouched
    layout(Executor(), x, None, torch.zeros(2, 7, 4), transformer_options=options)
    assert seen["options"][csa.TOKENS_KEY] == (12, 0)
    with pytest.raises(ValueError, match="arguments its _forward does not take"):
        layout(Executor(), x, None, None, None, None, None, None, None, options, "one too many")


class PrependText:
    """A Flux post_input patch that prepends tokens to the text, as core's USO style reference does."""

    def __init__(self, tokens: int, dim: int):
        g = torch.Generator().manual_seed(7)
        self.extra = torch.randn(1, tokens, dim, generator=g)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, kw):
        txt, txt_ids = kw["txt"], kw["txt_ids"]
        extra = self.extra.to(txt).expand(txt.shape[0], -1, -1)
        ids = torch.zeros(txt_ids.shape[0], extra.shape[1], txt_ids.shape[2], dtype=txt_ids.dtype, device=txt_ids.device)
        return dict(kw, txt=torch.cat([extra, txt], 1), txt_ids=torch.cat([ids, txt_ids], 1))


def test_a_post_input_patch_that_prepends_text_tokens_is_shared_right(csa, flux):
    """With 3 tokens prepended to the text, panels must still share image tokens (not the text's last ones)."""
    prepend = PrependText(3, flux.model.diffusion_model.params.hidden_size)
    styled = flux.clone()
    styled.set_model_post_input_patch(prepend)
    reference = styled.clone()
    reference.model_options["transformer_options"][csa.OVERRIDE_SLOT] = \
        reference_override({("single", 1)}, flux_tests.TEXT + 3, 16)
    expected = flux_tests.ksampler(reference)
    actual = flux_tests.ksampler(flux_tests.patch(csa, styled, rate=1.0))
    assert (expected - flux_tests.ksampler(styled)).abs().max() > 1e-3
    assert_relative(actual, expected, 1e-5)


# ---------------------------------------------------------------------------------------------------
# a read run does its work once


def test_a_read_run_attends_in_one_window_whatever_the_window_size(csa, sd15, monkeypatch):
    """Read panels share nothing with each other (each reads the bank and itself), so sliding windows would only
    repeat the same attention W times: a read run attends in one window, with the same result."""
    from comfyui_storydiffusion.attention import core
    from comfyui_storydiffusion.attention.bank import IdentityBank

    windows = []
    real = core.consistent_attention

    def counting(*args, **kwargs):
        windows.append(kwargs["window"])
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "consistent_attention", counting)
    story = unet_tests.make_story([("Ann",), ("Ann",), ("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    results = []
    for window in (0, 2):
        patched = unet_tests.patch(csa, sd15, story=story, window=window)
        bank = IdentityBank()
        unet_tests.ksampler(csa.with_bank(patched, csa.MODE_WRITE, bank), panels=2, cond_seed=1)
        windows.clear()
        results.append(unet_tests.ksampler(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2), panels=3))
        assert windows and set(windows) == {0}
    assert torch.equal(results[0], results[1])
