"""The one module of ipadapter/ that speaks ComfyUI: the ipadapter model folder, the model's
cross-attention layers, and the attn2 replace that gives latent frame j the image tokens of embedding j.

Hook: every cross-attention (attn2) of the UNet gets an attn2 *replace* patch. ComfyUI hands it
q = to_q(x) and the projected text k/v and applies `to_out` afterwards, so the patch returns
Attention(q, k_text, v_text) + weight * Attention(q, to_k_ip(tokens_j), to_v_ip(tokens_j)) with the
image tokens of frame j in row j of every cond/uncond chunk. A replace patch that was already
installed for the same block (another IP-Adapter, a regional-prompt pack, ...) still computes the text
part: ours wraps it. Self-attention (attn1) patches, such as this pack's Consistent Self-Attention,
are untouched, so both compose.

Layer mapping: the file numbers its cross-attentions in diffusers module order - down blocks, up
blocks, mid block, each transformer stack in depth order. ComfyUI's blocks in the same order are
input blocks (ascending), output blocks (ascending), the middle block; they are read off the model
itself, so SD1.5 (16 layers), SDXL (70) and narrower test models map the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..common import comfy_adapter as glue
from ..common.sigmas import SigmaWindow
from .frames import image_attention, route_frames
from .weights import IPAdapter, IPAdapterFormatError, family_name, group_state_dict, load_ipadapter_file

IPADAPTER_FOLDER = "ipadapter"
logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# model folder


EXTENSIONS = (".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt")


def ipadapter_filenames() -> list[str]:
    return glue.model_files(IPADAPTER_FOLDER, EXTENSIONS)


def load_ipadapter(name: str) -> dict:
    """Nested {"image_proj", "ip_adapter"} state dict of a file in models/ipadapter (validated)."""
    path = glue.model_file_path(IPADAPTER_FOLDER, name, EXTENSIONS)
    if path is None:
        raise FileNotFoundError(f"IP-Adapter file '{name}' is not in the ipadapter model folder "
                                f"({', '.join(glue.model_folder(IPADAPTER_FOLDER, EXTENSIONS))}).")
    return load_ipadapter_file(path)


def unwrap_ipadapter(value) -> dict:
    """Accept our loader's value, IPAdapter_plus's loader value, or its unified-loader pipe."""
    if isinstance(value, dict) and "ipadapter" in value and isinstance(value["ipadapter"], dict):
        value = value["ipadapter"].get("model", value["ipadapter"])
    return group_state_dict(value, "the IPADAPTER input")


# ---------------------------------------------------------------------------------------------------
# the model's cross-attention layers


@dataclass(frozen=True)
class CrossAttentionSite:
    key: tuple  # ("input" | "middle" | "output", block id, transformer index): ComfyUI's patch key
    context_dim: int
    inner_dim: int


def cross_attention_sites(model) -> list[CrossAttentionSite]:
    """Every attn2 of the UNet in IP-Adapter file order: input blocks, output blocks, middle block."""
    unet = model.get_model_object("diffusion_model")
    if not hasattr(unet, "input_blocks"):
        raise ValueError(f"Per-frame IP-Adapter conditioning needs a UNet model (SD1.5 / SDXL family); got "
                         f"{type(unet).__name__}.")
    blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    blocks += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    blocks += [("middle", 0, unet.middle_block)]
    sites = []
    for name, block_id, block in blocks:
        for module in block.modules():
            for index, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                attn2 = getattr(transformer, "attn2", None)
                if attn2 is not None and not getattr(transformer, "switch_temporal_ca_to_sa", False):
                    sites.append(CrossAttentionSite((name, block_id, index), attn2.to_k.in_features, attn2.to_k.out_features))
    return sites


def check_ipadapter_fits(adapter: IPAdapter, sites: list[CrossAttentionSite]) -> None:
    """Wrong family or layer count -> an error that names both sides."""
    spec = adapter.spec
    model_context = sorted({s.context_dim for s in sites})
    if model_context != [spec.context_dim]:
        model_family = family_name(model_context[0]) if len(model_context) == 1 else f"context {model_context}"
        raise IPAdapterFormatError(
            f"This IP-Adapter is for {spec.family} (its to_k_ip reads {spec.context_dim}-wide context) but the model is "
            f"{model_family} ({'/'.join(map(str, model_context))}-wide context). Use the IP-Adapter file made for "
            f"your checkpoint's family (e.g. ip-adapter_sd15 for SD1.5, ip-adapter_sdxl_vit-h for SDXL).")
    if len(sites) != len(spec.layer_dims):
        raise IPAdapterFormatError(
            f"This IP-Adapter has {len(spec.layer_dims)} cross-attention layers but the model has {len(sites)} "
            f"(SD1.5: 16, SDXL: 70). The adapter was made for a different UNet layout.")
    for i, (site, dim) in enumerate(zip(sites, spec.layer_dims)):
        if site.inner_dim != dim:
            raise IPAdapterFormatError(
                f"IP-Adapter layer {2 * i + 1} is {dim} wide but the model's cross-attention {site.key} is "
                f"{site.inner_dim} wide: the adapter was made for a different UNet.")


# ---------------------------------------------------------------------------------------------------
# the attn2 patch


class FrameTokens:
    """Projected image tokens per frame, cond and uncond ([frames, tokens, context]); shared by all
    layer patches of one model. `.to()` copies are memoised so 70 layers share one device copy."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        self.cond, self.uncond = cond, uncond
        self._copies = {}

    def to(self, target) -> FrameTokens:
        key = str(target)
        if key not in self._copies:
            if self.cond.dtype == target or self.cond.device == target:
                self._copies[key] = self
            else:
                moved = FrameTokens(self.cond.to(target), self.uncond.to(target))
                moved._copies = self._copies
                self._copies[key] = moved
        return self._copies[key]


