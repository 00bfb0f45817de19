"""The one module of attention/ that speaks ComfyUI: Consistent Self-Attention on a MODEL clone.

`patch_model` clones a MODEL and installs an attn1 *replace* on the selected transformer blocks of
its UNet. ComfyUI hands the replace q/k/v already projected, for all rows of one model call
(chunks of B panels, in the order of `cond_or_uncond`); the replace maps rows to story panels,
samples tokens, and calls attention/core.py with ComfyUI's own attention kernel.

DiT models (Flux.1, Flux.2, Chroma, SD3 / SD3.5, Qwen-Image, Lumina 2 / Z-Image, HiDream) have no attn1
patches: `patch_model` installs an `optimized_attention_override` instead (chained to the one the MODEL
had) plus a DIFFUSION_MODEL wrapper (SD3: "dit" block replaces) that records, per model call, where the
image tokens of each joint attention sit and which block makes it; the override calls attention/dit.py
for the blocks the config selects (see "DiT models" below).

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
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..common import comfy_adapter as glue
from ..common.errors import StoryDiffusionError
from . import core, dit
from .bank import HIDDEN_STATES, KEYS_VALUES, BankError, IdentityBank, looks_like_bank_file
from .schedule import Schedule, layer_ordinal, select_layers, step_index

CONFIG_KEY = "storydiffusion_csa"
RUN_KEY = "storydiffusion_csa_run"
WRAPPER_KEY = "storydiffusion_csa"
BANK_FOLDER = "storydiffusion"  # shared with motion predictors: each loader lists only its own files
BANK_EXTENSIONS = (".safetensors",)

MODE_BATCH, MODE_WRITE, MODE_READ = "batch", "write", "read"


class PatchError(StoryDiffusionError):
    """The model cannot be patched, or the patched model does not fit this run."""


# ---------------------------------------------------------------------------------------------------
# the UNet's transformer blocks


def unet_layers(model_patcher) -> tuple[list, set, dict]:
    """All attn1 layer keys (kind, block, index) of the UNet, those at its highest resolution, and
    each layer's attn1 module (its to_k/to_v project identity-bank tokens on read).

    Raises PatchError for models whose self-attention is not reached by attn1 patches (DiTs).
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

    unet = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise unsupported_model_error(unet if unet is not None else model_patcher)
    layers, depth_of, modules = [], {}, {}

    def visit(kind, block_id, module, depth):
        for sub in module.modules() if module is not None else ():
            if isinstance(sub, SpatialTransformer):
                for index, block in enumerate(sub.transformer_blocks):
                    if getattr(block, "disable_self_attn", False):
                        continue  # attn1 is a cross-attention there
                    key = (kind, block_id, index)
                    layers.append(key)
                    depth_of[key] = depth
                    modules[key] = block.attn1

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
    return layers, {key for key, d in depth_of.items() if d == shallowest}, modules


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
    read_rows: Optional[tuple] = None  # story panel of every latent row (read), e.g. panels 2 and 5
    attn1: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # layer -> attn1 module
    family: str = "UNet"  # "UNet", or the DiT family the override serves (see DIT_FAMILIES)

    def __deepcopy__(self, memo):
        return self

    def rows_for(self, batch: int) -> tuple:
        """Story panel index of each latent row; raises if the story and the batch disagree."""
        story_len = None if self.panel_characters is None else len(self.panel_characters)
        if self.mode == MODE_READ and self.read_rows is not None:
            if batch != len(self.read_rows):
                raise PatchError(f"the read run was given story panels {list(self.read_rows)} but the latent batch has "
                                 f"{batch}: set the batch size to {len(self.read_rows)} (Select Story Panels' panel_count)")
            return self.read_rows
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

    @property
    def bank_content(self) -> str:
        """What this model's identity bank stores (attention/bank.py): UNet hidden states or DiT keys/values."""
        return HIDDEN_STATES if self.family == "UNet" else KEYS_VALUES + self.family

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
    """What one sampling run needs: its sigmas, panel rows, share mask, chunk roles, a bank writer, and
    how many steps the sampler reported done (so a second-order sampler's call at sigmas[i+1] is step i)."""
    sample_sigmas: tuple
    rows: tuple
    share: torch.Tensor
    roles: tuple = glue.CFG_ROLES
    bank_reads: Optional[torch.Tensor] = None
    writer: object = None
    sampler: str = ""  # the k-diffusion sampler function's name
    reported: int = -1  # the last step the sampler's callback reported (it fires after a step's first evaluation)
    evaluations_since_report: int = 0
    step: Optional[int] = None  # the step of the evaluation in progress (None: decide by sigma)
    sigma: Optional[float] = None  # the sigma of the evaluation in progress (read once, not per layer)

    def __deepcopy__(self, memo):
        return self

    def extra_evaluations(self, i: int) -> int:
        """Evaluations step i makes after its first one at sigmas >= sigmas[i+1]'s that sigma alone cannot place.

        Every k-diffusion sampler reports a step right after its first evaluation. Midpoint methods
        (dpm_2, dpmpp_2s, ...) then evaluate between sigmas[i] and sigmas[i+1], which sigma places
        right; Heun evaluates again at exactly sigmas[i+1], Heun++ also at sigmas[i+2]."""
        last = len(self.sample_sigmas) - 1
        if self.sampler == "sample_heun":
            return 1 if i + 1 < last and self.sample_sigmas[i + 1] > 0 else 0
        if self.sampler == "sample_heunpp2":
            if i + 1 >= last or self.sample_sigmas[i + 1] <= 0:
                return 0
            return 1 if i + 2 >= last or self.sample_sigmas[i + 2] <= 0 else 2
        return 0

    def start_evaluation(self, sigma: float):
        """Called once per model evaluation (PREDICT_NOISE wrapper), before its layer calls."""
        self.sigma = sigma
        if self.reported >= 0:
            self.evaluations_since_report += 1
            if self.evaluations_since_report <= self.extra_evaluations(self.reported):
                self.step = self.reported
                return
        self.step = step_index(sigma, self.sample_sigmas)

    def report(self, i: int):
        self.reported, self.evaluations_since_report = int(i), 0

    def step_of(self, sigma: float) -> int:
        """The step a model call belongs to (a Heun correction at exactly sigmas[i+1] is step i)."""
        return self.step if self.step is not None else step_index(sigma, self.sample_sigmas)

    def sigma_of(self, options: dict) -> float:
        """This call's sigma: the evaluation's, read once by the PREDICT_NOISE wrapper (reading the sigmas tensor
        in every layer would make the CPU wait for the GPU there), else from the call's options."""
        return self.sigma if self.sigma is not None else float(options["sigmas"].flatten()[0])

    def roles_of(self, kinds) -> list:
        return glue.role_names(self.roles, kinds)

    def rows_of_call(self, rows_in_call: int, chunks: int, extra_options: dict) -> tuple:
        """(story panel of each latent row, share mask) for a call with `rows_in_call` attention rows: the
        whole run, or the frames of an AnimateDiff context window; anything else is an error."""
        batch = rows_in_call // chunks
        if batch * chunks == rows_in_call and batch == len(self.rows):
            return self.rows, self.share
        if batch * chunks == rows_in_call:
            return _context_window(self, batch, extra_options)
        raise PatchError(f"StoryDiffusion: attention batch {rows_in_call} does not split into {chunks} chunks of "
                         f"{len(self.rows)} panels (another node changed the batch?)")


