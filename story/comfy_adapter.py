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

That argument holds for CLIP conds (77-token chunks) feeding UNet cross-attention only. The DiT
families' token-level encoders (T5-XXL of Flux/Chroma/SD3, Qwen2.5-VL, Qwen3, Gemma-2, Mistral-3)
give one cond token per prompt token, and the DiTs use joint attention (image queries over text and
image keys), where duplicated text tokens do change the result. Panels of such encoders that come out
shorter than the longest one are therefore re-encoded with the encoder's *own* padding: the same
prompt tokenized with the tokenizer's `<key>_min_length` option raised by the missing count, i.e. exactly
core `clip.tokenize(text, tokenizer_options=...)` + `encode_from_tokens_scheduled` (pad tokens on the
tokenizer's side, attention mask zeros over them where the encoder returns a mask). Core ComfyUI never
batches text conds of different lengths for these models (their c_crossattn is a CONDRegular), so no
batch of different-length panels equals the panels sampled one by one; this keeps every row what the
encoder itself produces for that prompt at the batch's length.
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


# tokenizer keys of the CLIP encoders (77-token chunks; conds tiled, never re-padded)
CLIP_TOKEN_KEYS = frozenset({"l", "g", "h", "clip_l", "clip_g", "clip_h"})


def encode_prompt(clip, text: str, tokenizer_options: dict | None = None) -> list:
    """One prompt -> CONDITIONING (a list of [cond, dict]), the same call core CLIPTextEncode makes."""
    if clip is None:
        raise ConditioningError("the clip input is empty: connect the CLIP output of a checkpoint loader "
                                "(the checkpoint may have no text encoder)")
    if tokenizer_options:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text, tokenizer_options=tokenizer_options))
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def token_counts(clip, text: str) -> dict | None:
    """{tokenizer key: token count} of the token-level (non-CLIP) encoders of `clip` for `text`; None when one
    of them gives more than one chunk (its length then cannot be set with `<key>_min_length`)."""
    tokens = clip.tokenize(text)
    if not isinstance(tokens, dict):
        return {}
    keys = [k for k, v in tokens.items() if k not in CLIP_TOKEN_KEYS and v]
    if any(len(tokens[k]) != 1 for k in keys):
        return None
    return {k: len(tokens[k][0]) for k in keys}


def _token_level_key(clip, text: str):
    """(tokenizer key, token count) of the one token-level (non-CLIP) encoder of `clip`, else None."""
    counts = token_counts(clip, text)
    return next(iter(counts.items())) if counts is not None and len(counts) == 1 else None


def pad_like_encoder(clip, text: str, conditioning: list, length: int) -> list | None:
    """`conditioning` of `text` re-encoded with the encoder's own padding up to `length` tokens
    (tokenizer option `<key>_min_length`); None where that cannot give exactly `length`."""
    found = _token_level_key(clip, text)
    if found is None:
        return None
    key, count = found
    missing = length - int(conditioning[0][0].shape[1])
    embedding_key = _embedding_key(clip, key)
    if missing <= 0 or embedding_key is None:
        return None
    padded = encode_prompt(clip, text, {f"{embedding_key}_min_length": count + missing})
    if any(int(c.shape[1]) != length for c, _ in padded):
        return None
    return padded


def _extras_differ(per_panel: list) -> bool:
    """Whether some per-panel tensor of the conditioning extras (e.g. HiDream's Llama states) differs in shape."""
    first = per_panel[0][0][1]
    for entries in per_panel[1:]:
        for key, value in entries[0][1].items():
            other = first.get(key)
            if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
                return True
    return False


def pad_token_keys(clip, prompts: list[str], per_panel: list) -> list:
    """Encoders with several token-level parts (HiDream: T5 as the cond, Llama states as an extra): every panel
    whose token counts are below the longest panel's, key by key, is re-encoded with each tokenizer's own
    padding up to those counts (`<key>_min_length`), so every part has one length across the batch. Panels
    that cannot be padded that way are left as they are (batch_conditioning then says which key differs)."""
    counts = {p: token_counts(clip, p) for p in dict.fromkeys(prompts)}
    if any(c is None for c in counts.values()):
        return per_panel
    keys = set().union(*(c.keys() for c in counts.values()))
    if len(keys) < 2 or any(c.keys() != keys for c in counts.values()):
        return per_panel
    target = {key: max(c[key] for c in counts.values()) for key in keys}
    embedding_keys = {key: _embedding_key(clip, key) for key in keys}
    if any(v is None for v in embedding_keys.values()):
        return per_panel
    options = {f"{embedding_keys[key]}_min_length": n for key, n in target.items()}
    padded = {p: encode_prompt(clip, p, options) for p, c in counts.items() if c != target}
    return [padded.get(p) or entries for p, entries in zip(prompts, per_panel)]


