"""Training-free in-betweens: interpolate CLIP image embeddings from a start frame to an end frame.

This is the Semantic Motion Predictor's starting point (the paper interpolates linearly, then
refines with a transformer) and the pack's default when no trained predictor is loaded.

Embeddings are token sequences `[T, D]` (T = 1 for pooled `image_embeds`, 257 for ViT-H
penultimate hidden states); a pooled `[D]` vector is accepted too. Each token is interpolated on
its own, so frame j of L gets `interp(start[t], end[t], j / (L - 1))` for every token t.
"""
from __future__ import annotations

import torch

MODES = ("linear", "slerp")


def frame_times(frames: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The interpolation time of each of `frames` frames: 0 for the start frame, 1 for the end frame."""
    if frames < 2:
        raise ValueError(f"A transition needs at least 2 frames (start and end), got {frames}.")
    return torch.linspace(0.0, 1.0, frames, dtype=dtype, device=device)


def _as_tokens(x: torch.Tensor, name: str) -> torch.Tensor:
    """[D] -> [1, D]; [..., T, D] stays; the frame axis is then inserted at -3."""
    if x.ndim == 0:
        raise ValueError(f"{name} must be one embedding [D] or a token sequence [T, D], got a scalar.")
    return x.unsqueeze(0) if x.ndim == 1 else x


def lerp(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """Linear interpolation -> [frames, T, D]."""
    a, b = _as_tokens(start, "start").unsqueeze(-3), _as_tokens(end, "end").unsqueeze(-3)
    t = frame_times(frames, a.dtype, a.device).view(-1, 1, 1)
    return _pin_ends(a + t * (b - a), a, b)


def slerp(start: torch.Tensor, end: torch.Tensor, frames: int, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of each token's direction, linear interpolation of its length.

    CLIP embeddings are compared by angle, and a straight line between two of them passes through
    shorter vectors that no real image produces; slerp stays on the sphere. Near-parallel tokens
    (angle ~ 0) fall back to linear interpolation, where slerp's sin(angle) division is unstable.
    """
    a, b = _as_tokens(start, "start").unsqueeze(-3), _as_tokens(end, "end").unsqueeze(-3)
    t = frame_times(frames, a.dtype, a.device).view(-1, 1, 1)
    norm_a = a.norm(dim=-1, keepdim=True)
    norm_b = b.norm(dim=-1, keepdim=True)
    unit_a = a / norm_a.clamp_min(eps)
    unit_b = b / norm_b.clamp_min(eps)
    cos = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    parallel = sin.abs() < 1e-4
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * angle) / safe_sin)
    wb = torch.where(parallel, t, torch.sin(t * angle) / safe_sin)
    direction = wa * unit_a + wb * unit_b
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    length = norm_a + t * (norm_b - norm_a)
    return _pin_ends(direction * length, a, b)


def _pin_ends(seq: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The first and last frames are the encoded panels themselves, bit for bit."""
    seq = seq.clone()
    seq[..., 0, :, :] = a[..., 0, :, :]
    seq[..., -1, :, :] = b[..., 0, :, :]
    return seq


def interpolate(start: torch.Tensor, end: torch.Tensor, frames: int, mode: str = "linear") -> torch.Tensor:
    """[T, D] (or [D]) start and end -> [frames, T, D] with `mode` in MODES.

    Batched pairs [B, T, D] give [B, frames, T, D] (training interpolates many clips at once)."""
    if start.shape != end.shape:
        raise ValueError(f"Start and end embeddings differ in shape ({tuple(start.shape)} vs {tuple(end.shape)}): "
                         "encode both frames with the same CLIP vision model.")
    if mode == "linear":
        return lerp(start, end, frames)
    if mode == "slerp":
        return slerp(start, end, frames)
    raise ValueError(f"Unknown interpolation {mode!r}: use one of {', '.join(MODES)}.")