# share of the CPU memory (disk space) free when a write run starts that its identity bank may fill (the rest
# stays for the model, the latents and everything else the process holds)
BANK_MEMORY_SHARE = 0.8
BANK_DISK_SHARE = 0.9
BANK_SPILL_FOLDER = "storydiffusion_banks"  # in ComfyUI's temp folder (emptied when ComfyUI starts)


def _bank_spill_parent() -> str:
    """Where a bank kept on disk gets its folder: ComfyUI's temp folder."""
    import folder_paths

    return os.path.join(folder_paths.get_temp_directory(), BANK_SPILL_FOLDER)


def _bank_disk_limit(folder: str) -> Optional[int]:
    """Bytes a bank kept on disk may take: BANK_DISK_SHARE of the free space where `folder` is (or will be)."""
    probe = folder
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        return int(shutil.disk_usage(probe or ".").free * BANK_DISK_SHARE)
    except OSError:
        return None


def _bank_memory_limit() -> Optional[int]:
    """Bytes a write run's bank may take: BANK_MEMORY_SHARE of the free CPU memory as ComfyUI sees it."""
    import comfy.model_management

    try:
        free = comfy.model_management.get_free_memory(torch.device("cpu"))
    except Exception:  # a ComfyUI that cannot tell: no limit, as before
        return None
    return int(free * BANK_MEMORY_SHARE) if free else None


def _planned_steps(config: CSAConfig, sigmas: tuple):
    """layer -> how many steps of this run write it (what the schedule lets a read use), memoised."""
    counts: dict = {}

    def planned(layer) -> int:
        if layer not in counts:
            counts[layer] = sum(1 for i in range(len(sigmas) - 1) if config.schedule.active(i, sigmas[i], layer))
        return counts[layer]
    return planned


def start_run(config: CSAConfig, batch: int, sample_sigmas, roles: tuple = glue.CFG_ROLES) -> RunState:
    sigmas = tuple(float(s) for s in sample_sigmas)
    rows = config.rows_for(batch)
    run = RunState(sigmas, rows, config.share_for(rows), tuple(roles))
    if config.mode == MODE_WRITE:
        spill_parent = _bank_spill_parent()
        run.writer = config.bank.begin_write(rows, config.characters_of(rows), sigmas, config.bank_content,
                                             planned_steps=_planned_steps(config, sigmas),
                                             memory_limit=_bank_memory_limit(), spill_parent=spill_parent,
                                             disk_limit=_bank_disk_limit(spill_parent))
    elif config.mode == MODE_READ:
        config.bank.check_run(sigmas, config.bank_content)
        run.bank_reads = config.bank.reads_for(len(rows), config.characters_of(rows))
    return run


def _outer_sample_wrapper(executor, *args, **kwargs):
    """Fresh RunState per sampling run (args: noise, latent, sampler, sigmas, denoise_mask, callback, ...);
    counts the steps the sampler reports; commits or drops the bank write."""
    guider = executor.class_obj
    original = guider.model_options
    config = original.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        return executor(*args, **kwargs)
    noise, sigmas = args[0], args[3]
    run = start_run(config, int(noise.shape[0]), sigmas.flatten().tolist(), glue.chunk_roles(guider))
    sampler_function = getattr(args[2], "sampler_function", None)
    run.sampler = getattr(sampler_function, "__name__", "")
    args, kwargs = _count_steps(run, args, kwargs)
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
            run.writer.discard()  # never leave a half-written bank (or its step files) behind
            config.bank.clear()
        raise
    finally:
        guider.model_options = original


