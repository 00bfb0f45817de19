"""The one module of wan/ that speaks ComfyUI: per-frame semantics on a clone of a Wan 2.1 I2V / FLF2V MODEL.

Hook (exact): an object patch on `forward` of every WanI2VCrossAttention (`diffusion_model.blocks.N.cross_attn`)
plus a DIFFUSION_MODEL wrapper.
- The wrapper runs once per model call with the WanModel and its real inputs: it reads the latent frame
  count and token grid from `x`, maps the per-frame embeddings to latent frames (frames.py), fills the
  image slots the conditioning's `clip_fea` has (257 or 2 x 257) and projects them with the model's own
  `img_emb` (its emb_pos included), then hands them to the blocks in a copy of transformer_options.
- The patched forward is ComfyUI's WanI2VCrossAttention.forward line for line (same layers, same
  `optimized_attention` calls in the same order, transformer_options passed on, so attention overrides and
  kernels still apply), except that the image attention of latent frame t's video tokens uses
  k_img/v_img of the block applied to frame t's projected tokens, blended with the original by strength.
At strength 0 the node returns an unpatched clone; with the patch installed at 0 the forward is the
original computation (tested bit-identical).

Why not the other hooks: `clip_fea` is concatenated into one context that every video token attends to
(and FLF2V truncates it to emb_pos' length), so replacing it per call cannot route per latent frame; the
`optimized_attention_override` does see the image attention call, but only as already-projected
(q, k_img, v_img) with no block identity (Wan puts no block index in transformer_options) and nothing
that tells the image call from the text call but the key length, so it cannot compute k_img/v_img of new
tokens with that block's weights.
"""
from __future__ import annotations

import math
import types

import torch

from .frames import VideoLayout, WanSemanticsError, fill_image_slots, image_attention, latent_frame_embeddings

WRAPPER_KEY = "storydiffusion_wan_per_frame_semantics"
OPTIONS_KEY = "storydiffusion_wan_per_frame_semantics"
NEEDS = ("Per-frame semantics need a Wan 2.1 I2V or FLF2V model (image cross-attention on CLIP vision tokens, "
         "img_emb)")


class PerFrameCall:
    """What one model call hands to the patched blocks: projected tokens per latent frame, the token layout."""

    def __init__(self, tokens: torch.Tensor, layout: VideoLayout, strength: float):
        self.tokens, self.layout, self.strength = tokens, layout, strength


def image_cross_attention_blocks(model) -> list[int]:
    """Indices of the blocks with Wan's image cross-attention; a clear error for any other model."""
    import comfy.ldm.wan.model as wan

    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, wan.WanModel):
        raise WanSemanticsError(f"{NEEDS}; this model is {type(dm).__name__}, not Wan.")
    blocks = [i for i, block in enumerate(dm.blocks) if isinstance(getattr(block, "cross_attn", None), wan.WanI2VCrossAttention)]
    if getattr(dm, "img_emb", None) is None or not blocks:
        raise WanSemanticsError(f"{NEEDS}; this Wan model has none (Wan 2.2 models and text-to-video models have no "
                                "image cross-attention). Use a Wan 2.1 I2V/FLF2V checkpoint, or skip this node.")
    return blocks


def per_frame_embeddings(clip_vision_output, width: int) -> torch.Tensor:
    """The penultimate CLIP vision tokens [frames, tokens, width] of a CLIP_VISION_OUTPUT."""
    value = getattr(clip_vision_output, "penultimate_hidden_states", None)
    if value is None and isinstance(clip_vision_output, dict):
        value = clip_vision_output.get("penultimate_hidden_states")
    if not isinstance(value, torch.Tensor) or value.ndim != 3:
        raise WanSemanticsError("The CLIP_VISION_OUTPUT has no per-frame penultimate_hidden_states [frames, 257, 1280]: "
                                "connect the Semantic Motion Predictor's clip_vision_output (or CLIP Vision Encode of one "
                                "image per frame, ViT-H).")
    if value.shape[-1] != width:
        raise WanSemanticsError(f"The per-frame CLIP vision tokens are {value.shape[-1]} wide but Wan's img_emb takes "
                                f"{width} (CLIP ViT-H penultimate tokens): use the CLIP vision model of the Wan workflow.")
    return value.detach().float().cpu()


class PerFrameWrapper:
    """DIFFUSION_MODEL wrapper: per call, the projected tokens of each latent frame -> transformer_options."""

    def __init__(self, embeddings: torch.Tensor, strength: float):
        self.embeddings, self.strength = embeddings, strength

    def __call__(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options=None,
                 **kwargs):
        dm = executor.class_obj
        if clip_fea is None:
            raise WanSemanticsError("Wan Per-frame Semantics: the conditioning has no CLIP vision output, so the model has "
                                    "no image tokens to steer. Give WanFirstLastFrameToVideo (or WanImageToVideo) its "
                                    "clip_vision_start_image / clip_vision_end_image.")
        pt, ph, pw = dm.patch_size
        frames = math.ceil(x.shape[2] / pt)
        extra = 0 if time_dim_concat is None else math.ceil(time_dim_concat.shape[2] / pt)
        layout = VideoLayout(frames, math.ceil(x.shape[3] / ph) * math.ceil(x.shape[4] / pw), extra)
        per_latent = latent_frame_embeddings(self.embeddings, frames)
        slots = fill_image_slots(per_latent, clip_fea.shape[-2]).to(device=clip_fea.device, dtype=clip_fea.dtype)
        tokens = dm.img_emb(slots)  # [T, slots, dim]: the model's own emb_pos and projection
        options = dict(transformer_options or {})
        options[OPTIONS_KEY] = PerFrameCall(tokens, layout, self.strength)
        return executor(x, timestep, context, clip_fea, time_dim_concat, options, **kwargs)


