"""The one identity module that speaks ComfyUI: the photomaker folder, SDXL CLIP tokens and
encoding, MODEL LoRA patches, and CONDITIONING with timestep ranges for the delayed merge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fuse import fuse_into_prompt
from .lora import to_comfy_format
from .tokenize import TriggerError, TriggerSpec, count_triggers, expand_class_tokens
from .weights import PhotoMakerModel, load_photomaker

FOLDER = "photomaker"
TOKENIZER_KEYS = {"l": "clip_l", "g": "clip_g"}  # ComfyUI's SDXL token dict keys -> tokenizer attributes


@dataclass(frozen=True)
class Reference:
    """One character's reference photos bound to a trigger word (name '' = applies to every prompt)."""

    name: str
    images: torch.Tensor  # IMAGE [N, H, W, C]
    trigger: str


@dataclass(frozen=True)
class PromptJob:
    text: str
    where: str  # for error messages, e.g. "panel 2 (line 4)"
    references: tuple  # the References that may fuse into this prompt
    require_trigger: bool  # a single text prompt must carry a trigger; story panels may pass through


# ---------------------------------------------------------------------------------------------------
# loading


def photomaker_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(FOLDER)


def load_from_folder(name: str) -> PhotoMakerModel:
    import folder_paths

    return load_photomaker(folder_paths.get_full_path_or_raise(FOLDER, name))


def apply_lora(model, photomaker: PhotoMakerModel, strength: float):
    """A clone of `model` with the file's UNet LoRA patched in at `strength` (the input is untouched)."""
    import comfy.lora

    if not photomaker.lora:
        raise ValueError(f"{photomaker.name or 'this PhotoMaker file'} has no lora_weights to apply.")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    missing = sorted(base for base in photomaker.lora if base not in key_map)
    if missing:
        raise ValueError(f"the PhotoMaker LoRA targets {len(missing)} of its {len(photomaker.lora)} layers that this "
                         f"MODEL does not have (e.g. {missing[:3]}): PhotoMaker v1 needs an SDXL model.")
    patches = comfy.lora.load_lora(to_comfy_format(photomaker.lora), key_map, log_missing=False)
    patched = model.clone()
    patched.add_patches(patches, strength)
    return patched


# ---------------------------------------------------------------------------------------------------
# encoding


def check_sdxl_clip(clip) -> None:
    tokenizer = getattr(clip, "tokenizer", None)
    if not all(hasattr(tokenizer, attr) for attr in TOKENIZER_KEYS.values()):
        raise ValueError(f"PhotoMaker v1 is SDXL-only: connect an SDXL CLIP (CLIP-L + CLIP-G); this CLIP has a "
                         f"{type(tokenizer).__name__}.")


def trigger_token_ids(clip, key: str, word: str) -> tuple:
    word = word.strip()
    if not word or len(word.split()) != 1:
        raise TriggerError(f"the trigger word must be one word (such as 'img'), got {word!r}.")
    sub = getattr(clip.tokenizer, TOKENIZER_KEYS[key])
    ids = sub.tokenizer(word)["input_ids"]
    return tuple(ids[sub.tokens_start:-1] if sub.tokenizer_adds_end_token else ids[sub.tokens_start:])


def id_embeddings(photomaker: PhotoMakerModel, images: torch.Tensor) -> torch.Tensor:
    """ID embeddings [N, D] of one reference batch, computed on the text-encoder device."""
    import comfy.model_management as mm

    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("the reference IMAGE batch is empty: connect 1 or more photos of the person.")
    encoder = photomaker.encoder
    device = mm.text_encoder_device()
    encoder.to(device)
    try:
        return encoder.encode_images(images.to(device)).float().cpu()
    finally:
        encoder.to(mm.text_encoder_offload_device())


