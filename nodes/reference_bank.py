"""Node: an identity bank written from reference images of the characters (thin: inputs, validation, a call
into attention/comfy/reference.py)."""
from __future__ import annotations

from ..attention import comfy as csa
from ..attention.bank import KEEP_CHOICES, IdentityBank
from ..common.errors import StoryDiffusionError
from ..common.sockets import BANK_TYPE, CATEGORY, CONSISTENCY_REFERENCES_TYPE, STORY_TYPE


class IdentityBankFromImages:
    DESCRIPTION = ("Writes an identity bank from reference images of your characters (a character sheet, a drawing, "
                   "a photo, an earlier panel) instead of from sampled identity panels: for every step of the schedule "
                   "the reference is noised to that step's level the way the model samples and run once through the "
                   "Consistent Self-Attention model, which stores its tokens. Identity Bank Read then draws any number "
                   "of panels that share tokens with the references. Works on every model the bank supports (SD1.5, "
                   "SDXL, Flux, SD3, Qwen-Image, Lumina 2 / Z-Image, HiDream, Chroma). Use the same steps, sampler, "
                   "scheduler, denoise, cfg and panel size as the KSampler that reads the bank.")
    CATEGORY = f"{CATEGORY}/attention"
    RETURN_TYPES = (BANK_TYPE, "LATENT")
    RETURN_NAMES = ("bank", "references")
    OUTPUT_TOOLTIPS = ("The identity bank, filled: connect it to Identity Bank Read (or Save Identity Bank).",
                       "The reference latents the bank was written from (VAE Decode shows the crops used).")
    FUNCTION = "write"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of 'Consistent Self-Attention (StoryDiffusion)': its layers, "
                                           "rate and schedule decide what is stored, as for Identity Bank Write."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: encodes the reference images."}),
            "references": (CONSISTENCY_REFERENCES_TYPE, {
                "tooltip": "Reference images per character: a chain of 'Story Consistency Reference' nodes (character "
                           "name exactly as in the story + its images). Several images of one character share with "
                           "each other while writing, like identity panels."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt the references are evaluated with: the character's "
                                                     "description (one row for every image, or a batch with one row per "
                                                     "reference image in chain order)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt of the read runs (used when cfg > 1)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Seed of the noise added to the references."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The read KSampler's steps (the bank has one entry per step)."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The read KSampler's cfg: above 1 the negative pass is stored too."}),
            "sampler_name": (csa.sampler_names(), {"tooltip": "The read KSampler's sampler (it decides nothing here but "
                                                              "must match: the schedule comes from it)."}),
            "scheduler": (csa.scheduler_names(), {"tooltip": "The read KSampler's scheduler."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "The read KSampler's denoise."}),
            "width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8,
                              "tooltip": "Width of the panels that read the bank: the references are scaled to cover it "
                                         "and centre-cropped (a read at another size is refused)."}),
            "height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8,
                               "tooltip": "Height of the panels that read the bank."}),
            "storage": (["cpu", "device"], {"default": "cpu", "tooltip": "Where a read keeps the current step's tokens "
                                                                         "(as in Identity Bank Write)."}),
            "dtype": (["fp16", "bf16", "fp32", "fp8"], {"default": "fp16", "tooltip": "Precision of the stored tokens "
                                                                                     "(as in Identity Bank Write)."}),
        }, "optional": {
            "keep": (list(KEEP_CHOICES), {"default": "auto", "tooltip": "Where the bank is kept while written: memory, "
                                                                        "disk, or auto (as in Identity Bank Write)."}),
            "story": (STORY_TYPE, {"tooltip": "The story the bank is read for: each reference's character must be one "
                                              "of its characters."}),
        }}

    def write(self, model, vae, references, positive, negative, seed, steps, cfg, sampler_name, scheduler, denoise,
              width, height, storage, dtype, keep="auto", story=None):
        try:
            bank = IdentityBank(storage=storage, dtype=dtype, keep=keep)
            latent = csa.write_bank_from_images(model, vae, references, positive, negative, seed=seed, steps=steps,
                                                cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                                denoise=denoise, width=width, height=height, bank=bank, story=story)
        except StoryDiffusionError as e:
            raise e.with_traceback(None) from None
        return (bank, {"samples": latent})


NODE_CLASS_MAPPINGS = {"StoryDiffusionIdentityBankFromImages": IdentityBankFromImages}
NODE_DISPLAY_NAME_MAPPINGS = {"StoryDiffusionIdentityBankFromImages": "Identity Bank From Images (StoryDiffusion)"}