def per_frame_cross_attention_forward(self, x, context, context_img_len, transformer_options=None):
    """WanI2VCrossAttention.forward (comfy/ldm/wan/model.py) with per-frame image tokens (bound to the module)."""
    transformer_options = transformer_options or {}
    import comfy.ldm.wan.model as wan

    attention = wan.optimized_attention
    call = transformer_options.get(OPTIONS_KEY)
    context_img = context[:, :context_img_len]
    context = context[:, context_img_len:]

    q = self.norm_q(self.q(x))
    k = self.norm_k(self.k(context))
    v = self.v(context)

    def original():
        k_img = self.norm_k_img(self.k_img(context_img))
        v_img = self.v_img(context_img)
        return attention(q, k_img, v_img, heads=self.num_heads, transformer_options=transformer_options)

    if call is None or call.strength == 0:
        img_x = original()
    else:
        tokens = call.tokens.to(device=q.device, dtype=q.dtype)
        k_frames = self.norm_k_img(self.k_img(tokens))
        v_frames = self.v_img(tokens)
        img_x = image_attention(q, original, k_frames, v_frames, self.num_heads, call.layout, call.strength,
                                lambda qq, kk, vv, heads: attention(qq, kk, vv, heads=heads,
                                                                    transformer_options=transformer_options))
    x = attention(q, k, v, heads=self.num_heads, transformer_options=transformer_options)
    x = x + img_x
    return self.o(x)


def rebind_per_frame_forwards(main, clone) -> None:
    """ON_DEEPCLONE_MULTIGPU / ON_MATCH_MULTIGPU_CLONES callback (ComfyUI 0.29+ multi-GPU): a per-device clone
    carries the main patcher's object patches, whose forwards are bound to the main model's modules (its weights,
    its device); bind them to the clone's own cross-attention modules."""
    import comfy.utils

    for key, patch in list(clone.object_patches.items()):
        if getattr(patch, "__func__", None) is per_frame_cross_attention_forward:
            module = comfy.utils.get_attr(clone.model, key.rsplit(".", 1)[0])
            clone.object_patches[key] = types.MethodType(per_frame_cross_attention_forward, module)


def install_multigpu_callbacks(patched) -> None:
    """Register rebind_per_frame_forwards where this ComfyUI has multi-GPU model clones."""
    import comfy.patcher_extension

    callbacks = comfy.patcher_extension.CallbacksMP
    for name in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES"):
        kind = getattr(callbacks, name, None)
        if kind is not None:
            patched.remove_callbacks_with_key(kind, WRAPPER_KEY)
            patched.add_callback_with_key(kind, WRAPPER_KEY, rebind_per_frame_forwards)


def apply_per_frame_semantics(model, clip_vision_output, strength: float, install_at_zero: bool = False):
    """A clone of a Wan 2.1 I2V/FLF2V MODEL whose latent frame t attends to the image tokens of its own
    per-frame embedding (blended by strength). The input model is untouched; strength 0 = an unpatched clone
    (unless `install_at_zero`, used by the tests to check the patched forward is the original at 0)."""
    import comfy.patcher_extension

    if not 0.0 <= strength <= 1.0:
        raise WanSemanticsError(f"strength must be between 0 and 1, got {strength}.")
    blocks = image_cross_attention_blocks(model)
    dm = model.get_model_object("diffusion_model")
    width = dm.img_emb.proj[0].normalized_shape[0]
    embeddings = per_frame_embeddings(clip_vision_output, width)
    patched = model.clone()
    if strength == 0 and not install_at_zero:
        return patched
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patched.add_wrapper_with_key(kind, WRAPPER_KEY, PerFrameWrapper(embeddings, float(strength)))
    for i in blocks:
        key = f"diffusion_model.blocks.{i}.cross_attn.forward"
        previous = patched.object_patches.get(key)
        if previous is not None and getattr(previous, "__func__", None) is not per_frame_cross_attention_forward:
            # ours replaces the whole forward: another pack's replacement could not run, so say so instead
            raise WanSemanticsError("another node already replaced Wan's image cross-attention (an object patch on "
                                    f"blocks.{i}.cross_attn.forward): Wan Per-frame Semantics cannot stack with it; "
                                    "apply it to the MODEL before that node, or leave one of them out.")
        module = model.get_model_object(f"diffusion_model.blocks.{i}.cross_attn")
        patched.add_object_patch(key, types.MethodType(per_frame_cross_attention_forward, module))
    install_multigpu_callbacks(patched)
    return patched