def _count_steps(run: RunState, args: tuple, kwargs: dict):
    """Wrap the sampler callback (called after each step's first evaluation, with the step index)."""
    position = 5  # outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, ...)
    previous = args[position] if len(args) > position else kwargs.get("callback")

    def callback(step, *rest):
        run.report(step)
        if previous is not None:
            return previous(step, *rest)

    if len(args) > position:
        args = args[:position] + (callback,) + args[position + 1:]
    else:
        kwargs = dict(kwargs, callback=callback)
    return args, kwargs


def _predict_noise_wrapper(executor, *args, **kwargs):
    """PREDICT_NOISE wrapper: tells the run state that a model evaluation starts (args: x, timestep, ...)."""
    run = executor.class_obj.model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is not None:
        run.start_evaluation(float(args[1].flatten()[0]))
    return executor(*args, **kwargs)


class BankWriteTap:
    """attn1 *patch* of a write run: records the sampled hidden states entering attn1 (before to_k/to_v),
    which is what the bank stores; returns its inputs unchanged."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        config: Optional[CSAConfig] = extra_options.get(CONFIG_KEY)
        run: Optional[RunState] = extra_options.get(RUN_KEY)
        block = extra_options.get("block")
        if config is None or run is None or run.writer is None or block is None:
            return n, context, value
        layer = (block[0], block[1], extra_options.get("block_index", 0))
        if layer not in config.attn1:
            return n, context, value
        sigma = run.sigma_of(extra_options)
        step = run.step_of(sigma)
        if not config.schedule.active(step, sigma, layer):
            return n, context, value  # no read will ask for this step and layer
        kinds = list(extra_options.get("cond_or_uncond") or [0])
        chunks, tokens, dim = len(kinds), context.shape[1], context.shape[-1]
        run.rows_of_call(context.shape[0], chunks, extra_options)  # a write needs the whole run in one call
        batch = len(run.rows)
        rate = config.rate_high_res if layer in config.high_res_layers else config.rate
        sampled = core.sample_panel_tokens(tokens, rate, config.seed, step, layer_ordinal(layer), run.rows)
        index = sampled.to(context.device)[None, :, :, None].expand(chunks, -1, -1, dim)
        hidden = torch.gather(context.reshape(chunks, batch, tokens, dim), 2, index)
        run.writer.put(step, layer, run.roles_of(kinds), hidden, tokens)
        return n, context, value


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

    def bank_tokens(self, config: CSAConfig, run: RunState, step: int, kinds, tokens: int, k) -> core.BankTokens:
        """The bank's hidden states for this call, projected by this layer's own to_k/to_v."""
        try:
            hidden = config.bank.stored_tokens(step, self.layer, run.roles_of(kinds), tokens, device=k.device, dtype=k.dtype)
        except BankError as e:
            raise BankError(f"StoryDiffusion: {e}") from None
        attn1 = config.attn1[self.layer]
        hidden = hidden.to(k.device, k.dtype)
        return core.BankTokens(attn1.to_k(hidden), attn1.to_v(hidden), run.bank_reads)

    def __call__(self, q, k, v, extra_options):
        config: Optional[CSAConfig] = extra_options.get(CONFIG_KEY)
        run: Optional[RunState] = extra_options.get(RUN_KEY)
        if config is None or run is None:  # a model call outside a sampling run (or our wrapper is gone)
            return self.plain(q, k, v, extra_options)
        kinds = list(extra_options.get("cond_or_uncond") or [0])
        chunks = len(kinds)
        rows, share = run.rows_of_call(q.shape[0], chunks, extra_options)
        sigma = run.sigma_of(extra_options)
        step = run.step_of(sigma)
        if not config.schedule.active(step, sigma, self.layer):
            return self.plain(q, k, v, extra_options)
        rate = config.rate_high_res if self.high_res else config.rate
        tokens = k.shape[1]
        sampled = core.sample_panel_tokens(tokens, rate, config.seed, step, layer_ordinal(self.layer), rows)
        bank = None
        if run.bank_reads is not None:
            bank = self.bank_tokens(config, run, step, kinds, tokens, k)
        nothing_shared = sampled.shape[1] == 0 or not bool(share.any())
        if nothing_shared and (bank is None or not bool(bank.reads.any())):
            return self.plain(q, k, v, extra_options)
        return core.consistent_attention(q, k, v, extra_options["n_heads"], chunks=chunks, share=share,
                                         sampled=sampled, window=config.window, bank=bank,
                                         attention=glue.comfy_attention(extra_options))


def _context_window(run: RunState, batch: int, extra_options: dict) -> tuple:
    """AnimateDiff-Evolved context windows: the call holds `batch` of the run's frames, whose absolute
    indices ADE gives in ad_params["sub_idxs"]; frames share with the frames of their window."""
    sub_idxs = (extra_options.get("ad_params") or {}).get("sub_idxs")
    if sub_idxs is None or len(sub_idxs) != batch or max(sub_idxs) >= len(run.rows):
        raise PatchError(f"StoryDiffusion: the attention call holds {batch} latents but the run has {len(run.rows)} "
                         "panels, and no AnimateDiff context window says which: another node changed the batch?")
    if run.writer is not None or run.bank_reads is not None:
        raise PatchError("StoryDiffusion: the identity bank needs every panel in one model call; it does not work "
                         "under AnimateDiff context windows (use context_length >= the frame count, or no bank)")
    index = torch.as_tensor(list(sub_idxs), dtype=torch.long)
    return tuple(run.rows[i] for i in sub_idxs), run.share[index][:, index]


# ---------------------------------------------------------------------------------------------------
# DiT models: the attention override and the token layout of a model call

OVERRIDE_SLOT = "optimized_attention_override"  # ComfyUI's one override slot (wrap_attn, 0.3.60+)
TOKENS_KEY = "storydiffusion_csa_tokens"  # per model call: (tokens before the image, image tokens) of the joint attention
CALLS_KEY = "storydiffusion_csa_calls"  # per model call (or block): the AttentionCalls of families that name no blocks


class AttentionCalls:
    """The attention calls a model call (or one block) will make, in ComfyUI's code order, for families whose
    blocks do not name themselves in transformer_options (SD3, Lumina 2 / Z-Image, HiDream).

    Each entry: (layer key or None for an attention CSA never touches, tokens before the image tokens,
    image tokens, total tokens of the call). The override takes one entry per call; a call whose token
    count differs from the entry's means another patch added or changed attention calls, and is refused
    rather than guessed."""

    def __init__(self, family: str, calls: list):
        self.family = family
        self.calls = calls
        self.at = 0

    def __deepcopy__(self, memo):
        return self

    def next(self, tokens: int):
        if self.at >= len(self.calls):
            raise PatchError(f"StoryDiffusion: a {self.family} model call made more than the {len(self.calls)} attention "
                             f"calls its blocks make (another patch adds attention?): cannot tell which block this is")
        layer, before, image, expected = self.calls[self.at]
        self.at += 1
        if tokens != expected:
            raise PatchError(f"StoryDiffusion: {self.family} attention call {self.at} attends over {tokens} tokens, not the "
                             f"{expected} its block has (another patch changed the tokens?): cannot place the image tokens")
        return layer, before, image


def _patched_image_tokens(x: torch.Tensor, patch: int) -> int:
    """Image tokens of a latent [.., H, W] cut into patch x patch patches after padding (common_dit.pad_to_patch_size)."""
    h, w = x.shape[-2:]
    return (-(-h // patch)) * (-(-w // patch))


@dataclass(frozen=True)
class DiTFamily:
    """A DiT family whose joint attention the override understands (Flux.1, Flux.2, Chroma: the base class).

    options_position: where the model's `_forward` takes transformer_options among its positional args
    (the DIFFUSION_MODEL wrapper sees them so; None: in kwargs). Default blocks: the later half of the
    network — the double-stream blocks from the middle of the stack on, and every single-stream block — the
    DiT counterpart of the UNet's output blocks, where the official code shares; a starting point, not tuned
    on real weights (use "all blocks" or a custom list such as "double 10-18, single 0-37").

    Flux-like models set transformer_options block_type/block_index themselves and put the text tokens
    first, then the image tokens, then reference-image tokens (never shared)."""
    name: str
    options_position: Optional[int]

    def __deepcopy__(self, memo):
        return self

    def blocks(self, model) -> list:
        return ([("double", i, 0) for i in range(len(model.double_blocks))]
                + [("single", i, 0) for i in range(len(model.single_blocks))])

    def default_blocks(self, model) -> list:
        first_double = (len(model.double_blocks) + 1) // 2  # Flux.1: 19 double blocks -> 10-18
        return [key for key in self.blocks(model) if key[0] == "single" or key[1] >= first_double]

    def call_options(self, model, args, kwargs) -> dict:
        """What the DIFFUSION_MODEL wrapper adds to this model call's transformer_options.
        Flux._forward(x, t, context, ...): text tokens = context's; image tokens = the latent's patches."""
        context = args[2] if len(args) > 2 else kwargs.get("context")
        return {TOKENS_KEY: (int(context.shape[1]), _patched_image_tokens(args[0], int(getattr(model, "patch_size", 2))))}

    def install(self, patched, model):
        """Anything besides the override and the DIFFUSION_MODEL wrapper (SD3: block replaces)."""


@dataclass(frozen=True)
class QwenImageFamily(DiTFamily):
    """Qwen-Image: 60 double-stream blocks (transformer_blocks) that set block_type "double"/block_index
    themselves; joint attention over [text, image, reference latents] like Flux (Attention.forward
    concatenates txt then img; _forward appends ref_latents after the image). Its attention mask is always
    None (the encoder mask is never passed to the kernel). Default: the later half, double 30-59."""

    def blocks(self, model) -> list:
        return [("double", i, 0) for i in range(len(model.transformer_blocks))]

    def default_blocks(self, model) -> list:
        first = len(model.transformer_blocks) // 2
        return [key for key in self.blocks(model) if key[1] >= first]


@dataclass(frozen=True)
class LuminaFamily(DiTFamily):
    """Lumina 2 / Z-Image (NextDiT): the caption refiner (text only) and noise refiner (image only) run first,
    then `layers`, single-stream blocks over [caption (padded to pad_tokens_multiple), image tokens, image
    padding]; the main layers' mask is always None (the caption mask reaches the caption refiner only). The
    blocks name themselves nowhere, so the wrapper lists the attention calls a model call makes, in code
    order: blocks are ("single", i) for layers[i]; the refiners are never shared. Default: the later half of
    `layers` (Lumina 2: single 13-25, Z-Image: single 15-29)."""

    def blocks(self, model) -> list:
        return [("single", i, 0) for i in range(len(model.layers))]

    def default_blocks(self, model) -> list:
        first = len(model.layers) // 2
        return [key for key in self.blocks(model) if key[1] >= first]

    def call_options(self, model, args, kwargs) -> dict:
        x = args[0]
        context = args[2] if len(args) > 2 else kwargs.get("context")
        multiple = getattr(model, "pad_tokens_multiple", None)
        text = int(context.shape[1])
        image = _patched_image_tokens(x, int(model.patch_size))
        if multiple is not None:
            text += (-text) % multiple
            padding = (-image) % multiple
        else:
            padding = 0
        calls = ([(None, 0, 0, text)] * len(model.context_refiner) + [(None, 0, 0, image + padding)] * len(model.noise_refiner)
                 + [(("single", i, 0), text, image, text + image + padding) for i in range(len(model.layers))])
        return {CALLS_KEY: AttentionCalls(self.name, calls)}


@dataclass(frozen=True)
class HiDreamFamily(DiTFamily):
    """HiDream: double-stream then single-stream blocks over [image tokens, T5 tokens, Llama last layer,
    Llama layer of the block] (image tokens FIRST; the text that follows is never shared). The blocks name
    themselves nowhere, so the wrapper lists the attention calls (one per block, doubles then singles).
    Image-token masks exist only for list inputs, never from _forward. HiDream E1 (image_cond) puts the
    reference image beside the panel in one token grid and is refused. Default: like Flux, double blocks
    from the middle on and every single block (HiDream-I1: double 8-15, single 0-31)."""

    def blocks(self, model) -> list:
        return ([("double", i, 0) for i in range(len(model.double_stream_blocks))]
                + [("single", i, 0) for i in range(len(model.single_stream_blocks))])

    def default_blocks(self, model) -> list:
        first_double = len(model.double_stream_blocks) // 2
        return [key for key in self.blocks(model) if key[0] == "single" or key[1] >= first_double]

    def call_options(self, model, args, kwargs) -> dict:
        # _forward(x, t, y, context, encoder_hidden_states_llama3, image_cond, control, transformer_options)
        names = ("x", "t", "y", "context", "encoder_hidden_states_llama3", "image_cond")
        value = {n: (args[i] if len(args) > i else kwargs.get(n)) for i, n in enumerate(names)}
        if value["image_cond"] is not None:
            raise PatchError("Consistent Self-Attention does not support HiDream E1 (edit) models: they put the reference "
                             "image beside the panel in one token grid, so the panel's own image tokens cannot be told apart")
        image = _patched_image_tokens(value["x"], int(model.patch_size))
        llama = value["encoder_hidden_states_llama3"]
        text = int(value["context"].shape[1]) + 2 * int(llama.shape[2])  # T5 + last Llama layer + the block's Llama layer
        calls = [(key, 0, image, image + text) for key in self.blocks(model)]
        return {CALLS_KEY: AttentionCalls(self.name, calls)}


@dataclass(frozen=True)
class SD3Family(DiTFamily):
    """SD3 / SD3.5 (MMDiT): joint blocks over [registers + context (text), image tokens]. MMDiT has no
    DIFFUSION_MODEL wrapper and names no blocks, so each joint block gets a "dit" double_block replace
    (chained to one already there) that reads the exact text and image tokens entering the block and lists
    its attention calls: the joint one ("double", i), then, on SD3.5 Medium's MMDiT-X blocks, the image-only
    attn2, which is never shared. Default: the later half of the joint blocks (SD3.5 Large: double 19-37,
    Medium: double 12-23)."""

    def blocks(self, model) -> list:
        return [("double", i, 0) for i in range(len(model.joint_blocks))]

    def default_blocks(self, model) -> list:
        first = len(model.joint_blocks) // 2
        return [key for key in self.blocks(model) if key[1] >= first]

    def install(self, patched, model):
        replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(model.joint_blocks):
            inner = replaces.get(("double_block", i))
            if isinstance(inner, SD3BlockLayout):  # patching an already patched model: replace ours, keep theirs
                inner = inner.inner
            attn2 = bool(getattr(block.x_block, "x_block_self_attn", False))
            patched.set_model_patch_replace(SD3BlockLayout(self.name, i, attn2, inner), "dit", "double_block", i)


class SD3BlockLayout:
    """"dit" double_block replace of MMDiT joint block i: puts this block's AttentionCalls in (a copy of) its
    transformer_options — text tokens = the txt entering the block (registers + context), image tokens = img —
    and runs the block (or the replace that was there before)."""

    def __init__(self, family: str, index: int, attn2: bool, inner=None):
        self.family, self.index, self.attn2, self.inner = family, index, attn2, inner

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        options = args.get("transformer_options")
        if isinstance(options, dict) and options.get(CONFIG_KEY) is not None and args.get("txt") is not None:
            text, image = int(args["txt"].shape[1]), int(args["img"].shape[1])
            calls = [(("double", self.index, 0), text, image, text + image)]
            if self.attn2:
                calls.append((None, 0, 0, image))
            args = dict(args, transformer_options=dict(options, **{CALLS_KEY: AttentionCalls(self.family, calls)}))
        if self.inner is not None:
            return self.inner(args, extra)
        return extra["original_block"](args)


FLUX1 = DiTFamily("Flux.1", options_position=7)  # Flux._forward(x, t, context, y, guidance, ref_latents, control, options)
FLUX2 = DiTFamily("Flux.2", options_position=7)  # the same model class (4 position axes, 1x1 patches of a packed latent)
CHROMA = DiTFamily("Chroma", options_position=5)  # Chroma._forward(x, t, context, guidance, control, options)
QWEN_IMAGE = QwenImageFamily("Qwen-Image", options_position=6)  # _forward(x, t, context, mask, guidance, ref_latents, options)
LUMINA2 = LuminaFamily("Lumina 2", options_position=None)  # NextDiT._forward(x, t, context, num_tokens, mask, **kwargs)
Z_IMAGE = LuminaFamily("Z-Image", options_position=None)  # the same NextDiT class (z_image_modulation)
HIDREAM = HiDreamFamily("HiDream", options_position=7)
SD3 = SD3Family("SD3", options_position=None)  # no DIFFUSION_MODEL wrapper: SD3BlockLayout replaces
SUPPORTED_FAMILIES = ("UNet models (SD1.5, SD2, SDXL) and the DiT families Flux.1 (dev, schnell, Kontext), Flux.2, "
                      "SD3 / SD3.5, Qwen-Image, Lumina 2 / Z-Image, HiDream (not E1) and Chroma")

# diffusion-model modules of DiTs we know but do not support yet -> the name users know them by
_KNOWN_DITS = {
    "comfy.ldm.chroma_radiance": "Chroma Radiance", "comfy.ldm.aura": "AuraFlow",
    "comfy.ldm.pixart": "PixArt", "comfy.ldm.hunyuan_dit": "Hunyuan-DiT",
    "comfy.ldm.wan": "Wan (video)", "comfy.ldm.hunyuan_video": "Hunyuan Video (video)",
    "comfy.ldm.lightricks": "LTX-Video (video)", "comfy.ldm.cosmos": "Cosmos (video)",
    "comfy.ldm.genmo": "Mochi (video)", "comfy.ldm.hunyuan3d": "Hunyuan3D", "comfy.ldm.ace": "ACE-Step (audio)",
}


def unsupported_model_error(model) -> PatchError:
    """The error for a MODEL that is neither a UNet nor a supported DiT: it names what works."""
    module = type(model).__module__
    known = next((name for prefix, name in _KNOWN_DITS.items() if module == prefix or module.startswith(prefix + ".")), None)
    if known is not None:
        return PatchError(f"Consistent Self-Attention does not support {known} models yet; it works on {SUPPORTED_FAMILIES}. "
                          f"Load one of those.")
    return PatchError(f"Consistent Self-Attention works on {SUPPORTED_FAMILIES}; this MODEL is a {type(model).__name__}, "
                      f"whose attention this pack cannot reach. Load one of those.")


def dit_family(model_patcher) -> Optional[DiTFamily]:
    """The supported DiT family of a MODEL, or None for anything else (a UNet, or unsupported)."""
    model = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if model is None:
        return None
    import comfy.ldm.chroma.model
    import comfy.ldm.flux.model
    import comfy.ldm.hidream.model
    import comfy.ldm.lumina.model
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.ldm.qwen_image.model

    if type(model) is comfy.ldm.flux.model.Flux:
        return FLUX1 if len(model.params.axes_dim) == 3 else FLUX2  # Flux.2 has 4 position axes
    if type(model) is comfy.ldm.chroma.model.Chroma:  # not Chroma Radiance (pixel space, other token layout)
        return CHROMA
    if type(model) is comfy.ldm.qwen_image.model.QwenImageTransformer2DModel:
        return QWEN_IMAGE
    if type(model) is comfy.ldm.lumina.model.NextDiT:
        z_image = float(getattr(model, "time_scale", 1.0)) != 1.0 or getattr(model, "pad_tokens_multiple", None) is not None
        return Z_IMAGE if z_image else LUMINA2
    if type(model) is comfy.ldm.hidream.model.HiDreamImageTransformer2DModel:
        return HIDREAM
    if type(model) is comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper:
        return SD3
    return None


class DiTTokenLayout:
    """DIFFUSION_MODEL wrapper: records, in (a copy of) this model call's transformer_options, where the image
    tokens of each joint attention sit (family.call_options), where the override reads them. Image tokens =
    the latent's patches (padded to the patch size, as the model does); tokens after them (Kontext reference
    images, padding, HiDream's text) are not panel tokens and are never shared."""

    def __init__(self, family: DiTFamily):
        self.family = family

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        position = self.family.options_position
        in_kwargs = "transformer_options" in kwargs or position is None
        options = kwargs.get("transformer_options") if in_kwargs else (args[position] if len(args) > position else None)
        if not isinstance(options, dict) or options.get(CONFIG_KEY) is None:
            return executor(*args, **kwargs)
        options = dict(options)
        options.update(self.family.call_options(executor.class_obj, args, kwargs))
        if in_kwargs:
            kwargs = dict(kwargs, transformer_options=options)
        else:
            args = args[:position] + (options,) + args[position + 1:]
        return executor(*args, **kwargs)


