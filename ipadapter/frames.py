"""Per-frame decoupled cross-attention (IP-Adapter, Ye et al. 2023), in plain torch.

    out = Attention(q, K_text, V_text) + weight * Attention(q, to_k_ip(tokens_j), to_v_ip(tokens_j))

where row j of every cond/uncond chunk of the model batch gets the image tokens of frame j.
"""
from __future__ import annotations

import torch

from ..common.attention import multihead_attention
from ..common.errors import StoryDiffusionError


class FrameCountError(StoryDiffusionError):
    """The number of embeddings does not match the number of latent frames."""


def route_frames(cond: torch.Tensor, uncond: torch.Tensor, cond_or_uncond, rows: int,
                 frame_indices=None) -> torch.Tensor:
    """Per-row image tokens for a model batch laid out as chunks of the latent batch.

    The batch is `len(cond_or_uncond)` chunks of B frames each; row c*B + j is frame j of chunk c,
    so it gets `cond[j]`, or `uncond[j]` when chunk c is a negative pass. A chunk is named by its role
    ("positive", "negative", "middle": DualCFGGuider's chunks are negative, middle, positive) or, as
    in ComfyUI's CFG `cond_or_uncond`, by 0 (positive) / 1 (negative). One embedding is shared by
    every frame. `frame_indices` selects frames of a longer sequence (AnimateDiff context windows).
    """
    chunks = len(cond_or_uncond)
    if chunks == 0 or rows % chunks:
        raise ValueError(f"model batch of {rows} rows cannot be split into {chunks} cond/uncond chunks")
    frames = rows // chunks
    count = cond.shape[0]
    if frame_indices is not None and count > 1 and count != frames:
        index = torch.as_tensor(list(frame_indices), dtype=torch.long, device=cond.device)
        if len(index) == frames and int(index.max()) < count:
            cond, uncond = cond[index], uncond[index]
            count = frames
    if count == 1 and frames > 1:
        cond, uncond = cond.expand(frames, *cond.shape[1:]), uncond.expand(frames, *uncond.shape[1:])
    elif count != frames:
        raise FrameCountError(
            f"Per-frame conditioning got {count} embeddings but the latent batch has {frames} frames: give one "
            f"embedding per frame (same batch size as the latent) or a single embedding for all frames.")
    negative = [c == "negative" if isinstance(c, str) else int(c) == 1 for c in cond_or_uncond]
    return torch.cat([uncond if n else cond for n in negative], dim=0)


def image_attention(q: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor, heads: int, attention=multihead_attention):
    """The IP branch of decoupled cross-attention: the same query attends to the image tokens."""
    return attention(q, k_ip, v_ip, heads)


def decoupled_cross_attention(q, k_text, v_text, k_ip, v_ip, heads: int, weight: float, attention=multihead_attention):
    """out = Attention(q, K_text, V_text) + weight * Attention(q, K_ip, V_ip)  (IP-Adapter, Ye et al. 2023)."""
    out = attention(q, k_text, v_text, heads)
    if weight == 0:
        return out
    return out + weight * image_attention(q, k_ip, v_ip, heads, attention)


def zero_embeddings_like(embeds: torch.Tensor) -> torch.Tensor:
    """IP-Adapter's unconditional image input: zeros (its training drops the image that way)."""
    return torch.zeros_like(embeds)
