"""The identity bank on DiT models: a write run stores the sampled image keys/values of the identity panels
(after RoPE), a read run of other panels attends to them. Checked against the batch the panels would form:
at the override (exact), and through real KSampler runs on tiny random models of every family against an
independent rate-1 reference in which the story panels read the identity panels one way; plus files, fp8,
and the messages for banks of another model kind, resolution or step count."""
from __future__ import annotations

import pytest
import torch

import test_attention_dit as flux_tests
import tiny_dits
import tiny_models
from test_attention_dit import assert_relative, patch, qkv
from test_attention_dit_families import Reference, model_of

STEPS = 2
# Story: panels 0 and 1 are Ann's identity panels, panel 2 is Ann, panel 3 is [NC].
# In the reference batch the identity panels read each other, panel 2 reads both, nobody reads 2 or 3.
ONE_WAY = [[False, True, False, False], [True, False, False, False], [True, True, False, False], [False] * 4]


@pytest.fixture(scope="module")
def models():
    return {}


def ann_story():
    from comfyui_storydiffusion.story.model import Character, Panel, Story

    chars = [("Ann",), ("Ann",), ("Ann",), ()]
    return Story(characters=(Character("Ann", "Ann description"),),
                 panels=tuple(Panel(f"panel {i}", "", c) for i, c in enumerate(chars)),
                 identity_panels={"Ann": (0, 1)})


def family_model(models, family):
    if family in ("flux", "chroma"):
        if family not in models:
            models[family] = tiny_models.make_dit(family, seed=12)
        return models[family]
    return model_of(models, family)


def family_conds(family, panels):
    return flux_tests.conds(panels) if family in ("flux", "chroma") else tiny_dits.conds(family, panels)


def rows_of(conditioning, rows):
    """The CONDITIONING of some panels of a per-panel CONDITIONING batch."""
    out = []
    for tensor, extra in conditioning:
        extra = {key: (value[rows] if torch.is_tensor(value) and value.shape[0] == tensor.shape[0] else value)
                 for key, value in extra.items()}
        out.append([tensor[rows], extra])
    return out


def sample(model, family, rows, noise):
    import comfy.sample

    positive, negative = family_conds(family, 4)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros_like(noise[rows]))  # Qwen-Image: 5-D
    noise = noise[rows].reshape(latent.shape)
    return comfy.sample.sample(model, noise, STEPS, 3.0, "euler", "normal", rows_of(positive, rows),
                               rows_of(negative, rows), latent, disable_pbar=True, seed=5)


def one_way_reference(family, model):
    """An independent override: rate-1 CSA over the blocks the tiny model's defaults select, share = ONE_WAY."""
    if family in ("flux", "chroma"):
        layers = {("single", 1)}
        return flux_tests.reference_override(layers, flux_tests.TEXT, 16, share_of=lambda panels: ONE_WAY), None
    from test_attention_dit_families import DEFAULTS

    reference = Reference(family, model, DEFAULTS[family])
    reference.share = ONE_WAY
    return reference, reference


@pytest.mark.parametrize("family", ["flux", "chroma", "sd3", "qwen", "lumina", "z_image", "hidream"])
def test_ksampler_bank_write_then_read_equals_the_one_way_batch(csa, models, family):
    from comfyui_storydiffusion.attention.bank import IdentityBank

    model = family_model(models, family)
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(21))
    override, closable = one_way_reference(family, model)
    try:
        with_reference = model.clone()
        with_reference.model_options["transformer_options"]["optimized_attention_override"] = override
        expected = sample(with_reference, family, slice(0, 4), noise)
    finally:
        if closable is not None:
            closable.close()
    patched = patch(csa, model, rate=1.0, story=ann_story())
    bank = IdentityBank(dtype="fp32")
    written = sample(csa.with_bank(patched, csa.MODE_WRITE, bank), family, slice(0, 2), noise)
    assert bank.panels == (0, 1) and bank.content == f"keys_values:{csa.config_of(patched).family}"
    read = sample(csa.with_bank(patched, csa.MODE_READ, bank, rows=(2, 3)), family, slice(2, 4), noise)
    plain = sample(model, family, slice(2, 4), noise)
    assert_relative(written, expected[0:2], 1e-5)
    assert_relative(read, expected[2:4], 1e-5)
    assert (read[0] - plain[0]).abs().max() > 1e-3  # panel 2 read Ann's bank
    torch.testing.assert_close(read[1], plain[1], atol=1e-5, rtol=0)  # [NC] read nothing


