"""The one module of attention/ that speaks ComfyUI: Consistent Self-Attention on a MODEL clone.

`patch_model` clones a MODEL and installs an attn1 *replace* on the selected transformer blocks of
its UNet. ComfyUI hands the replace q/k/v already projected, for all rows of one model call
(chunks of B panels, in the order of `cond_or_uncond`); the replace maps rows to story panels,
samples tokens, and calls attention/core.py with ComfyUI's own attention kernel.

What lives where:
- `CSAConfig` (immutable, in transformer_options[CONFIG_KEY]): the node's settings, the story, the
  bank and its mode. Shared, never copied, by ModelPatcher.clone().
- `RunState` (in the per-run copy of transformer_options[RUN_KEY]): created by an OUTER_SAMPLE
  wrapper at the start of each sampling run and dropped at its end — so an interrupted run leaves
  nothing behind — and it commits a bank write only when the run completes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..common import comfy_adapter as glue
from . import core
from .bank import BankError, IdentityBank, looks_like_bank_file
from .schedule import Schedule, layer_ordinal, select_layers, step_index

CONFIG_KEY = "storydiffusion_csa"
RUN_KEY = "storydiffusion_csa_run"
WRAPPER_KEY = "storydiffusion_csa"
BANK_FOLDER = "storydiffusion"  # shared with motion predictors: each loader lists only its own files
BANK_EXTENSIONS = (".safetensors",)

MODE_BATCH, MODE_WRITE, MODE_READ = "batch", "write", "read"


class PatchError(ValueError):
    """The model cannot be patched, or the patched model does not fit this run."""


# ---------------------------------------------------------------------------------------------------
# the UNet's transformer blocks


def unet_layers(model_patcher) -> tuple[list, set]:
    """All attn1 layer keys (kind, block, index) of the UNet, and those at its highest resolution.

    Raises PatchError for models whose self-attention is not reached by attn1 patches (DiTs).
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

    unet = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        name = type(unet).__name__ if unet is not None else type(model_patcher).__name__
        raise PatchError(f"Consistent Self-Attention works on UNet models (SD1.5, SD2, SDXL); this MODEL is a "
                         f"{name}, whose attention ComfyUI does not route through attn1 patches. Load an SD1.5/SD2/SDXL checkpoint.")
    layers, depth_of = [], {}

    def visit(kind, block_id, module, depth):
        for sub in module.modules() if module is not None else ():
            if isinstance(sub, SpatialTransformer):
                for index, block in enumerate(sub.transformer_blocks):
                    if getattr(block, "disable_self_attn", False):
                        continue  # attn1 is a cross-attention there
                    key = (kind, block_id, index)
                    layers.append(key)
                    depth_of[key] = depth

    depth = 0
    for block_id, module in enumerate(unet.input_blocks):
        visit("input", block_id, module, depth)
        depth += sum(isinstance(m, Downsample) for m in module.modules())
    visit("middle", 0, unet.middle_block, depth)
    for block_id, module in enumerate(unet.output_blocks):
        visit("output", block_id, module, depth)
        depth -= sum(isinstance(m, Upsample) for m in module.modules())
    if not layers:
        raise PatchError("this UNet has no self-attention transformer blocks: there is nothing to share between panels")
    shallowest = min(depth_of.values())
    return layers, {key for key, d in depth_of.items() if d == shallowest}


# ---------------------------------------------------------------------------------------------------
# configuration carried by the patched MODEL