class DiTAttentionOverride:
    """transformer_options["optimized_attention_override"]: CSA on the selected DiT blocks, plain attention
    elsewhere. `inner` is the override the MODEL had before (another pack's attention backend): every
    attention we run goes through it, so it is never dropped.

    q/k/v come as [rows, heads, tokens, dim] (skip_reshape: Flux, Chroma, Qwen-Image, Lumina) or as
    [rows, tokens, heads*dim] (SD3, HiDream; SD3's v is [rows, tokens, heads, dim]); the mask as the `mask`
    keyword or the one positional argument after heads (optimized_attention_masked)."""

    def __init__(self, inner=None):
        self.inner = inner

    def __deepcopy__(self, memo):
        return self

    def attend(self, func, *args, **kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def locate(options: dict, tokens: int):
        """(layer, tokens before the image, image tokens) of this call, or None when it is no panel's joint attention."""
        calls: Optional[AttentionCalls] = options.get(CALLS_KEY)
        if calls is not None:
            return calls.next(tokens)
        layout = options.get(TOKENS_KEY)
        block_type, block_index = options.get("block_type"), options.get("block_index")
        if layout is None or block_type is None or block_index is None:
            return None
        return (str(block_type), int(block_index), 0), layout[0], layout[1]

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        config: Optional[CSAConfig] = options.get(CONFIG_KEY)
        run: Optional[RunState] = options.get(RUN_KEY)
        skip = bool(kwargs.get("skip_reshape", False))
        if config is None or run is None or len(args) > 1 or (q.ndim, skip) not in ((4, True), (3, False)):
            return self.attend(func, q, k, v, heads, *args, **kwargs)  # not a joint attention of a sampled panel batch
        tokens = k.shape[2] if skip else k.shape[1]
        if (q.shape[2] if skip else q.shape[1]) != tokens:
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        located = self.locate(options, int(tokens))
        if located is None:
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        layer, text, image = located
        if layer is None or layer not in config.layers:
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        kinds = list(options.get("cond_or_uncond") or [0])
        chunks = len(kinds)
        rows, share = run.rows_of_call(q.shape[0], chunks, options)
        if text + image > tokens:
            raise PatchError(f"StoryDiffusion: a {config.family} block attends over {tokens} tokens, fewer than the "
                             f"{text} text + {image} image tokens of the model call (another patch changed the tokens?)")
        sigma = run.sigma_of(options)
        step = run.step_of(sigma)
        if not config.schedule.active(step, sigma, layer):
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        sampled = core.sample_panel_tokens(image, config.rate, config.seed, step, layer_ordinal(layer), rows)
        if not skip:  # [rows, tokens, heads*dim] (v may be [rows, tokens, heads, dim]) -> [rows, heads, tokens, dim]
            q4, k4, v4 = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        else:
            q4, k4, v4 = q, k, v
        if run.writer is not None and sampled.shape[1] > 0:
            stored = dit.sampled_keys_values(k4, v4, chunks=chunks, text_tokens=text, sampled=sampled)
            run.writer.put(step, layer, run.roles_of(kinds), stored, image)
        bank = self.bank_tokens(config, run, step, layer, kinds, image, heads, k4) if run.bank_reads is not None else None
        nothing_shared = sampled.shape[1] == 0 or not bool(share.any())
        if nothing_shared and (bank is None or not bool(bank.reads.any())):
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        mask = args[0] if args else kwargs.get("mask")
        rest = {key: value for key, value in kwargs.items() if key not in ("mask", "skip_reshape")}

        def kernel(qq, kk, vv, panel_mask):
            return self.attend(func, qq, kk, vv, heads, mask=panel_mask, skip_reshape=True, **rest)

        return dit.joint_consistent_attention(q4, k4, v4, chunks=chunks, text_tokens=text, image_tokens=image,
                                              share=share, sampled=sampled, window=config.window,
                                              mask=mask, bank=bank, attention=kernel)

    @staticmethod
    def bank_tokens(config: CSAConfig, run: RunState, step: int, layer, kinds, image: int, heads: int,
                    k) -> core.BankTokens:
        """The bank's keys and values for this call, [chunks, bank panels, heads, n, dim] each."""
        try:
            stored = config.bank.stored_tokens(step, layer, run.roles_of(kinds), image, device=k.device, dtype=k.dtype)
        except BankError as e:
            raise BankError(f"StoryDiffusion: {e}") from None
        bank_k, bank_v = dit.bank_keys_values(stored.to(k.device, k.dtype), heads)
        return core.BankTokens(bank_k, bank_v, run.bank_reads)


def _patch_dit(model, family: DiTFamily):
    """A clone of a DiT MODEL with the override (chained to the one it had) and the token-layout wrapper."""
    import comfy.patcher_extension

    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_SLOT)
    if isinstance(previous, DiTAttentionOverride):  # patching an already patched model: replace ours, keep theirs
        previous = previous.inner
    options[OVERRIDE_SLOT] = DiTAttentionOverride(previous)
    wrappers = comfy.patcher_extension.WrappersMP
    patched.remove_wrappers_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, DiTTokenLayout(family))
    family.install(patched, model.model.diffusion_model)
    return patched


