"""Nodes for Consistent Self-Attention and the identity bank (thin: inputs, validation, calls into attention/)."""
from __future__ import annotations

from ..attention import comfy as csa
from ..attention import schedule as csa_schedule
from ..attention.bank import KEEP_CHOICES, IdentityBank
from ..common.errors import StoryDiffusionError
from ..common.sockets import BANK_TYPE, CATEGORY, PANELS_TYPE, STORY_TYPE

SUBCATEGORY = f"{CATEGORY}/attention"

def _user_error(e: Exception) -> Exception:
    """Our own validation errors reach the user with their message and a short traceback; the pack's
    own types keep their name (StoryDiffusion.BankError...), anything else becomes a ValueError."""
    if isinstance(e, StoryDiffusionError):
        return e.with_traceback(None)
    return ValueError(str(e))


class ConsistentSelfAttention:
    DESCRIPTION = ("Patches a clone of the MODEL so the self-attention of every panel in a latent batch also reads tokens "
                   "sampled from the other panels (StoryDiffusion's Consistent Self-Attention): a KSampler with N latents "
                   "and N prompts then draws the same character in every panel. The input MODEL is not changed. On DiTs (Flux.1, "
                   "Flux.2, Chroma, SD3/SD3.5, Qwen-Image, Lumina 2/Z-Image, HiDream I1) each panel's joint attention "
                   "also reads sampled image tokens of the other panels; text and reference-image tokens are never shared.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched clone of the input MODEL; connect it to the KSampler that draws the panels.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        s = csa_schedule
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5, SD2 or SDXL UNet, or a DiT: Flux.1 (dev, schnell, "
                                               "Kontext), Flux.2, Chroma, SD3/SD3.5, Qwen-Image (and Edit), Lumina 2, "
                                               "Z-Image or HiDream I1. It is cloned, never modified."}),
                "rate": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Share of each panel's tokens the other panels read (paper: 0.5). "
                                              "0 turns sharing off; higher = more consistent, less varied, slower."}),
                "rate_high_res": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Rate for the highest-resolution attention layers (official sa64 at "
                                                       "SDXL 1024px; 'rate' is sa32). Lower it to save memory/time on big images. "
                                                       "Ignored on DiT models: every block uses 'rate'."}),
                "window_size": ("INT", {"default": 0, "min": 0, "max": 256,
                                        "tooltip": "0: every panel reads all panels of the batch. W>0 smaller than the batch: "
                                                   "sliding windows of W consecutive panels, output averaged over the windows "
                                                   "(the paper's long-story mode); extra memory depends on W, not on the batch."}),
                "layers": (list(s.LAYER_CHOICES), {"default": s.LAYERS_OUTPUT,
                                                   "tooltip": "Which self-attention layers share: the up/output blocks only "
                                                              "(official), all blocks, or the custom list below. On a DiT "
                                                              "'official' means each family's default: Flux.1/Chroma "
                                                              "single 11-37 (Story2Board; CharaConsist shares only in "
                                                              "single blocks), HiDream I1 single 16-31, SD3.5 Large "
                                                              "double 19-37, Qwen-Image double 30-59, Z-Image single "
                                                              "15-29 (the later half of the stack)."}),
                "custom_layers": ("STRING", {"default": "output 3-11", "multiline": False,
                                             "tooltip": "Used when layers is 'custom list': comma-separated entries like "
                                                        "'output 3-11', 'middle', 'input 7', 'output 0.1' (block.index in an "
                                                        "SDXL stack). SD1.5: input 1,2,4,5,7,8, middle, output 3-11; SDXL: "
                                                        "input 4,5,7,8, middle, output 0-5. DiTs: 'single 11-37' or "
                                                        "'double 10-18, single 0-37' (Flux.1 has double 0-18, single "
                                                        "0-37; Lumina 2/Z-Image layers are 'single'). Shown only when "
                                                        "layers is 'custom list'."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Sharing starts at this fraction of the sampling (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Sharing stops after this fraction of the sampling (1 = last step)."}),
                "schedule": (list(s.SCHEDULE_CHOICES), {"default": s.SCHEDULE_EVERY_STEP,
                                                        "tooltip": "'every step': share at every step in the range. 'official "
                                                                   "random': as the released code — plain attention at step 0, "
                                                                   "then each layer shares with probability 0.7 (0.9 from step 20), "
                                                                   "a coin drawn from the seed."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the token sampling (and of the official schedule's coin). The same "
                                            "seed gives bit-identical results."}),
            },
            "optional": {
                "story": (STORY_TYPE, {"tooltip": "Optional story: a panel only shares with panels showing one of its "
                                                  "characters; [NC] panels share nothing. Without it all panels are one "
                                                  "group. The latent batch must have one latent per story panel."}),
                "attention_memory_budget": ("INT", {
                    "default": -1, "min": -1, "max": 1 << 20,
                    "tooltip": "Extra memory (MiB) one attention call may take for the panels' longer keys/values. "
                               "More = several panels per attention call (faster on a GPU, more memory); 0 = one "
                               "panel at a time (the least memory); -1 = automatic: a quarter of the free GPU memory "
                               "at the start of each run, one panel at a time on the CPU (fastest there). The "
                               "images are the same up to float rounding."}),
            },
        }

    def patch(self, model, rate, rate_high_res, window_size, layers, custom_layers, start_percent, end_percent,
              schedule, seed, story=None, attention_memory_budget=-1):
        try:
            patched = csa.patch_model(model, rate=rate, rate_high_res=rate_high_res, window=window_size,
                                                layer_choice=layers, custom_layers=custom_layers,
                                                start_percent=start_percent, end_percent=end_percent,
                                                official_schedule=schedule == csa_schedule.SCHEDULE_OFFICIAL, seed=seed, story=story,
                                                memory_budget_mib=attention_memory_budget)
        except ValueError as e:
            raise _user_error(e) from None
        return (patched,)


class IdentityBankWrite:
    DESCRIPTION = ("Makes the next KSampler run of this MODEL (on the identity panels, batched together) record the tokens "
                   "they share into an identity bank, step by step and layer by layer. Later runs read the bank with "
                   "'Identity Bank Read', so any number of story panels costs the memory of the identity batch plus one panel. "
                   "A bank too big for the free memory is kept on disk (keep: auto), one step in memory at a time.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ("MODEL", BANK_TYPE)
    RETURN_NAMES = ("model", "bank")
    OUTPUT_TOOLTIPS = ("The model to sample the identity panels with (it fills the bank).",
                       "The identity bank; filled when a KSampler runs the model output.")
    FUNCTION = "write"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of 'Consistent Self-Attention (StoryDiffusion)' (its settings "
                                           "and story decide the identity panels and what is stored)."}),
            "storage": (["cpu", "device"], {"default": "cpu",
                                            "tooltip": "Where a read keeps the current step's tokens: CPU memory (moved to "
                                                       "the GPU layer by layer) or the sampling device (one step at a time, "
                                                       "never the whole bank). The bank itself is kept in CPU memory or on disk (keep)."}),
            "dtype": (["fp16", "bf16", "fp32", "fp8"], {"default": "fp16",
                                                        "tooltip": "Precision of the stored tokens (UNets: hidden states; "
                                                                   "DiTs: keys and values, twice the bytes). fp16: what the "
                                                                   "official code stores; fp8: half of that (e4m3: within "
                                                                   "6.25% of a value from 2^-6 = 0.016 up, within 0.001 "
                                                                   "below; DiT tokens with one scale per tensor); "
                                                                   "fp32: exact."}),
        }, "optional": {
            "keep": (list(KEEP_CHOICES), {"default": "auto",
                                          "tooltip": "Where the write run keeps the bank. auto: in memory when it fits "
                                                     "(80% of the free RAM, known after the first step), else on disk. "
                                                     "memory: in RAM (a run that would not fit stops after its first step "
                                                     "and says what to change). disk: one file per step in ComfyUI's temp "
                                                     "folder, one step in RAM (DiT banks are ~1 GB per image per step); "
                                                     "ComfyUI empties that folder when it starts: Save Identity Bank "
                                                     "keeps a bank."}),
        }}

    def write(self, model, storage, dtype, keep="auto"):
        try:
            bank = IdentityBank(storage=storage, dtype=dtype, keep=keep)
            return (csa.with_bank(model, csa.MODE_WRITE, bank), bank)
        except ValueError as e:
            raise _user_error(e) from None


