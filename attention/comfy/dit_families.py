"""The DiT families Consistent Self-Attention understands: their blocks, default blocks, and where the image
tokens sit in each joint attention of a model call. A DIFFUSION_MODEL wrapper (`DiTTokenLayout`; SD3: "dit"
block replaces) records that layout in the call's transformer_options, where the override
(attention/comfy/dit_override.py) reads it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..run import CALLS_KEY, CONFIG_KEY, TOKENS_KEY, AttentionCalls, PatchError, patched_image_tokens


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
        return {TOKENS_KEY: (int(context.shape[1]), patched_image_tokens(args[0], int(getattr(model, "patch_size", 2))))}

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
        image = patched_image_tokens(x, int(model.patch_size))
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
        image = patched_image_tokens(value["x"], int(model.patch_size))
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