def _embedding_key(clip, key: str):
    """The tokenizer's option prefix (its embedding_key) for the tokens under `key`."""
    tokenizer = getattr(clip, "tokenizer", None)
    inner = getattr(tokenizer, key, None) or getattr(tokenizer, getattr(tokenizer, "clip", ""), None)
    return getattr(inner, "embedding_key", None)


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
        keys = list(dicts[0]) + [k for d in dicts[1:] for k in d if k not in dicts[0]]
        for key in dict.fromkeys(keys):
            values = [d.get(key) for d in dicts]
            if key == "attention_mask" and any(v is None for v in values):
                # encoders drop an all-ones mask (Qwen-Image): give those panels theirs back
                ref = next(v for v in values if v is not None)
                values = [torch.ones((c.shape[0], n), dtype=ref.dtype, device=ref.device) if v is None else v
                          for v, c, n in zip(values, conds, lengths)]
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


# Text encoders whose diffusion model pads every caption itself to a multiple of tokens and cannot take a caption
# mask: Z-Image (NextDiT pad_tokens_multiple 32, comfy/ldm/lumina/model.py patchify_and_embed; ComfyUI 0.3.75 and
# 0.8.0) appends its learned cap_pad_token without extending the mask, and hands the [batch, tokens] 0/1 mask to the
# caption refiner's attention as it is (an additive bias of the wrong shape). Core ComfyUI never sends it one (a
# single prompt's mask is all ones and model_base drops it). So a padded Z-Image story batch is padded to a multiple
# of 32 (nothing left for the model to append) and sent without the mask: the pad tokens stay visible, as the model's
# own cap_pad_token padding is.
CAPTION_MULTIPLES = {"ZImageTokenizer": 32}


def caption_multiple(clip) -> int:
    """The token multiple a padded panel batch of this `clip` must have (1: any length, mask kept)."""
    return CAPTION_MULTIPLES.get(type(getattr(clip, "tokenizer", None)).__name__, 1)


def _without_attention_mask(conditioning: list) -> list:
    return [[cond, {k: v for k, v in options.items() if k != "attention_mask"}] for cond, options in conditioning]


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
    lengths = {int(c[0].shape[1]) for entries in per_panel for c in entries}
    if len(lengths) > 1 and len(per_panel[0]) == 1:
        # token-level encoders (T5 / LLM): pad short panels the encoder's way, not by tiling
        longest = max(lengths)
        longest += (-longest) % caption_multiple(clip)
        padded: dict[str, list | None] = {}
        for prompt, entries in zip(prompts, per_panel):
            if int(entries[0][0].shape[1]) < longest and prompt not in padded:
                padded[prompt] = pad_like_encoder(clip, prompt, entries, longest)
        if padded and all(v is not None for v in padded.values()):
            per_panel = [padded.get(p) or entries for p, entries in zip(prompts, per_panel)]
            if caption_multiple(clip) > 1:
                per_panel = [_without_attention_mask(entries) for entries in per_panel]
    elif len(per_panel[0]) == 1 and _extras_differ(per_panel):
        per_panel = pad_token_keys(clip, prompts, per_panel)
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


def panel_latent(template: dict | None, rows: tuple[int, ...]):
    """One latent row per selected panel with `batch_index` = the panels' story indices, so ComfyUI's samplers
    draw each panel's initial noise by its story index (comfy.sample.prepare_noise keeps row i of the noise of
    a batch of max(index) + 1): a panel starts from the same noise whatever batch, run or machine samples it.
    Without a template, an ExecutionBlocker that stops whatever reads the output with a message saying what to do."""
    if template is None:
        from comfy_execution.graph_utils import ExecutionBlocker

        return ExecutionBlocker("Select Story Panels' latent output needs a latent input: connect Empty Latent Image "
                                "(batch_size 1, the panel size) to its latent input")
    samples = template["samples"]
    if samples.shape[0] != 1:
        raise ConditioningError(f"the latent input holds {samples.shape[0]} latents: connect one (Empty Latent Image "
                                f"with batch_size 1); Select Story Panels makes one per selected panel")
    out = {k: v for k, v in template.items() if k not in ("samples", "batch_index", "noise_mask")}
    out["samples"] = samples.repeat((len(rows),) + (1,) * (samples.ndim - 1))
    out["batch_index"] = [int(r) for r in rows]
    return out