def test_override_bank_read_equals_the_batch_at_rate_one_half(csa, models):
    """One attention call, cond and uncond in the order uncond-first: the bank tokens a read panel gets are the
    sampled image keys/values its identity panels had in the write call, at the same sampled indices."""
    from comfyui_storydiffusion.attention import core, dit
    from comfyui_storydiffusion.attention.bank import IdentityBank
    from comfyui_storydiffusion.attention.schedule import layer_ordinal

    flux = family_model(models, "flux")
    patched = patch(csa, flux, rate=0.5, seed=4)
    text, image, kinds, block = 5, 16, [1, 0], ("single", 1)  # a default block of the tiny Flux
    q, k, v = qkv(2 * 3, text + image, seed=3)  # rows: [uncond: id0, id1, p; cond: id0, id1, p]
    ids, story = [0, 1, 3, 4], [2, 5]

    def call(model, rows, make_run):
        from comfy.ldm.modules import attention

        options = dict(model.model_options["transformer_options"])
        config = options[csa.CONFIG_KEY]
        run = csa.start_run(config, len(rows) // 2, [1.0, 0.5, 0.0])
        options.update({csa.RUN_KEY: run, csa.TOKENS_KEY: (image, q.shape[2] - text - image), "block_type": block[0],
                        "block_index": block[1], "cond_or_uncond": kinds, "sigmas": torch.full((len(rows),), 1.0)})
        out = options[csa.OVERRIDE_SLOT](attention.optimized_attention, q[rows], k[rows], v[rows], 2,
                                         skip_reshape=True, transformer_options=options)
        make_run(run)
        return out

    bank = IdentityBank(dtype="fp32")
    call(csa.with_bank(patched, csa.MODE_WRITE, bank), ids, lambda run: run.writer.commit())
    out = call(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2), story, lambda run: None)

    share = torch.tensor(ONE_WAY[:3])[:, :3]
    sampled = core.sample_panel_tokens(image, 0.5, 4, 0, layer_ordinal(("single", 1, 0)), (0, 1, 2))
    expected = dit.joint_consistent_attention(q, k, v, chunks=2, text_tokens=text, image_tokens=image, share=share,
                                              sampled=sampled)
    torch.testing.assert_close(out, expected[story], atol=1e-6, rtol=1e-6)
    plain = dit.sdpa_joint(q[story], k[story], v[story])
    assert (out - plain).abs().max() > 1e-3


def test_bank_file_fp8_and_the_refusals(csa, models, tmp_path):
    from comfyui_storydiffusion.attention.bank import IdentityBank

    flux = family_model(models, "flux")
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(21))
    patched = patch(csa, flux, story=ann_story())
    bank = IdentityBank()
    sample(csa.with_bank(patched, csa.MODE_WRITE, bank), "flux", slice(0, 2), noise)
    reader = csa.with_bank(patched, csa.MODE_READ, bank, rows=(2, 3))
    read = sample(reader, "flux", slice(2, 4), noise)
    assert torch.equal(sample(reader, "flux", slice(2, 4), noise), read)

    path = tmp_path / "ann_flux.safetensors"
    bank.save(str(path))
    loaded = IdentityBank.load(str(path))
    assert loaded.content == "keys_values:Flux.1" and "Flux.1 model (DiT keys and values)" in loaded.describe()
    assert torch.equal(sample(csa.with_bank(patched, csa.MODE_READ, loaded, rows=(2, 3)), "flux", slice(2, 4), noise),
                       read)

    # fp8 with one scale per tensor: half the bytes of fp16, close to the fp16 result
    fp8 = IdentityBank(dtype="fp8")
    sample(csa.with_bank(patched, csa.MODE_WRITE, fp8), "flux", slice(0, 2), noise)
    assert fp8.nbytes() < 0.51 * bank.nbytes()
    read_fp8 = sample(csa.with_bank(patched, csa.MODE_READ, fp8, rows=(2, 3)), "flux", slice(2, 4), noise)
    assert float((read_fp8 - read).abs().max()) < 0.05 * float(read.abs().max())

    # a bank of another kind of model, another resolution, another step count
    with pytest.raises(ValueError, match="written with a Flux.1 model .* cannot be read by a UNet model"):
        sd15 = tiny_models.make_model("sd15", seed=0)
        unet = csa.patch_model(sd15, rate=0.5, rate_high_res=0.5, window=0, layer_choice="all blocks",
                               custom_layers="", start_percent=0.0, end_percent=1.0, official_schedule=False, seed=3)
        csa.start_run(csa.config_of(csa.with_bank(unet, csa.MODE_READ, bank)), 1, bank.sample_sigmas)
    chroma = patch(csa, family_model(models, "chroma"), story=ann_story())
    with pytest.raises(ValueError, match="written with a Flux.1 model .* cannot be read by a Chroma model"):
        csa.start_run(csa.config_of(csa.with_bank(chroma, csa.MODE_READ, bank, rows=(2, 3))), 2, bank.sample_sigmas)
    with pytest.raises(ValueError, match="another resolution"):
        sample(reader, "flux", slice(2, 4), torch.randn(4, 16, 16, 16))
    with pytest.raises(ValueError, match="written with 2 sampling steps, this run has 3"):
        import comfy.sample

        positive, negative = flux_tests.conds(2)
        comfy.sample.sample(reader, noise[2:4], 3, 3.0, "euler", "normal", positive, negative,
                            torch.zeros_like(noise[2:4]), disable_pbar=True, seed=5)


