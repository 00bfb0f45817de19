"""The one module of motion/ that speaks ComfyUI; everything else in motion/ is plain torch.

Three sections, one per feature:
- Semantic Motion Predictor: the `storydiffusion` model folder, CLIP_VISION encoding and
  CLIP_VISION_OUTPUT values, finding ComfyUI for the training command line (the model,
  interpolation and training are in predictor.py, interpolate.py, train.py).
- Per-frame IP-Adapter conditioning: the `ipadapter` model folder, mapping the file's layers to the
  model's attn2 blocks, the attn2 replace patch (the math is in ipadapter.py).
- Video files: output paths with ComfyUI's counter, progress bar, VIDEO values (joining and
  encoding are in video.py).

IP-Adapter hook:  every cross-attention (attn2) of the UNet gets an attn2 *replace* patch. ComfyUI
hands it q = to_q(x) and the projected text k/v and applies `to_out` afterwards, so the patch
returns Attention(q, k_text, v_text) + weight * Attention(q, to_k_ip(tokens_j), to_v_ip(tokens_j))
with the image tokens of frame j in row j of every cond/uncond chunk. A replace patch that was
already installed for the same block (another IP-Adapter, a regional-prompt pack, …) still computes
the text part: ours wraps it. Self-attention (attn1) patches, such as the consistent self-attention
patch of this pack, are untouched, so both compose.

Layer mapping: the file numbers its cross-attentions in diffusers module order — down blocks, up
blocks, mid block, each transformer stack in depth order. ComfyUI's blocks in the same order are
input blocks (ascending), output blocks (ascending), the middle block; we read them off the model
itself, so SD1.5 (16 layers), SDXL (70) and narrower test models map the same way.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch

from .encode import FIELD_OF_KIND, adjacent_pairs, embeds_layout, tokens_of
from .interpolate import interpolate
from .ipadapter import (IPAdapter, IPAdapterFormatError, family_name, group_state_dict, image_attention,
                        load_ipadapter_file, route_frames)
from .predictor import (SemanticMotionPredictor, check_compatible, load_predictor, looks_like_predictor_file,
                        predict_transition)
from .video import VideoError



# ===================================================================================================
# Semantic Motion Predictor
# ===================================================================================================

PREDICTOR_FOLDER = "storydiffusion"
NONE = "none"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# model folder


def ensure_model_folder() -> None:
    """Register models/storydiffusion with ComfyUI (extra_model_paths.yaml may add more paths to it)."""
    import folder_paths

    if PREDICTOR_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[PREDICTOR_FOLDER] = ([os.path.join(folder_paths.models_dir, PREDICTOR_FOLDER)], {".safetensors"})


def predictor_filenames() -> list[str]:
    import folder_paths

    ensure_model_folder()
    return [n for n in folder_paths.get_filename_list(PREDICTOR_FOLDER) if n.lower().endswith(".safetensors")
            and looks_like_predictor_file(folder_paths.get_full_path(PREDICTOR_FOLDER, n))]


@dataclass(frozen=True)
class LoadedPredictor:
    """The value of a predictor socket: a model, or None for training-free interpolation."""

    name: str
    model: SemanticMotionPredictor | None

    def __deepcopy__(self, memo):  # immutable in use; never copy the weights
        return self


def load_predictor_by_name(name: str) -> LoadedPredictor:
    import folder_paths

    if name == NONE:
        return LoadedPredictor(NONE, None)
    ensure_model_folder()
    path = folder_paths.get_full_path(PREDICTOR_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"Motion predictor '{name}' is not in the {PREDICTOR_FOLDER} model folder "
                                f"({', '.join(folder_paths.get_folder_paths(PREDICTOR_FOLDER))}): put the .safetensors file "
                                "there and refresh, or choose 'none'.")
    import comfy.model_management

    return LoadedPredictor(name, load_predictor(path, comfy.model_management.get_torch_device()))


# ---------------------------------------------------------------------------------------------------
# CLIP vision


def encode_images(clip_vision, images: torch.Tensor, crop: bool = True):
    """ComfyUI's own CLIP vision preprocessing + forward: an Output with image_embeds,
    penultimate_hidden_states and last_hidden_state (any image size: it resizes and crops)."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"Expected an IMAGE batch [N, H, W, 3], got shape {tuple(images.shape)}.")
    return clip_vision.encode_image(images, crop=crop)