def encode_prompt(clip, photomaker: PhotoMakerModel, job: PromptJob, id_cache: dict):
    """One prompt -> (text-only cond, pooled), (fused cond, pooled). Panels with no trigger: both the same."""
    tokens = clip.tokenize(job.text, return_word_ids=True)
    if set(tokens) != set(TOKENIZER_KEYS):
        raise ValueError(f"PhotoMaker v1 is SDXL-only: the CLIP gave token streams {sorted(tokens)}, not l and g.")
    refs = list(job.references)
    fused_tokens, text_tokens, positions = {}, {}, None
    for key, chunks in tokens.items():
        specs = [TriggerSpec(r.trigger, trigger_token_ids(clip, key, r.trigger), int(r.images.shape[0])) for r in refs]
        present = [s for s in specs if count_triggers(chunks, s.token_ids) > 0]
        if not present and job.require_trigger:
            words = sorted({r.trigger for r in refs})
            raise TriggerError(f"{job.where} has no trigger word {' / '.join(map(repr, words))}: write it right after "
                               f"the class word, e.g. 'a photo of a man {words[0]}'.")
        pad = getattr(clip.tokenizer, TOKENIZER_KEYS[key]).pad_token
        fused = expand_class_tokens(chunks, specs, pad, job.where)
        plain = expand_class_tokens(chunks, [TriggerSpec(s.word, s.token_ids, 1) for s in specs],
                                    pad, job.where)
        fused_tokens[key], text_tokens[key] = fused.chunks, plain.chunks
        if positions is None:
            positions = fused.positions
        elif positions != fused.positions:
            raise TriggerError(f"CLIP-L and CLIP-G disagree on where the class word is in {job.where}.")
    text_cond, text_pooled = clip.encode_from_tokens(text_tokens, return_pooled=True)
    if not any(positions):
        return (text_cond, text_pooled), (text_cond, text_pooled)
    cond, pooled = clip.encode_from_tokens(fused_tokens, return_pooled=True)
    flat = cond[0]
    for ref, where in zip(refs, positions):
        if where:
            key = id(ref)
            if key not in id_cache:
                id_cache[key] = id_embeddings(photomaker, ref.images)
            flat = fuse_into_prompt(photomaker.encoder.fuse_module, flat, where, id_cache[key])
    return (text_cond, text_pooled), (flat.unsqueeze(0), pooled)


def encode(clip, photomaker: PhotoMakerModel, jobs: list[PromptJob], start_merge: float) -> list:
    """CONDITIONING for a batch of prompts (one row per prompt), with the delayed merge as ranges.

    start_merge = 0 -> one entry (fused); 1 -> text only; otherwise text-only on [0, start_merge]
    and fused on [start_merge, 1] of the sampling schedule, which every sampler honours.
    """
    check_sdxl_clip(clip)
    if not 0.0 <= start_merge <= 1.0:
        raise ValueError(f"start_merge is a fraction of the steps, 0..1; got {start_merge}.")
    id_cache: dict = {}  # per call: each character's photos go through the ViT once
    texts, fuseds = [], []
    for job in jobs:
        text, fused = encode_prompt(clip, photomaker, job, id_cache)
        texts.append(text)
        fuseds.append(fused)
    text_cond, text_pooled = _stack(texts)
    fused_cond, fused_pooled = _stack(fuseds)
    if start_merge <= 0.0:
        return [[fused_cond, {"pooled_output": fused_pooled}]]
    if start_merge >= 1.0:
        return [[text_cond, {"pooled_output": text_pooled}]]
    return [[text_cond, {"pooled_output": text_pooled, "start_percent": 0.0, "end_percent": float(start_merge)}],
            [fused_cond, {"pooled_output": fused_pooled, "start_percent": float(start_merge), "end_percent": 1.0}]]


def _stack(pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt [1, T_i, D] conds -> [B, T, D]: longer prompts are 77-token multiples, so repeat to
    the least common length (what ComfyUI itself does when it batches conds of different lengths)."""
    length = math.lcm(*[c.shape[1] for c, _ in pairs])
    conds = [c.repeat(1, length // c.shape[1], 1) for c, _ in pairs]
    return torch.cat(conds, dim=0), torch.cat([p for _, p in pairs], dim=0)