@dataclass(frozen=True)
class CSAConfig:
    rate: float
    rate_high_res: float
    window: int
    seed: int
    schedule: Schedule
    layers: tuple
    high_res_layers: frozenset
    panel_characters: Optional[tuple] = None  # characters of every story panel; None: one group
    identity_rows: Optional[tuple] = None  # story panels of the identity batch (write)
    mode: str = MODE_BATCH
    bank: Optional[IdentityBank] = None
    first_panel: int = 0  # story panel of the first latent row (read)

    def __deepcopy__(self, memo):
        return self

    def rows_for(self, batch: int) -> tuple:
        """Story panel index of each latent row; raises if the story and the batch disagree."""
        story_len = None if self.panel_characters is None else len(self.panel_characters)
        if self.mode == MODE_READ:
            rows = tuple(range(self.first_panel, self.first_panel + batch))
            if story_len is not None and rows[-1] >= story_len:
                raise PatchError(f"the read run covers story panels {rows[0]}-{rows[-1]} (first panel {self.first_panel}, "
                                 f"latent batch {batch}) but the story has {story_len} panels: lower first_panel or the batch size")
            return rows
        if self.mode == MODE_WRITE and self.identity_rows:
            if batch != len(self.identity_rows):
                raise PatchError(f"the story names {len(self.identity_rows)} identity panels {list(self.identity_rows)} but "
                                 f"the latent batch has {batch}: set the identity KSampler's batch size to {len(self.identity_rows)}")
            return self.identity_rows
        if story_len is not None and batch != story_len:
            raise PatchError(f"the story has {story_len} panels but the latent batch has {batch}: one latent per panel "
                             f"(set the latent batch size to {story_len}), or generate parts with the identity bank nodes")
        return tuple(range(batch))

    def characters_of(self, rows) -> Optional[list]:
        return None if self.panel_characters is None else [self.panel_characters[r] for r in rows]

    def share_for(self, rows) -> torch.Tensor:
        """share[i, j]: row i reads row j (a common character; all rows when there is no story)."""
        n = len(rows)
        if self.mode == MODE_READ:
            return torch.zeros((n, n), dtype=torch.bool)  # read runs attend to the bank and themselves
        chars = self.characters_of(rows)
        if chars is None:
            return ~torch.eye(n, dtype=torch.bool)
        sets = [set(c) for c in chars]
        return torch.tensor([[i != j and bool(a & b) for j, b in enumerate(sets)] for i, a in enumerate(sets)],
                            dtype=torch.bool).reshape(n, n)


@dataclass
class RunState:
    """What one sampling run needs: its sigmas, its panel rows, its share mask, a bank writer."""
    sample_sigmas: tuple
    rows: tuple
    share: torch.Tensor
    bank_reads: Optional[torch.Tensor] = None
    writer: object = None

    def __deepcopy__(self, memo):
        return self


def start_run(config: CSAConfig, batch: int, sample_sigmas) -> RunState:
    sigmas = tuple(float(s) for s in sample_sigmas)
    rows = config.rows_for(batch)
    run = RunState(sigmas, rows, config.share_for(rows))
    if config.mode == MODE_WRITE:
        run.writer = config.bank.begin_write(rows, config.characters_of(rows), sigmas)
    elif config.mode == MODE_READ:
        config.bank.check_run(sigmas)
        run.bank_reads = config.bank.reads_for(len(rows), config.characters_of(rows))
    return run


def _outer_sample_wrapper(executor, *args, **kwargs):
    """Fresh RunState per sampling run (args: noise, latent, sampler, sigmas, ...); commit or drop the bank write."""
    guider = executor.class_obj
    original = guider.model_options
    config = original.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        return executor(*args, **kwargs)
    noise, sigmas = args[0], args[3]
    run = start_run(config, int(noise.shape[0]), sigmas.flatten().tolist())
    import comfy.model_patcher

    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        output = executor(*args, **kwargs)
        if run.writer is not None:
            run.writer.commit()
            logging.info("StoryDiffusion: %s", config.bank.describe())
        return output
    except BaseException:
        if run.writer is not None:
            config.bank.clear()  # never leave a half-written bank behind
        raise
    finally:
        guider.model_options = original


# ---------------------------------------------------------------------------------------------------
# the attn1 replace


class LayerReplace:
    """attn1 replace for one transformer block: plain attention, or CSA when the config says so."""

    def __init__(self, layer, high_res: bool, inner=None):
        self.layer = layer
        self.high_res = high_res
        self.inner = inner  # an attn1 replace that was there before (used for the plain path)

    def __deepcopy__(self, memo):
        return self

    def plain(self, q, k, v, extra_options):
        if self.inner is not None:
            return self.inner(q, k, v, extra_options)
        return glue.comfy_attention(extra_options)(q, k, v, extra_options["n_heads"])

    def __call__(self, q, k, v, extra_options):
        config: Optional[CSAConfig] = extra_options.get(CONFIG_KEY)
        run: Optional[RunState] = extra_options.get(RUN_KEY)
        if config is None or run is None:  # a model call outside a sampling run (or our wrapper is gone)
            return self.plain(q, k, v, extra_options)
        kinds = list(extra_options.get("cond_or_uncond") or [0])
        chunks = len(kinds)
        batch = q.shape[0] // chunks
        if batch * chunks != q.shape[0] or batch != len(run.rows):
            raise PatchError(f"StoryDiffusion: attention batch {q.shape[0]} does not match {chunks} chunks of "
                             f"{len(run.rows)} panels (another node changed the batch?)")
        sigma = float(extra_options["sigmas"].flatten()[0])
        step = step_index(sigma, run.sample_sigmas)
        rate = config.rate_high_res if self.high_res else config.rate
        tokens = k.shape[1]
        sampled = core.sample_panel_tokens(tokens, rate, config.seed, step, layer_ordinal(self.layer), run.rows)

        if run.writer is not None:
            dim = k.shape[-1]
            index = sampled.to(k.device)[None, :, :, None].expand(chunks, -1, -1, dim)
            run.writer.put(step, self.layer, kinds,
                           torch.gather(k.reshape(chunks, batch, tokens, dim), 2, index),
                           torch.gather(v.reshape(chunks, batch, tokens, dim), 2, index), tokens, k.device)

        if not config.schedule.active(step, sigma, self.layer):
            return self.plain(q, k, v, extra_options)
        bank = None
        if run.bank_reads is not None:
            try:
                bank = config.bank.tokens(step, self.layer, kinds, tokens, run.bank_reads)
            except BankError as e:
                raise BankError(f"StoryDiffusion: {e}") from None
        nothing_shared = sampled.shape[1] == 0 or not bool(run.share.any())
        if nothing_shared and (bank is None or not bool(bank.reads.any())):
            return self.plain(q, k, v, extra_options)
        return core.consistent_attention(q, k, v, extra_options["n_heads"], chunks=chunks, share=run.share,
                                         sampled=sampled, window=config.window, bank=bank,
                                         attention=glue.comfy_attention(extra_options))


