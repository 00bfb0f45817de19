"""Identity Bank From Images: a bank written from a reference image R, then read by panel P, equals a batch [R, P]
sampled by a real KSampler in which R's latent is forced to the noised reference at every step (ComfyUI's own
inpainting mask does exactly that) and P attends one way to R's sampled tokens — on a UNet (EPS noising) and on
Flux (flow noising), at rate 1 and 0.5. Plus the node end to end and its messages."""
from __future__ import annotations

import pytest
import torch

import test_attention_comfy as unet_tests
import test_attention_dit as flux_tests
import tiny_models
from test_attention_dit import assert_relative

STEPS = 3
ONE_WAY = [[False, False], [True, False]]  # P (row 1) reads R (row 0); R reads nothing


@pytest.fixture(scope="module")
def sd15():
    return unet_tests.make_sd15()


@pytest.fixture(scope="module")
def flux():
    return tiny_models.make_dit("flux", seed=1)


def rows_of(conditioning, rows):
    return [[tensor[rows], {k: (v[rows] if torch.is_tensor(v) and v.shape[:1] == tensor.shape[:1] else v)
                            for k, v in extra.items()}] for tensor, extra in conditioning]


def sample(model, positive, negative, latent, noise, mask=None, cfg=4.0):
    import comfy.sample

    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal", positive, negative, latent,
                               noise_mask=mask, disable_pbar=True, seed=5)


def forced_batch(model, conds, reference, noise, cfg):
    """[R, P] in one KSampler run, R's latent forced to the noised reference before every evaluation."""
    positive, negative = conds
    latent = torch.cat([reference, torch.zeros_like(reference)])
    mask = torch.ones(2, 1, *reference.shape[-2:])
    mask[0] = 0.0  # R keeps (the noised) reference: KSamplerX0Inpaint puts it back before each evaluation
    return sample(model, positive, negative, latent, noise, mask, cfg)