# ---------------------------------------------------------------------------------------------------
# public entry points used by the nodes


def _patch_unet(model, layers, high_res):
    """A clone of a UNet MODEL with an attn1 replace on each selected layer (keeping any replace it had)."""
    patched = model.clone()
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for layer in layers:
        inner = replaces.get(layer)
        if isinstance(inner, LayerReplace):  # patching an already patched model: replace ours, keep theirs
            inner = inner.inner
        patched.set_model_attn1_replace(LayerReplace(layer, layer in high_res, inner), *layer)
    return patched


def patch_model(model, *, rate: float, rate_high_res: float, window: int, layer_choice: str, custom_layers: str,
                start_percent: float, end_percent: float, official_schedule: bool, seed: int, story=None):
    """A clone of `model` with Consistent Self-Attention on the chosen layers (the input is untouched).

    UNets: attn1 replaces. DiTs (Flux.1, Flux.2, Chroma, SD3, Qwen-Image, Lumina 2 / Z-Image, HiDream): the attention override; `rate_high_res` does not
    apply (one rate for every block) and the "official" layer choice means the family's default blocks."""
    import comfy.patcher_extension

    family = dit_family(model)
    if family is not None:
        diffusion_model = model.model.diffusion_model
        available, high_res, attn1 = family.blocks(diffusion_model), set(), {}
        official = family.default_blocks(diffusion_model)
    else:
        available, high_res, attn1 = unet_layers(model)
        official = None
    sigmas = glue.sigma_window(model, start_percent, end_percent)
    layers = select_layers(available, layer_choice, custom_layers, official=official)
    schedule = Schedule(window=sigmas, official=official_schedule, seed=int(seed))
    panel_characters = identity_rows = None
    if story is not None:
        panel_characters = tuple(tuple(p.characters) for p in story.panels)
        ids = sorted({int(i) for panels in (story.identity_panels or {}).values() for i in panels})
        identity_rows = tuple(ids) or None
    config = CSAConfig(rate=float(rate), rate_high_res=float(rate_high_res if family is None else rate),
                       window=int(window), seed=int(seed),
                       schedule=schedule, layers=tuple(layers), high_res_layers=frozenset(high_res),
                       panel_characters=panel_characters, identity_rows=identity_rows,
                       attn1={layer: attn1[layer] for layer in layers if layer in attn1},
                       family=family.name if family is not None else "UNet")
    patched = _patch_dit(model, family) if family is not None else _patch_unet(model, layers, high_res)
    patched.model_options["transformer_options"][CONFIG_KEY] = config
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, _predict_noise_wrapper)
    return patched