# ---------------------------------------------------------------------------------------------------
# public entry points used by the nodes


def patch_model(model, *, rate: float, rate_high_res: float, window: int, layer_choice: str, custom_layers: str,
                start_percent: float, end_percent: float, official_schedule: bool, seed: int, story=None):
    """A clone of `model` with Consistent Self-Attention on the chosen layers (the input is untouched)."""
    import comfy.patcher_extension

    available, high_res = unet_layers(model)
    sigmas = glue.sigma_window(model, start_percent, end_percent)
    layers = select_layers(available, layer_choice, custom_layers)
    schedule = Schedule(window=sigmas, official=official_schedule, seed=int(seed))
    panel_characters = identity_rows = None
    if story is not None:
        panel_characters = tuple(tuple(p.characters) for p in story.panels)
        ids = sorted({int(i) for panels in (story.identity_panels or {}).values() for i in panels})
        identity_rows = tuple(ids) or None
    config = CSAConfig(rate=float(rate), rate_high_res=float(rate_high_res), window=int(window), seed=int(seed),
                       schedule=schedule, layers=tuple(layers), high_res_layers=frozenset(high_res),
                       panel_characters=panel_characters, identity_rows=identity_rows)
    patched = model.clone()
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for layer in layers:
        inner = replaces.get(layer)
        if isinstance(inner, LayerReplace):  # patching an already patched model: replace ours, keep theirs
            inner = inner.inner
        patched.set_model_attn1_replace(LayerReplace(layer, layer in high_res, inner), *layer)
    patched.model_options["transformer_options"][CONFIG_KEY] = config
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    return patched


def config_of(model) -> CSAConfig:
    config = model.model_options.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        raise PatchError("this MODEL has no Consistent Self-Attention: connect the MODEL output of "
                         "'Consistent Self-Attention (StoryDiffusion)' to this node")
    return config


def with_bank(model, mode: str, bank: IdentityBank, first_panel: int = 0):
    """A clone of a CSA-patched model that writes (identity run) or reads (story panels) `bank`."""
    config = config_of(model)
    if mode == MODE_READ and config.panel_characters is not None and first_panel >= len(config.panel_characters):
        raise PatchError(f"first_panel {first_panel} is past the end of the story ({len(config.panel_characters)} panels)")
    patched = model.clone()
    patched.model_options["transformer_options"][CONFIG_KEY] = dataclasses.replace(
        config, mode=mode, bank=bank, first_panel=int(first_panel))
    return patched


# ---------------------------------------------------------------------------------------------------
# bank files


def list_bank_files() -> list[str]:
    return glue.model_files(BANK_FOLDER, BANK_EXTENSIONS, looks_like_bank_file)


def load_bank_file(name: str, storage: str) -> IdentityBank:
    path = glue.model_file_path(BANK_FOLDER, name, BANK_EXTENSIONS)
    if path is None:
        raise BankError(f"identity bank {name!r} is not in the models/{BANK_FOLDER} folder(s): "
                        f"{glue.model_folder(BANK_FOLDER, BANK_EXTENSIONS)}")
    return IdentityBank.load(path, storage=storage)


def save_bank_file(bank: IdentityBank, filename_prefix: str) -> tuple[str, str]:
    """Save to the output folder as <prefix>_00001_.safetensors; returns (subfolder, file name)."""
    import folder_paths

    out = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out)
    file = f"{name}_{counter:05}_.safetensors"
    bank.save(os.path.join(folder, file))
    return subfolder, file