def bank_then_read(csa, patched, conds, reference, noise, cfg):
    from comfyui_storydiffusion.attention.bank import IdentityBank
    from comfyui_storydiffusion.attention.comfy.reference import write_bank_from_latents

    positive, negative = conds
    bank = IdentityBank(dtype="fp32")
    write_bank_from_latents(patched, reference, (("Ann",),), rows_of(positive, slice(0, 1)),
                            rows_of(negative, slice(0, 1)), seed=5, steps=STEPS, cfg=cfg, sampler_name="euler",
                            scheduler="normal", denoise=1.0, bank=bank)
    assert bank.characters == (("Ann",),) and {step for step, _, _ in bank.keys()} == set(range(STEPS))
    reader = csa.with_bank(patched, csa.MODE_READ, bank, first_panel=1)
    return sample(reader, rows_of(positive, slice(1, 2)), rows_of(negative, slice(1, 2)),
                  torch.zeros_like(reference), noise[1:2], cfg=cfg)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_unet_reference_bank_equals_the_forced_batch(csa, sd15, monkeypatch, rate):
    import comfy.sample

    from comfyui_storydiffusion.attention import run as run_module

    story = unet_tests.make_story([("Ann",), ("Ann",)])
    patched = unet_tests.patch(csa, sd15, story=story, rate=rate, rate_high_res=rate)
    reference = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 8, 8), 5)
    conds = unet_tests.conds("sd15", 2, seed=4)
    read = bank_then_read(csa, patched, conds, reference, noise, 4.0)
    with monkeypatch.context() as m:
        m.setattr(run_module.CSAConfig, "share_for", lambda self, rows: torch.tensor(ONE_WAY))
        expected = forced_batch(patched, conds, reference, noise, 4.0)
    plain = sample(sd15, rows_of(conds[0], slice(1, 2)), rows_of(conds[1], slice(1, 2)),
                   torch.zeros_like(reference), noise[1:2])
    assert (expected[1] - plain[0]).abs().max() > 1e-3  # the reference really steers P
    assert_relative(read[0], expected[1], 1e-5)
    forced = forced_batch(sd15, conds, reference, noise, 4.0)  # and the forced row stays the reference
    torch.testing.assert_close(forced[0], reference[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_flux_reference_bank_equals_the_forced_batch(csa, flux, monkeypatch, rate):
    """Flux samples by flow matching: the reference is noised as (1 - sigma) x0 + sigma noise, its own way."""
    import comfy.sample

    from comfyui_storydiffusion.attention import run as run_module

    story = flux_tests.make_story([("Ann",), ("Ann",)])
    patched = flux_tests.patch(csa, flux, story=story, rate=rate)
    reference = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = comfy.sample.prepare_noise(torch.zeros(2, 16, 8, 8), 5)
    conds = flux_tests.conds(2, seed=4)
    read = bank_then_read(csa, patched, conds, reference, noise, 1.0)
    if rate == 1.0:  # an independent override: rate-1 joint attention, P reads all of R's image tokens
        expected_model = flux.clone()
        expected_model.model_options["transformer_options"][csa.OVERRIDE_SLOT] = flux_tests.reference_override(
            {("single", 1)}, flux_tests.TEXT, 16, share_of=lambda panels: ONE_WAY)
        expected = forced_batch(expected_model, conds, reference, noise, 1.0)
    else:
        with monkeypatch.context() as m:
            m.setattr(run_module.CSAConfig, "share_for", lambda self, rows: torch.tensor(ONE_WAY))
            expected = forced_batch(patched, conds, reference, noise, 1.0)
    plain = sample(flux, rows_of(conds[0], slice(1, 2)), rows_of(conds[1], slice(1, 2)),
                   torch.zeros_like(reference), noise[1:2], cfg=1.0)
    assert (expected[1] - plain[0]).abs().max() > 1e-3
    assert_relative(read[0], expected[1], 1e-5)


# ---------------------------------------------------------------------------------------------------
# the node


@pytest.fixture(scope="module")
def vae():
    return tiny_models.make_vae(seed=2)


def references(*pairs):
    from comfyui_storydiffusion.consistency.score import CharacterReference

    return tuple(CharacterReference(name, images) for name, images in pairs)


def run_node(comfy_nodes, model, vae, refs, story=None, width=64, height=64, **kw):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionIdentityBankFromImages"]()
    positive, negative = unet_tests.conds("sd15", 1, seed=4)
    args = dict(seed=5, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                width=width, height=height, storage="cpu", dtype="fp16")
    args.update(kw)
    return node.write(model, vae, refs, positive, negative, story=story, **args)


def test_the_node_writes_a_bank_that_story_panels_read(csa, comfy_nodes, sd15, vae):
    story = unet_tests.make_story([("Ann",), ("Bob",), ("Ann",), ()])
    patched = unet_tests.patch(csa, sd15, story=story)
    g = torch.Generator().manual_seed(0)
    ann = torch.rand(2, 96, 80, 3, generator=g)  # two views, another size than the panels: scaled and cropped
    bob = torch.rand(1, 64, 64, 3, generator=g)
    bank, latent = run_node(comfy_nodes, patched, vae, references(("Ann", ann), ("Bob", bob)), story=story)
    assert latent["samples"].shape == (3, 4, 8, 8)
    assert bank.characters == (("Ann",), ("Ann",), ("Bob",))
    reader = csa.with_bank(patched, csa.MODE_READ, bank, rows=(2, 3))
    read = unet_tests.ksampler(reader, panels=2, steps=STEPS)
    plain = unet_tests.ksampler(sd15, panels=2, steps=STEPS)
    assert (read[0] - plain[0]).abs().max() > 1e-3  # Ann's panel read her references
    torch.testing.assert_close(read[1], plain[1], atol=1e-5, rtol=0)  # [NC] read nothing
    with pytest.raises(ValueError, match="another resolution"):
        unet_tests.ksampler(reader, panels=2, steps=STEPS, size=16)
    with pytest.raises(ValueError, match="written with 3 sampling steps, this run has 2"):
        unet_tests.ksampler(reader, panels=2, steps=2)


def test_the_node_says_what_is_wrong(csa, comfy_nodes, sd15, vae):
    story = unet_tests.make_story([("Ann",), ("Ann",)])
    patched = unet_tests.patch(csa, sd15, story=story)
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"\['Zoe'\] are not in the story"):
        run_node(comfy_nodes, patched, vae, references(("Zoe", image)), story=story)
    with pytest.raises(ValueError, match="has no image"):
        run_node(comfy_nodes, patched, vae, references(("Ann", torch.zeros(0, 64, 64, 3))), story=story)
    with pytest.raises(ValueError, match="needs reference images"):
        run_node(comfy_nodes, patched, vae, (), story=story)
    with pytest.raises(ValueError, match="multiples of 8"):
        run_node(comfy_nodes, patched, vae, references(("Ann", image)), width=60)
    with pytest.raises(ValueError, match="no Consistent Self-Attention"):
        run_node(comfy_nodes, sd15, vae, references(("Ann", image)))