def config_of(model) -> CSAConfig:
    config = model.model_options.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        raise PatchError("this MODEL has no Consistent Self-Attention: connect the MODEL output of "
                         "'Consistent Self-Attention (StoryDiffusion)' to this node")
    return config


def with_bank(model, mode: str, bank: IdentityBank, first_panel: int = 0, rows=None):
    """A clone of a CSA-patched model that writes (identity run) or reads (story panels) `bank`.

    rows: the story panel of every latent row of a read run (e.g. (2, 5) from Select Story Panels);
    default: consecutive panels from first_panel."""
    config = config_of(model)
    story_len = None if config.panel_characters is None else len(config.panel_characters)
    if mode == MODE_READ and story_len is not None and first_panel >= story_len:
        raise PatchError(f"first_panel {first_panel} is past the end of the story ({story_len} panels)")
    if rows is not None:
        rows = tuple(int(r) for r in rows)
        if not rows or len(set(rows)) != len(rows) or (story_len is not None and max(rows) >= story_len):
            raise PatchError(f"the read panels {list(rows)} must be distinct story panels of this story "
                             f"({story_len} panels): connect the 'panels' output of Select Story Panels of the same story")
    patched = model.clone()
    patched.model_options["transformer_options"][CONFIG_KEY] = dataclasses.replace(
        config, mode=mode, bank=bank, first_panel=int(first_panel), read_rows=rows if mode == MODE_READ else None)
    if mode == MODE_WRITE and config.family == "UNet":  # DiTs: the attention override writes (it sees k/v only)
        patches = patched.model_options["transformer_options"].get("patches", {}).get("attn1_patch", [])
        if not any(isinstance(p, BankWriteTap) for p in patches):
            patched.set_model_attn1_patch(BankWriteTap())
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


def save_bank_file(bank: IdentityBank, filename_prefix: str) -> str:
    """Save into models/storydiffusion as <prefix>_00001_.safetensors (the counter never overwrites), where
    Load Identity Bank lists it; returns the name the loader shows."""
    import folder_paths

    folder = glue.model_folder(BANK_FOLDER, BANK_EXTENSIONS)[0]
    prefix = (filename_prefix or "").strip() or "bank"
    try:
        target, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder)
    except Exception:
        raise BankError(f"filename_prefix {prefix!r} must stay inside models/{BANK_FOLDER} (no '..' or absolute paths)") from None
    file = f"{name}_{counter:05}_.safetensors"
    bank.save(os.path.join(target, file))
    return f"{subfolder}/{file}" if subfolder else file