def dual_cfg_flux(model, rows, noise, seed=5):
    """DualCFGGuider on Flux: three chunks per call (cond, middle, negative)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    positive, negative = flux_tests.conds(4)
    middle, _ = flux_tests.conds(4, seed=100)
    guider = Guider_DualCFG(model)
    guider.set_conds(rows_of(positive, rows), rows_of(middle, rows), rows_of(negative, rows))
    guider.set_cfg(3.0, 2.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    return guider.sample(noise[rows], torch.zeros_like(noise[rows]), comfy.samplers.sampler_object("euler"), sigmas,
                         seed=seed)


def test_dual_cfg_guider_on_flux_batch_and_bank(csa, models):
    from comfyui_storydiffusion.attention.bank import IdentityBank

    flux = family_model(models, "flux")
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(21))
    layers = {("single", 1)}
    with_reference = flux.clone()
    with_reference.model_options["transformer_options"]["optimized_attention_override"] = flux_tests.reference_override(
        layers, flux_tests.TEXT, 16, share_of=lambda panels: ONE_WAY)
    expected = dual_cfg_flux(with_reference, slice(0, 4), noise)

    patched = patch(csa, flux, rate=1.0, story=ann_story())
    bank = IdentityBank(dtype="fp32")
    written = dual_cfg_flux(csa.with_bank(patched, csa.MODE_WRITE, bank), slice(0, 2), noise)
    assert {key[2] for key in bank.keys()} == {"negative", "middle", "positive"}
    read = dual_cfg_flux(csa.with_bank(patched, csa.MODE_READ, bank, rows=(2, 3)), slice(2, 4), noise)
    assert_relative(written, expected[0:2], 1e-5)
    assert_relative(read, expected[2:4], 1e-5)
    assert (read[0] - dual_cfg_flux(flux, slice(2, 4), noise)[0]).abs().max() > 1e-3


def test_an_interrupted_write_leaves_no_half_bank_and_the_rerun_matches(csa, models):
    import comfy.model_management
    import comfy.sample

    from comfyui_storydiffusion.attention.bank import IdentityBank

    flux = family_model(models, "flux")
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(21))
    writer = csa.with_bank(patch(csa, flux, story=ann_story()), csa.MODE_WRITE, bank := IdentityBank())
    positive, negative = flux_tests.conds(2)

    def run(callback=None):
        return comfy.sample.sample(writer, noise, STEPS, 3.0, "euler", "normal", positive, negative,
                                   torch.zeros_like(noise), callback=callback, disable_pbar=True, seed=5)

    clean = run()
    complete = {key: bank.entries[key][0].clone() for key in bank.keys()}

    def interrupt(step, *args):
        if step == 1:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(interrupt)  # no half bank: the interrupted rewrite leaves what the finished write committed
    assert set(bank.keys()) == set(complete) and all(torch.equal(bank.entries[k][0], complete[k]) for k in complete)
    assert torch.equal(run(), clean)
    assert set(bank.keys()) == set(complete) and all(torch.equal(bank.entries[k][0], complete[k]) for k in complete)
