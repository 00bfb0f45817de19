"""An identity bank written from reference images of a character instead of from sampled identity panels.

For every step of the schedule the read runs will use, each reference latent is noised to that step's sigma the
way the model's own sampling defines it (`model_sampling.noise_scaling`: x0 + sigma * noise for EPS / v models,
(1 - sigma) * x0 + sigma * noise for flow models) and evaluated once through the CSA-patched model in write mode;
the bank stores what it stores for identity panels. This is "reference-only" put on the bank: a read panel attends
to the noised reference's own tokens at its own noise level, on every family the bank supports.

The loop is a ComfyUI `Sampler`, run by comfy.sample.sample_custom: conds, CFG, wrappers (ours included), model
management, progress and interrupt behave as in any KSampler run. The sampler never integrates: the latent is
forced to the noised reference before each evaluation — what ComfyUI's own inpainting does to the unmasked part
of a latent (KSamplerX0Inpaint), here for the whole picture."""
from __future__ import annotations

import dataclasses

import torch

from ...common.errors import StoryDiffusionError
from ..bank import IdentityBank
from ..run import MODE_WRITE
from .patch import bank_clone, config_of


class ReferenceError(StoryDiffusionError):
    """The reference images or their settings cannot make an identity bank."""


def reference_sampler():
    """A comfy.samplers.Sampler that evaluates the model once per step on the noised reference latent."""
    import comfy.model_management
    import comfy.samplers

    class ReferenceSampler(comfy.samplers.Sampler):
        @torch.no_grad()  # as k-diffusion's samplers: no autograd graph outside ComfyUI's inference mode either
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            model_sampling = model_wrap.inner_model.model_sampling
            reference = latent_image if latent_image is not None else torch.zeros_like(noise)
            ones = noise.new_ones((noise.shape[0],))
            total = len(sigmas) - 1
            for i in range(total):
                comfy.model_management.throw_exception_if_processing_interrupted()
                sigma = sigmas[i] * ones
                x = model_sampling.noise_scaling(sigma, noise, reference)
                denoised = model_wrap(x, sigma, **extra_args)
                if callback is not None:
                    callback(i, denoised, x, total)
            return reference

    return ReferenceSampler()


def prepare_references(references, width: int, height: int) -> tuple[torch.Tensor, tuple]:
    """The reference images as one IMAGE batch at the read panels' size (scaled to cover, centre-cropped) and the
    character of each row."""
    import comfy.utils

    if width % 8 or height % 8:
        raise ReferenceError(f"width and height must be multiples of 8 (the panels' size): got {width}x{height}")
    if not references:
        raise ReferenceError("Identity Bank From Images needs reference images: connect a chain of character "
                             "reference nodes (one per character) to 'references'")
    images, characters = [], []
    for reference in references:
        batch = reference.images
        if batch is None or batch.ndim != 4 or batch.shape[0] == 0:
            raise ReferenceError(f"the reference of {reference.character!r} has no image: connect at least one")
        pixels = comfy.utils.common_upscale(batch[..., :3].movedim(-1, 1), width, height, "bilinear", "center")
        images.append(pixels.movedim(1, -1))
        characters.extend([(reference.character,)] * batch.shape[0])
    return torch.cat(images), tuple(characters)


def check_characters(characters, story) -> None:
    if story is None:
        return
    known = {c.name for c in story.characters}
    unknown = sorted({name for chars in characters for name in chars} - known)
    if unknown:
        raise ReferenceError(f"reference character(s) {unknown} are not in the story (its characters: {sorted(known)}): "
                             "name each reference exactly as the story's [Name]")


def with_reference_write(model, bank: IdentityBank, characters: tuple):
    """A clone of a CSA-patched model that writes `bank` from one latent row per reference image; rows of the same
    character share with each other (like identity panels), and the bank records each row's character."""
    config = config_of(model)
    return bank_clone(model, dataclasses.replace(config, mode=MODE_WRITE, bank=bank, panel_characters=characters,
                                                 identity_rows=None, first_panel=0, read_rows=None))


def write_bank_from_images(model, vae, references, positive, negative, *, seed: int, steps: int, cfg: float,
                           sampler_name: str, scheduler: str, denoise: float, width: int, height: int,
                           bank: IdentityBank, story=None) -> torch.Tensor:
    """Write `bank` from the reference images; returns the reference latents (what the bank was written from)."""
    images, characters = prepare_references(references, width, height)
    check_characters(characters, story)
    latent = vae.encode(images)
    write_bank_from_latents(model, latent, characters, positive, negative, seed=seed, steps=steps, cfg=cfg,
                            sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, bank=bank)
    return latent


def write_bank_from_latents(model, latent: torch.Tensor, characters: tuple, positive, negative, *, seed: int,
                            steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float,
                            bank: IdentityBank) -> None:
    """Write `bank` from reference latents (one row per reference image, `characters` of each row)."""
    import comfy.sample
    import comfy.samplers
    import latent_preview

    if sampler_name not in comfy.samplers.KSampler.SAMPLERS or scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ReferenceError(f"unknown sampler {sampler_name!r} or scheduler {scheduler!r}")
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    writer = with_reference_write(model, bank, tuple(characters))
    # the read runs' sigmas exactly as KSampler computes them (sampler, scheduler, steps, denoise)
    sigmas = comfy.samplers.KSampler(writer, steps=steps, device=writer.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=writer.model_options).sigmas
    noise = comfy.sample.prepare_noise(latent, seed)
    callback = latent_preview.prepare_callback(writer, len(sigmas) - 1)
    comfy.sample.sample_custom(writer, noise, cfg, reference_sampler(), sigmas, positive, negative, latent,
                               callback=callback, disable_pbar=True, seed=seed)


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)
