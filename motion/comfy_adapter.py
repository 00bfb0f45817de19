"""The one module of motion/ that speaks ComfyUI: the predictor's model folder, CLIP_VISION encoding
and CLIP_VISION_OUTPUT values, finding ComfyUI for the training command line, and training from a
node (the model, interpolation and training loop are plain torch: predictor.py, interpolate.py,
train.py).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from ..common import comfy_adapter as glue
from .embeds import FIELD_OF_KIND, adjacent_pairs, embeds_layout, tokens_of
from .interpolate import interpolate
from .predictor import (
    SemanticMotionPredictor,
    check_compatible,
    load_predictor,
    looks_like_predictor_file,
    predict_transition,
)

PREDICTOR_FOLDER = "storydiffusion"  # shared with identity banks: each loader lists only its own files
EXTENSIONS = (".safetensors",)
NONE = "none"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# model folder


def predictor_filenames() -> list[str]:
    return glue.model_files(PREDICTOR_FOLDER, EXTENSIONS, looks_like_predictor_file)


@dataclass(frozen=True)
class LoadedPredictor:
    """The value of a predictor socket: a model, or None for training-free interpolation."""

    name: str
    model: SemanticMotionPredictor | None

    def __deepcopy__(self, memo):  # immutable in use; never copy the weights
        return self


def load_predictor_by_name(name: str) -> LoadedPredictor:
    if name == NONE:
        return LoadedPredictor(NONE, None)
    path = glue.model_file_path(PREDICTOR_FOLDER, name, EXTENSIONS)
    if path is None:
        raise FileNotFoundError(f"Motion predictor '{name}' is not in the {PREDICTOR_FOLDER} model folder "
                                f"({', '.join(glue.model_folder(PREDICTOR_FOLDER, EXTENSIONS))}): put the .safetensors file "
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
    import comfy.clip_vision  # imported once the device is set (it imports comfy.model_management)


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

    from .training import train

    name = name.strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"Invalid predictor name {name!r}: give a plain file name such as 'my_motion'.")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    folder = glue.model_folder(PREDICTOR_FOLDER, EXTENSIONS)[0]
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
