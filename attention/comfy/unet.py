"""Consistent Self-Attention on UNets (SD1.5, SD2, SDXL): an attn1 *replace* on each selected transformer block
(ComfyUI hands it q/k/v already projected, for all rows of one model call) and, in identity-bank write runs, an
attn1 *patch* that records the sampled hidden states entering attn1 — what the bank stores."""
from __future__ import annotations

import torch

from ...common import comfy_adapter as glue
from .. import core
from ..bank import BankError
from ..run import CONFIG_KEY, RUN_KEY, CSAConfig, PatchError, RunState
from ..schedule import layer_ordinal
from .dit_families import unsupported_model_error
from .lifecycle import device_free_memory

MULTIGPU_DEVICE = "multigpu_thread_device"  # ComfyUI 0.29+ multi-GPU: the device (and model clone) of this call


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



class BankWriteTap:
    """attn1 *patch* of a write run: records the sampled hidden states entering attn1 (before to_k/to_v),
    which is what the bank stores; returns its inputs unchanged."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        config: CSAConfig | None = extra_options.get(CONFIG_KEY)
        run: RunState | None = extra_options.get(RUN_KEY)
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
        run.write(step, layer, run.roles_of(kinds), hidden, tokens)
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

    def bank_tokens(self, config: CSAConfig, run: RunState, step: int, kinds, tokens: int, k,
                    device_key=None) -> core.BankTokens:
        """The bank's hidden states for this call, projected by this layer's own to_k/to_v (of the model on
        `device_key`, ComfyUI multi-GPU's transformer_options["multigpu_thread_device"], when there is one)."""
        try:
            hidden = config.bank.stored_tokens(step, self.layer, run.roles_of(kinds), tokens, device=k.device, dtype=k.dtype)
        except BankError as e:
            raise BankError(f"StoryDiffusion: {e}") from None
        attn1 = run.attn1_of(config, self.layer, device_key)
        hidden = hidden.to(k.device, k.dtype)
        return core.BankTokens(attn1.to_k(hidden), attn1.to_v(hidden), run.bank_reads)

    def __call__(self, q, k, v, extra_options):
        config: CSAConfig | None = extra_options.get(CONFIG_KEY)
        run: RunState | None = extra_options.get(RUN_KEY)
        if config is None or run is None:  # a model call outside a sampling run (or our wrapper is gone)
            return self.plain(q, k, v, extra_options)
        kinds = list(extra_options.get("cond_or_uncond") or [0])
        chunks = len(kinds)
        rows, share = run.rows_of_call(q.shape[0], chunks, extra_options)
        sigma = run.sigma_of(extra_options)
        step = run.step_of(sigma)
        if not config.schedule.active(step, sigma, self.layer):
            return self.plain(q, k, v, extra_options)
        run.reach(step, self.layer)
        rate = config.rate_high_res if self.high_res else config.rate
        tokens = k.shape[1]
        sampled = core.sample_panel_tokens(tokens, rate, config.seed, step, layer_ordinal(self.layer), rows)
        bank = None
        if run.bank_reads is not None:
            bank = self.bank_tokens(config, run, step, kinds, tokens, k, extra_options.get(MULTIGPU_DEVICE))
        nothing_shared = sampled.shape[1] == 0 or not bool(share.any())
        if nothing_shared and (bank is None or not bool(bank.reads.any())):
            return self.plain(q, k, v, extra_options)
        return core.consistent_attention(q, k, v, extra_options["n_heads"], chunks=chunks, share=share,
                                         sampled=sampled, window=run.window(config), bank=bank,
                                         budget=run.attention_budget(config, q.device, device_free_memory),
                                         attention=glue.comfy_attention(extra_options))




def patch_unet(model, layers, high_res):
    """A clone of a UNet MODEL with an attn1 replace on each selected layer (keeping any replace it had)."""
    patched = model.clone()
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for layer in layers:
        inner = replaces.get(layer)
        if isinstance(inner, LayerReplace):  # patching an already patched model: replace ours, keep theirs
            inner = inner.inner
        patched.set_model_attn1_replace(LayerReplace(layer, layer in high_res, inner), *layer)
    return patched