class IdentityBankRead:
    DESCRIPTION = ("Makes this MODEL's panels attend to the identity bank tokens of their characters plus their own "
                   "tokens, so panels generated one (or a few) at a time keep the identity panels' characters.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model to sample the story panels with.",)
    FUNCTION = "read"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of 'Consistent Self-Attention (StoryDiffusion)' (same settings "
                                           "as the identity run)."}),
            "bank": (BANK_TYPE, {"tooltip": "From 'Identity Bank Write' (after its KSampler ran) or 'Load Identity Bank'."}),
            "first_panel": ("INT", {"default": 0, "min": 0, "max": 100000,
                                    "tooltip": "Story panel index (0-based) of the first latent of the batch this model "
                                               "samples; the next latents are the following panels."}),
        }, "optional": {
            "after": ("LATENT", {"tooltip": "Connect the LATENT output of the identity KSampler here so ComfyUI runs the "
                                            "identity run (which fills the bank) first. Not needed with a loaded bank."}),
            "panels": (PANELS_TYPE, {"tooltip": "The 'panels' output of Select Story Panels: the story panel of every "
                                                "latent of this batch (e.g. panels 2 and 5). Overrides first_panel."}),
        }}

    def read(self, model, bank, first_panel, after=None, panels=None):
        if bank.empty:
            raise ValueError("the identity bank is empty: connect the LATENT output of the KSampler that samples the "
                             "'Identity Bank Write' model to the 'after' input, or load a saved bank")
        try:
            rows = None if panels is None else panels.rows
            return (csa.with_bank(model, csa.MODE_READ, bank, first_panel, rows=rows),)
        except ValueError as e:
            raise _user_error(e) from None


