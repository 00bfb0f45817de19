"""attention/'s ComfyUI glue, one module per feature; the nodes import this public surface only.

    lifecycle.py      per-run state: OUTER_SAMPLE / PREDICT_NOISE wrappers, step counting, bank limits
    unet.py           UNets: the attn1 replace and the identity-bank write tap
    dit_families.py   DiT families: blocks, default blocks, token layout of a model call
    dit_override.py   DiTs: the attention override
    patch.py          patch_model / with_bank: the clones the nodes return
    reference.py      an identity bank written from reference images (a Sampler on the noised reference)
    bank_files.py     identity bank files in models/storydiffusion

The plain run planning they share (CSAConfig, RunState, token arithmetic) is attention/run.py.
"""
from ..run import (
                   CALLS_KEY,
                   CONFIG_KEY,
                   MODE_BATCH,
                   MODE_READ,
                   MODE_WRITE,
                   RUN_KEY,
                   TOKENS_KEY,
                   AttentionCalls,
                   CSAConfig,
                   PatchError,
                   RunState,
)
from .bank_files import BANK_FOLDER, list_bank_files, load_bank_file, save_bank_file
from .dit_families import (
                   CHROMA,
                   FLUX1,
                   FLUX2,
                   HIDREAM,
                   LUMINA2,
                   QWEN_IMAGE,
                   SD3,
                   SUPPORTED_FAMILIES,
                   Z_IMAGE,
                   DiTFamily,
                   dit_family,
                   unsupported_model_error,
)
from .dit_override import OVERRIDE_SLOT, DiTAttentionOverride
from .lifecycle import start_run
from .patch import config_of, patch_model, with_bank
from .reference import ReferenceError, sampler_names, scheduler_names, write_bank_from_images
from .unet import LayerReplace, unet_layers

__all__ = [
    "BANK_FOLDER",
    "CALLS_KEY",
    "CHROMA",
    "CONFIG_KEY",
    "FLUX1",
    "FLUX2",
    "HIDREAM",
    "LUMINA2",
    "MODE_BATCH",
    "MODE_READ",
    "MODE_WRITE",
    "OVERRIDE_SLOT",
    "QWEN_IMAGE",
    "RUN_KEY",
    "SD3",
    "SUPPORTED_FAMILIES",
    "TOKENS_KEY",
    "Z_IMAGE",
    "AttentionCalls",
    "CSAConfig",
    "DiTAttentionOverride",
    "DiTFamily",
    "LayerReplace",
    "PatchError",
    "ReferenceError",
    "RunState",
    "config_of",
    "dit_family",
    "list_bank_files",
    "load_bank_file",
    "patch_model",
    "sampler_names",
    "save_bank_file",
    "scheduler_names",
    "start_run",
    "unet_layers",
    "unsupported_model_error",
    "with_bank",
    "write_bank_from_images",
]