def _fields(output) -> dict[str, torch.Tensor]:
    found = {}
    for name in ("image_embeds", "penultimate_hidden_states", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            found[name] = value.float()
    return found


def predict_motion(clip_vision, start: torch.Tensor, end: torch.Tensor | None, frames: int, mode: str,
                   kind: str, predictor: LoadedPredictor | None, crop: bool = True):
    """Per-frame embeddings for every transition -> (CLIP_VISION_OUTPUT, EMBEDS, transitions).

    `end` None: `start` is a batch of panels and every adjacent pair is a transition. Otherwise
    start[i] -> end[i] (a single start or end image is paired with every image of the other).
    Transitions are concatenated, `frames` frames each. The `kind` field comes from the predictor
    (or the interpolation); the other fields of the CLIP_VISION_OUTPUT are interpolated the same way,
    so nodes that read them still get one entry per frame.
    """
    import comfy.clip_vision

    if frames < 2:
        raise ValueError(f"frames must be at least 2 (start and end), got {frames}.")
    model = predictor.model if predictor is not None else None
    start_fields = _fields(encode_images(clip_vision, start, crop))
    if end is None:
        end_fields, pairs = start_fields, adjacent_pairs(start.shape[0])
    else:  # encoded separately: start and end may differ in size (the CLIP preprocessing resizes each)
        end_fields = _fields(encode_images(clip_vision, end, crop))
        n_start, n_end = start.shape[0], end.shape[0]
        if n_start != n_end and 1 not in (n_start, n_end):
            raise ValueError(f"start has {n_start} images and end has {n_end}: give the same number, a single "
                             "image on one side, or leave end empty to use adjacent panels of start.")
        count = max(n_start, n_end)
        pairs = [(min(i, n_start - 1), min(i, n_end - 1)) for i in range(count)]

    key = FIELD_OF_KIND[kind]
    if key not in start_fields:
        raise ValueError(f"The CLIP vision model gives no {key}; choose the other embedding kind.")
    as_tokens = (lambda v: v.unsqueeze(1)) if kind == "pooled" else (lambda v: v)
    tokens_start, tokens_end = as_tokens(start_fields[key]), as_tokens(end_fields[key])
    if model is not None:
        check_compatible(model.config, tokens_start.shape[1], tokens_start.shape[2], kind)

    predicted = torch.cat([predict_transition(tokens_start[i], tokens_end[j], frames, mode, model) for i, j in pairs])
    out = comfy.clip_vision.Output()
    for name, value in start_fields.items():
        if name == key:
            out[name] = embeds_layout(predicted, kind)
            continue
        squeeze = value.ndim == 2
        a, b = (value.unsqueeze(1), end_fields[name].unsqueeze(1)) if squeeze else (value, end_fields[name])
        path = torch.cat([interpolate(a[i], b[j], frames, mode) for i, j in pairs])
        out[name] = path[:, 0] if squeeze else path
    out["mm_projected"] = None
    return out, embeds_layout(predicted, kind), len(pairs)


# ---------------------------------------------------------------------------------------------------
# training command line: find ComfyUI and load a CLIP vision file with its loader


def import_comfy(comfyui_path: str | None = None, cpu: bool = False) -> None:
    """Make `comfy` importable: an explicit path, $COMFYUI_PATH, or the ComfyUI this pack is installed in
    (custom_nodes/<pack>/../..). `cpu` (or no CUDA) = ComfyUI's --cpu, set before it picks a device."""
    if "comfy.model_management" in sys.modules:  # already running inside ComfyUI
        return
    for path in (comfyui_path, os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(PACK_ROOT))):
        if path and os.path.isfile(os.path.join(path, "comfy", "clip_vision.py")):
            if os.path.abspath(path) not in sys.path:
                sys.path.insert(0, os.path.abspath(path))
            break
    try:
        import comfy.cli_args
    except ImportError:
        raise RuntimeError("Cannot find ComfyUI (needed to load the CLIP vision model): run from "
                           "ComfyUI/custom_nodes/<this pack>, set COMFYUI_PATH, or pass --comfyui PATH.") from None
    if cpu or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.clip_vision  # noqa: F401


def load_clip_vision_file(path: str):
    """A CLIP vision file as ComfyUI loads it (same preprocessing and outputs as CLIPVisionLoader)."""
    import comfy.clip_vision

    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP vision file not found: {path}")
    model = comfy.clip_vision.load(path)
    if model is None:
        raise ValueError(f"{os.path.basename(path)} is not a CLIP vision model ComfyUI recognises "
                         "(use the file you load with 'Load CLIP Vision', e.g. CLIP-ViT-H-14-laion2B-s32B-b79K).")
    return model


