"""The DiT families Consistent Self-Attention understands: their blocks, default blocks, and where the image
tokens sit in each joint attention of a model call. A DIFFUSION_MODEL wrapper (`DiTTokenLayout`; SD3: "dit"
block replaces) records that layout in the call's transformer_options, where the override
(attention/comfy/dit_override.py) reads it. The wrapper reads the model's `_forward` arguments by *name*
(bound to its signature), never by position: ComfyUI reorders them between releases (Qwen-Image did)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..run import CALLS_KEY, CONFIG_KEY, TOKENS_KEY, AttentionCalls, PatchError, patched_image_tokens

# Flux.1 / Chroma share in single blocks 11-37 of 38 (Story2Board mixes there; CharaConsist shares only in single
# blocks): the later part of the single stack. Other depths (Flux.2: 48 single blocks) keep the same fraction.
FLUX_FIRST_SHARED_SINGLE = 11 / 38


@dataclass(frozen=True)
class DiTFamily:
    """A DiT family whose joint attention the override understands (Flux.1, Flux.2, Chroma: the base class).

    Default blocks: the later single-stream blocks, single 11-37 on Flux.1 and Chroma (Story2Board shares
    there; CharaConsist only in single blocks) — where the layout of the image is settled and identity
    detail is drawn, the DiT counterpart of the UNet's output blocks, where the official code shares. Double
    blocks stay reachable through a custom list ("double 10-18, single 0-37" was this pack's earlier default).

    Flux-like models set transformer_options block_type/block_index themselves and attend over [text, image,
    reference images]; the text may be longer than the prompt (a post_input patch such as USO's style
    reference prepends tokens), so the text is what is left after the image and the trailing reference tokens."""
    name: str

    def __deepcopy__(self, memo):
        return self

    def blocks(self, model) -> list:
        return ([("double", i, 0) for i in range(len(model.double_blocks))]
                + [("single", i, 0) for i in range(len(model.single_blocks))])

    def default_blocks(self, model) -> list:
        first_single = round(len(model.single_blocks) * FLUX_FIRST_SHARED_SINGLE)  # Flux.1: 38 -> 11
        return [key for key in self.blocks(model) if key[0] == "single" and key[1] >= first_single]

    def call_options(self, model, arguments: dict) -> dict:
        """What the DIFFUSION_MODEL wrapper adds to this model call's transformer_options (arguments: the
        model's `_forward` arguments by name). Flux / Chroma / Qwen-Image: (image tokens, reference tokens
        after them); the override derives the text tokens from each call's total."""
        patch = int(getattr(model, "patch_size", 2))
        refs = arguments.get("ref_latents") or ()
        trailing = sum(patched_image_tokens(ref, patch) for ref in refs)
        return {TOKENS_KEY: (patched_image_tokens(arguments["x"], patch), trailing)}

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

    def call_options(self, model, arguments: dict) -> dict:
        x, context = arguments["x"], arguments["context"]
        extra = [name for name in ("ref_latents", "ref_contexts", "siglip_feats") if arguments.get(name)]
        if extra:
            raise PatchError(f"Consistent Self-Attention does not support {self.name} with reference inputs "
                             f"({', '.join(extra)}): their tokens change the layout of every block. Sample without them.")
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
    reference image beside the panel in one token grid and is refused. Default: like Flux, only single blocks —
    the later half of the single stack (HiDream-I1: single 16-31)."""

    def blocks(self, model) -> list:
        return ([("double", i, 0) for i in range(len(model.double_stream_blocks))]
                + [("single", i, 0) for i in range(len(model.single_stream_blocks))])

    def default_blocks(self, model) -> list:
        first_single = len(model.single_stream_blocks) // 2
        return [key for key in self.blocks(model) if key[0] == "single" and key[1] >= first_single]

    def call_options(self, model, arguments: dict) -> dict:
        value = arguments
        if value.get("image_cond") is not None:
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
            listed = AttentionCalls(self.family, calls)
            args = dict(args, transformer_options=dict(options, **{CALLS_KEY: listed}))
            output = self.inner(args, extra) if self.inner is not None else extra["original_block"](args)
            listed.check_all_made()
            return output
        if self.inner is not None:
            return self.inner(args, extra)
        return extra["original_block"](args)


FLUX1 = DiTFamily("Flux.1")
FLUX2 = DiTFamily("Flux.2")  # the same model class (4 position axes, 1x1 patches of a packed latent)
CHROMA = DiTFamily("Chroma")
QWEN_IMAGE = QwenImageFamily("Qwen-Image")
LUMINA2 = LuminaFamily("Lumina 2")
Z_IMAGE = LuminaFamily("Z-Image")  # the same NextDiT class (z_image_modulation)
HIDREAM = HiDreamFamily("HiDream")
SD3 = SD3Family("SD3")  # no DIFFUSION_MODEL wrapper: SD3BlockLayout replaces
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


def dit_family(model_patcher) -> DiTFamily | None:
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
    images, padding, HiDream's text) are not panel tokens and are never shared.

    After the call it checks that a family with listed attention calls made every one of them: a call that
    never came (a cache or another patch skipped it) shifts every later call onto the wrong block."""

    def __init__(self, family: DiTFamily, signature: inspect.Signature):
        self.family = family
        self.signature = signature  # of the diffusion model's _forward, bound once at patch time
        self.var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError as e:
            raise PatchError(f"StoryDiffusion: this ComfyUI calls the {self.family.name} model with arguments its "
                             f"_forward does not take ({e}): update the pack, or report the ComfyUI version") from None
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop(self.var_keyword, None) or {})
        options = arguments.get("transformer_options")
        if not isinstance(options, dict) or options.get(CONFIG_KEY) is None:
            return executor(*args, **kwargs)
        options = dict(options)
        options.update(self.family.call_options(executor.class_obj, arguments))
        if "transformer_options" in bound.arguments:
            bound.arguments["transformer_options"] = options
            args, kwargs = bound.args, bound.kwargs
        else:  # taken by **kwargs (Lumina 2 on ComfyUI 0.3.75)
            kwargs = dict(kwargs, transformer_options=options)
        output = executor(*args, **kwargs)
        calls = options.get(CALLS_KEY)
        if calls is not None:
            calls.check_all_made()
        return output