class PerFrameIPAttention:
    """attn2 replace for one cross-attention layer: text attention + weight * per-frame image attention.

    Immutable: `.to()` (ComfyUI moves patches with the model) returns a new object, and deepcopy
    (ModelPatcher.clone) returns the same one.
    """

    def __init__(self, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor, tokens: FrameTokens, weight: float,
                 window: SigmaWindow, previous=None):
        self.to_k_ip, self.to_v_ip, self.tokens = to_k_ip, to_v_ip, tokens
        self.weight, self.window = float(weight), window
        self.previous = previous  # an attn2 replace that was installed before ours: it computes the text part

    def __deepcopy__(self, memo):
        return self

    def to(self, target):
        previous = self.previous.to(target) if hasattr(self.previous, "to") else self.previous
        return PerFrameIPAttention(self.to_k_ip.to(target), self.to_v_ip.to(target), self.tokens.to(target),
                                   self.weight, self.window, previous)

    def active(self, extra_options) -> bool:
        if self.weight == 0:
            return False
        sigma = glue.call_sigma(extra_options)
        return sigma is None or self.window.contains(sigma)

    def __call__(self, q, k, v, extra_options):
        attention = glue.comfy_attention(extra_options)
        heads = extra_options["n_heads"]
        out = self.previous(q, k, v, extra_options) if self.previous is not None else attention(q, k, v, heads)
        if not self.active(extra_options):
            return out
        dtype, device = q.dtype, q.device
        ad_params = extra_options.get("ad_params") or {}
        tokens = route_frames(self.tokens.cond.to(device, dtype), self.tokens.uncond.to(device, dtype),
                              glue.roles_of_call(extra_options), q.shape[0], ad_params.get("sub_idxs"))
        k_ip = torch.nn.functional.linear(tokens, self.to_k_ip.to(device, dtype))
        v_ip = torch.nn.functional.linear(tokens, self.to_v_ip.to(device, dtype))
        return out + self.weight * image_attention(q, k_ip, v_ip, heads, attention).to(out.dtype)


