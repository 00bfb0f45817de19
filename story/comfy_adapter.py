"""ComfyUI adapter of the story package: encode one prompt per panel into one batched CONDITIONING.

Each panel is encoded exactly as core CLIPTextEncode does (`clip.tokenize` +
`clip.encode_from_tokens_scheduled`), so prompt weighting, embeddings, LoRA hooks and long prompts
behave as in core. The per-panel results are stacked into tensors with batch N; ComfyUI then hands
row i of every tensor to latent i (comfy.conds repeats/narrows conds to the latent batch).

Panels whose prompts need different numbers of 77-token chunks give conds of different lengths.
They are brought to a common length by *tiling* each cond (a 77-token cond becomes 154 tokens by
repeating itself), never by appending other tokens: cross-attention over keys/values that are all
duplicated the same number of times is exactly the same softmax average, so every panel still
attends to what it would alone. ComfyUI's own CONDCrossAttn.concat pads the same way.
"""
from __future__ import annotations

import math

import torch

from ..common.errors import StoryDiffusionError

# Tiling multiplies a short cond up to the least common multiple of all lengths; past this many
# 77-token chunks cross-attention gets needlessly expensive, so the user is asked to even out prompts.
MAX_COMMON_CHUNKS = 12


class ConditioningError(StoryDiffusionError):
    pass


def encode_prompt(clip, text: str) -> list:
    """One prompt -> CONDITIONING (a list of [cond, dict]), the same call core CLIPTextEncode makes."""
    if clip is None:
        raise ConditioningError("the clip input is empty: connect the CLIP output of a checkpoint loader "
                                "(the checkpoint may have no text encoder)")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _tile_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    return tensor if tensor.shape[1] == length else tensor.repeat(1, length // tensor.shape[1], *[1] * (tensor.ndim - 2))


def common_token_length(lengths: list[int], lines: list[int] | None = None) -> int:
    """The shortest length every cond tiles to exactly (their lcm); error if that is unreasonably long."""
    common = math.lcm(*lengths)
    if common > max(lengths) and common > MAX_COMMON_CHUNKS * 77:
        described = ", ".join(
            f"line {line}: {n} tokens" for line, n in zip(lines or range(1, len(lengths) + 1), lengths))
        raise ConditioningError(
            f"panel prompts have token lengths that only line up at {common} tokens ({described}). Shorten or "
            f"lengthen the long panel prompts so that each needs 1, 2, 3, 4, 6 or 12 chunks of 75 tokens "
            f"(or all the same number).")
    return common


def batch_conditioning(per_panel: list[list], lines: list[int] | None = None) -> list:
    """N single-prompt CONDITIONINGs -> one CONDITIONING whose tensors have batch N (row i = panel i)."""
    if not per_panel:
        raise ConditioningError("no panels to encode")
    entries = {len(c) for c in per_panel}
    if len(entries) != 1:
        raise ConditioningError("the CLIP hook schedule gave panels different numbers of conditioning entries")
    batched = []
    for k in range(len(per_panel[0])):
        conds = [c[k][0] for c in per_panel]
        dicts = [c[k][1] for c in per_panel]
        lengths = [int(c.shape[1]) for c in conds]
        common = common_token_length(lengths, lines)
        out_cond = torch.cat([_tile_to(c, common) for c in conds], dim=0)
        out_dict = {}
        for key in dicts[0]:
            values = [d.get(key) for d in dicts]
            first = values[0]
            if isinstance(first, torch.Tensor):
                if first.ndim >= 2 and all(v.shape[1] == n for v, n in zip(values, lengths)):
                    values = [_tile_to(v, common) for v in values]  # per-token extras (attention masks)
                if any(not isinstance(v, torch.Tensor) or v.shape[1:] != values[0].shape[1:] for v in values):
                    raise ConditioningError(f"conditioning key {key!r} has different shapes across panels")
                out_dict[key] = torch.cat(values, dim=0)
            else:
                if any(v != first for v in values[1:]):
                    raise ConditioningError(f"conditioning key {key!r} differs across panels; encode them separately")
                out_dict[key] = first
        batched.append([out_cond, out_dict])
    return batched


def repeat_conditioning(conditioning: list, batch: int) -> list:
    """A batch-1 CONDITIONING repeated to batch rows (the shared negative prompt)."""
    out = []
    for cond, extras in conditioning:
        repeated = {k: (v.repeat(batch, *[1] * (v.ndim - 1)) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v)
                    for k, v in extras.items()}
        out.append([cond.repeat(batch, *[1] * (cond.ndim - 1)), repeated])
    return out


def progress_bar(total: int):
    """A plain `progress(done, total)` callback that moves ComfyUI's progress bar of the running node
    (the core modules take such a callback and never import ComfyUI)."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)
    return lambda done, total_now=total: bar.update_absolute(done, total_now)


def encode_panels(clip, prompts: list[str], lines: list[int] | None = None, progress=None) -> list:
    """Prompts -> batched CONDITIONING; identical prompts are encoded once.

    `progress(done, total)`, if given, is called after each panel (e.g. `progress_bar(len(prompts))`)."""
    cache: dict[str, list] = {}
    per_panel = []
    for done, prompt in enumerate(prompts, 1):
        if prompt not in cache:
            cache[prompt] = encode_prompt(clip, prompt)
        per_panel.append(cache[prompt])
        if progress is not None:
            progress(done, len(prompts))
    return batch_conditioning(per_panel, lines)


def select_rows(conditioning: list, rows: list[int]) -> list:
    """The CONDITIONING of some panels of a story batch: row i of every batched tensor, in `rows` order.

    Tensors whose first dimension is the batch (cond, pooled_output, ...) are indexed; everything else
    (timestep ranges, sizes, hooks) is kept. A batch-1 CONDITIONING applies to every panel and is
    returned unchanged.
    """
    out = []
    for cond, options in conditioning:
        batch = cond.shape[0]
        if batch == 1:
            out.append([cond, options])
            continue
        if max(rows) >= batch:
            raise ConditioningError(f"panel {max(rows)} was asked for but this conditioning has {batch} panels")
        index = torch.tensor(rows, dtype=torch.long, device=cond.device)
        picked = {k: (v.index_select(0, index.to(v.device)) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch
                      else v) for k, v in options.items()}
        out.append([cond.index_select(0, index), picked])
    return out