class SaveIdentityBank:
    DESCRIPTION = ("Saves an identity bank as .safetensors into models/storydiffusion, where 'Load Identity Bank' "
                   "lists it (press R in the UI to refresh the list): the characters can be reused in another session.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "bank": (BANK_TYPE, {"tooltip": "The bank to save (filled by its identity run)."}),
            "filename_prefix": ("STRING", {"default": "storydiffusion/bank",
                                           "tooltip": "File name prefix inside models/storydiffusion (may contain "
                                                      "subfolders); a counter is appended, nothing is overwritten."}),
        }, "optional": {
            "after": ("LATENT", {"tooltip": "Connect the LATENT output of the identity KSampler so the bank is filled "
                                            "before it is saved."}),
        }}

    def save(self, bank, filename_prefix, after=None):
        try:
            name = csa.save_bank_file(bank, filename_prefix)
        except ValueError as e:
            raise _user_error(e) from None
        return {"ui": {"text": [name]}}


class LoadIdentityBank:
    DESCRIPTION = "Loads an identity bank saved with 'Save Identity Bank' from the models/storydiffusion folder."
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = (BANK_TYPE,)
    RETURN_NAMES = ("bank",)
    OUTPUT_TOOLTIPS = ("The identity bank, for 'Identity Bank Read'.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "bank_name": (csa.list_bank_files(), {
                "tooltip": "An identity bank in models/storydiffusion, as 'Save Identity Bank' writes it. Only "
                           ".safetensors banks are listed (motion predictors in the same folder are not)."}),
            "storage": (["cpu", "device"], {"default": "cpu",
                                            "tooltip": "The file is read one step at a time during a read; keep that "
                                                       "step's tokens in CPU memory or on the sampling device."}),
        }}

    def load(self, bank_name, storage):
        try:
            return (csa.load_bank_file(bank_name, storage),)
        except ValueError as e:
            raise _user_error(e) from None


NODE_CLASS_MAPPINGS = {
    "StoryDiffusionConsistentSelfAttention": ConsistentSelfAttention,
    "StoryDiffusionIdentityBankWrite": IdentityBankWrite,
    "StoryDiffusionIdentityBankRead": IdentityBankRead,
    "StoryDiffusionSaveIdentityBank": SaveIdentityBank,
    "StoryDiffusionLoadIdentityBank": LoadIdentityBank,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StoryDiffusionConsistentSelfAttention": "Consistent Self-Attention (StoryDiffusion)",
    "StoryDiffusionIdentityBankWrite": "Identity Bank Write (StoryDiffusion)",
    "StoryDiffusionIdentityBankRead": "Identity Bank Read (StoryDiffusion)",
    "StoryDiffusionSaveIdentityBank": "Save Identity Bank (StoryDiffusion)",
    "StoryDiffusionLoadIdentityBank": "Load Identity Bank (StoryDiffusion)",
}