BLACK_IMAGE_SIZE = 224  # IPAdapter_plus encodes a 224 x 224 black image; encode_image resizes to the model's size


def black_image_embeddings(clip_vision, field: str) -> torch.Tensor:
    """CLIP-vision encoding of a black image (ComfyUI's own encode_image), the `field` of its output: the
    unconditional image input of plus / full-face IP-Adapters (reference implementation, IPAdapter_plus)."""
    black = torch.zeros(1, BLACK_IMAGE_SIZE, BLACK_IMAGE_SIZE, 3)
    output = clip_vision.encode_image(black, crop=True)
    value = getattr(output, field, None) if not isinstance(output, dict) else output.get(field)
    if value is None:
        raise ValueError(f"The CLIP vision model gave no {field} for the black image.")
    return value


def unconditional_embeddings(spec, embeds: torch.Tensor, clip_vision=None) -> torch.Tensor:
    """IP-Adapter's own negative image input: zeros for plain adapters (their training drops the image
    that way); for plus / full-face adapters the CLIP-vision encoding of a black image, or zeros with a
    warning when no CLIP vision model is given."""
    if spec.kind == "plain":
        return torch.zeros_like(embeds)
    if clip_vision is None:
        logger.warning("StoryDiffusion per-frame conditioning: a %s IP-Adapter's unconditional input is the CLIP-vision "
                       "encoding of a black image; connect clip_vision to use it (using zeros instead).", spec.kind)
        return torch.zeros_like(embeds)
    black = black_image_embeddings(clip_vision, spec.input_field).to(embeds.device, embeds.dtype)
    if black.shape[1:] != embeds.shape[1:]:
        raise ValueError(f"The CLIP vision model encodes an image as {tuple(black.shape[1:])} but the per-frame embeddings are "
                         f"{tuple(embeds.shape[1:])}: connect the CLIP vision model that made the embeddings.")
    return black


def apply_per_frame_ipadapter(model, ipadapter: dict, embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                              weight: float, start_percent: float, end_percent: float, clip_vision=None):
    """A clone of `model` whose latent frame j cross-attends to the image tokens of `embeds[j]`.

    `negative_embeds` feed the uncond chunks; by default IP-Adapter's own negative (which is how it drops
    the image during training), so CFG pushes towards the image: zeros for plain adapters, the encoding of
    a black image by `clip_vision` for plus / full-face ones (zeros with a warning without it).
    """
    adapter = IPAdapter(unwrap_ipadapter(ipadapter))
    sites = cross_attention_sites(model)
    check_ipadapter_fits(adapter, sites)
    window = glue.sigma_window(model, start_percent, end_percent)
    if negative_embeds is None:
        negative_embeds = unconditional_embeddings(adapter.spec, embeds, clip_vision)
    if negative_embeds.shape[1:] != embeds.shape[1:]:
        raise ValueError(f"negative embeddings {tuple(negative_embeds.shape)} do not match the embeddings {tuple(embeds.shape)}.")
    if negative_embeds.shape[0] not in (1, embeds.shape[0]):
        raise ValueError(f"give one negative embedding or one per frame ({embeds.shape[0]}), not {negative_embeds.shape[0]}.")
    cond = adapter.project(embeds)
    uncond = adapter.project(negative_embeds).expand(cond.shape[0], -1, -1).contiguous()
    tokens = FrameTokens(cond, uncond)

    patched = model.clone()
    glue.with_chunk_roles(patched)  # DualCFGGuider's chunk 0 is the negative pass
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for site, (to_k_ip, to_v_ip) in zip(sites, adapter.kv_weights):
        previous = existing.get(site.key, existing.get(site.key[:2]))
        patch = PerFrameIPAttention(to_k_ip, to_v_ip, tokens, weight, window, previous)
        patched.set_model_attn2_replace(patch, site.key[0], site.key[1], site.key[2])
    return patched