def clip_vision_encoder(clip_vision, kind: str, crop: bool = True):
    """images [N, H, W, 3] in 0..1 -> [N, T, D] embeddings of `kind` (what train.py caches)."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tokens_of(encode_images(clip_vision, images, crop), kind).cpu()

    return encode


# ---------------------------------------------------------------------------------------------------
# training from a node


def train_into_model_folder(clip_vision, videos: str, name: str, options, resume: bool = True):
    """Train on a folder of videos and write models/storydiffusion/<name>.safetensors (with a ComfyUI
    progress bar); returns (LoadedPredictor, TrainResult)."""
    import comfy.model_management
    import comfy.utils
    import folder_paths

    from .train import train

    name = name.strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"Invalid predictor name {name!r}: give a plain file name such as 'my_motion'.")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    ensure_model_folder()
    folder = folder_paths.get_folder_paths(PREDICTOR_FOLDER)[0]
    out = os.path.join(folder, name)
    options.device = str(comfy.model_management.get_torch_device())
    bar = comfy.utils.ProgressBar(options.steps)
    result = train(videos, clip_vision_encoder(clip_vision, options.kind), out, options,
                   encoder_tag=f"{type(clip_vision.model).__name__}:{_weights_tag(clip_vision)}",
                   resume=resume, progress=lambda step, total, loss: bar.update_absolute(step, total))
    return LoadedPredictor(name, load_predictor(out)), result


def _weights_tag(clip_vision) -> str:
    """A cheap fingerprint of the CLIP vision weights, so cached embeddings never mix two models."""
    import hashlib

    h = hashlib.sha1()
    for key, value in sorted(clip_vision.model.state_dict().items())[:8]:
        h.update(key.encode())
        h.update(value.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]

# ===================================================================================================
# Per-frame IP-Adapter conditioning
# ===================================================================================================

IPADAPTER_FOLDER = "ipadapter"


# ---------------------------------------------------------------------------------------------------
# model folder


def ensure_ipadapter_folder() -> None:
    """ComfyUI knows no `ipadapter` folder by itself: register models/ipadapter (as IPAdapter_plus does)."""
    import folder_paths

    if IPADAPTER_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[IPADAPTER_FOLDER] = ([os.path.join(folder_paths.models_dir, IPADAPTER_FOLDER)],
                                                       folder_paths.supported_pt_extensions)


def ipadapter_filenames() -> list[str]:
    import folder_paths

    ensure_ipadapter_folder()
    return folder_paths.get_filename_list(IPADAPTER_FOLDER)


def load_ipadapter(name: str) -> dict:
    """Nested {"image_proj", "ip_adapter"} state dict of a file in models/ipadapter (validated)."""
    import folder_paths

    ensure_ipadapter_folder()
    path = folder_paths.get_full_path(IPADAPTER_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"IP-Adapter file '{name}' is not in the ipadapter model folder "
                                f"({', '.join(folder_paths.get_folder_paths(IPADAPTER_FOLDER))}).")
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

    def to(self, target) -> "FrameTokens":
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
                 sigma_start: float, sigma_end: float, previous=None):
        self.to_k_ip, self.to_v_ip, self.tokens = to_k_ip, to_v_ip, tokens
        self.weight, self.sigma_start, self.sigma_end = float(weight), float(sigma_start), float(sigma_end)
        self.previous = previous  # an attn2 replace that was installed before ours: it computes the text part

    def __deepcopy__(self, memo):
        return self

    def to(self, target):
        previous = self.previous.to(target) if hasattr(self.previous, "to") else self.previous
        return PerFrameIPAttention(self.to_k_ip.to(target), self.to_v_ip.to(target), self.tokens.to(target),
                                   self.weight, self.sigma_start, self.sigma_end, previous)

    def active(self, extra_options) -> bool:
        if self.weight == 0:
            return False
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules import attention as comfy_attention

        def attention(q_, k_, v_, heads):
            return comfy_attention.optimized_attention(q_, k_, v_, heads, attn_precision=extra_options.get("attn_precision"),
                                                       transformer_options=extra_options)

        heads = extra_options["n_heads"]
        out = self.previous(q, k, v, extra_options) if self.previous is not None else attention(q, k, v, heads)
        if not self.active(extra_options):
            return out
        dtype, device = q.dtype, q.device
        ad_params = extra_options.get("ad_params") or {}
        tokens = route_frames(self.tokens.cond.to(device, dtype), self.tokens.uncond.to(device, dtype),
                              extra_options["cond_or_uncond"], q.shape[0], ad_params.get("sub_idxs"))
        k_ip = torch.nn.functional.linear(tokens, self.to_k_ip.to(device, dtype))
        v_ip = torch.nn.functional.linear(tokens, self.to_v_ip.to(device, dtype))
        return out + self.weight * image_attention(q, k_ip, v_ip, heads, attention).to(out.dtype)


def apply_per_frame_ipadapter(model, ipadapter: dict, embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                              weight: float, start_percent: float, end_percent: float):
    """A clone of `model` whose latent frame j cross-attends to the image tokens of `embeds[j]`.

    `negative_embeds` feed the uncond chunks; by default zeros (IP-Adapter's own negative, which is
    how it drops the image during training), so CFG pushes towards the image.
    """
    adapter = IPAdapter(unwrap_ipadapter(ipadapter))
    sites = cross_attention_sites(model)
    check_ipadapter_fits(adapter, sites)
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in [0, 1].")
    if negative_embeds is None:
        negative_embeds = torch.zeros_like(embeds)
    if negative_embeds.shape[1:] != embeds.shape[1:]:
        raise ValueError(f"negative embeddings {tuple(negative_embeds.shape)} do not match the embeddings {tuple(embeds.shape)}.")
    if negative_embeds.shape[0] not in (1, embeds.shape[0]):
        raise ValueError(f"give one negative embedding or one per frame ({embeds.shape[0]}), not {negative_embeds.shape[0]}.")
    cond = adapter.project(embeds)
    uncond = adapter.project(negative_embeds).expand(cond.shape[0], -1, -1).contiguous()
    tokens = FrameTokens(cond, uncond)

    sampling = model.get_model_object("model_sampling")
    sigma_start, sigma_end = sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)

    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for site, (to_k_ip, to_v_ip) in zip(sites, adapter.kv_weights):
        previous = existing.get(site.key, existing.get(site.key[:2]))
        patch = PerFrameIPAttention(to_k_ip, to_v_ip, tokens, weight, sigma_start, sigma_end, previous)
        patched.set_model_attn2_replace(patch, site.key[0], site.key[1], site.key[2])
    return patched

# ===================================================================================================
# Video files
# ===================================================================================================

def output_path(filename_prefix: str, extension: str, width: int, height: int) -> tuple[str, str, str]:
    """(full path, file name, subfolder) in ComfyUI's output folder: `<prefix>_00001_.<ext>`, counter increasing.

    The counter follows core SaveImage/SaveVideo naming, so files from every node share one sequence.
    """
    import folder_paths

    prefix = (filename_prefix or "").strip() or "StoryDiffusion/video"
    try:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, folder_paths.get_output_directory(), width, height)
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise VideoError(f"cannot create the output folder for prefix {prefix!r}: {e.strerror or e}. "
                         f"Use a filename_prefix whose folders can be created inside ComfyUI's output folder.") from e
    except Exception as e:  # get_save_image_path refuses prefixes that leave the output folder
        raise VideoError(f"filename_prefix {prefix!r} is not allowed: it must stay inside ComfyUI's output folder "
                         f"(no '..' or absolute paths).") from e
    file = f"{name}_{counter:05}_.{extension}"
    return os.path.join(folder, file), file, subfolder


def saved_metadata(prompt: Optional[dict], extra_pnginfo: Optional[dict]) -> dict:
    """Workflow and prompt as container tags (like core SaveVideo), unless ComfyUI runs --disable-metadata."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return {}
    tags = {}
    if prompt is not None:
        tags["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        tags[key] = json.dumps(value)
    return tags


def progress_bar(total: int):
    """A callback `on_frame(n)` that moves ComfyUI's progress bar for the running node."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)
    return lambda done: bar.update_absolute(done, total)


def video_from_file(path: str):
    """A VIDEO that core SaveVideo / GetVideoComponents read back from the written file."""
    from comfy_api.latest import InputImpl

    return InputImpl.VideoFromFile(path)


def video_from_frames(images: torch.Tensor, fps: float):
    """A VIDEO made of frames in memory (for files FFmpeg cannot decode back, e.g. animated webp)."""
    from comfy_api.latest import InputImpl, Types

    return InputImpl.VideoFromComponents(
        Types.VideoComponents(images=images, frame_rate=Fraction(round(fps * 1000), 1000)))
