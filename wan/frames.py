"""Per-latent-frame image tokens for Wan 2.1 I2V / FLF2V, in plain torch.

Wan 2.1's image cross-attention (WanI2VCrossAttention) lets every video token attend to one set of image
tokens: `img_emb(clip_fea)`, the CLIP-vision penultimate tokens of the start frame (I2V, 257 tokens) or
of the start and end frames (FLF2V, 2 x 257, each half with its learned position embedding). Here each
latent frame gets tokens of its own instead:

    latent frame t  ->  the embedding(s) of the video frames it packs  ->  img_emb(...)  ->  k_img / v_img

Wan's VAE packs 4 video frames into one latent frame, the first frame alone: latent frame 0 is frame 0,
latent frame t >= 1 is frames 4t-3 .. 4t, so T latent frames are 4(T-1)+1 video frames. The per-frame
embeddings (the Semantic Motion Predictor's, F of them) are spread over those frames by time (the first
at the first frame, the last at the last; linear in between, exact indices when F = 4(T-1)+1), and a
latent frame takes the mean of its frames' embeddings. Each embedding fills every image slot the
conditioning had (257 tokens: I2V or a start frame only; 514: FLF2V start + end), so the model's own
position embeddings and projection apply unchanged.

The image attention output is blended with the original one by `strength` (0: the original, untouched;
1: only the per-frame tokens). The model was trained with the fixed start/end pair, so any strength
above 0 is off its training distribution.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common.errors import StoryDiffusionError

FRAMES_PER_LATENT = 4  # Wan 2.1 VAE: 4 video frames per latent frame, the first alone


class WanSemanticsError(StoryDiffusionError):
    """The model or the embeddings cannot take per-frame semantics."""


def video_frames(latent_frames: int) -> int:
    """Video frames packed into `latent_frames` Wan latent frames."""
    return FRAMES_PER_LATENT * (latent_frames - 1) + 1


def frames_of_latent(t: int) -> range:
    """The video frames packed into latent frame t."""
    return range(1) if t == 0 else range(FRAMES_PER_LATENT * t - 3, FRAMES_PER_LATENT * t + 1)


def latent_frame_weights(latent_frames: int, embeddings: int) -> torch.Tensor:
    """[T, F] float64 weights, rows summing to 1: latent frame t's embedding = weights[t] @ embeddings.

    Video frame f (of L = 4(T-1)+1) sits at position f (F-1)/(L-1) of the embedding sequence (linear
    interpolation between neighbours); a latent frame averages its frames."""
    if latent_frames < 1 or embeddings < 1:
        raise WanSemanticsError(f"need at least one latent frame and one embedding, got {latent_frames} and {embeddings}")
    total = video_frames(latent_frames)
    weights = torch.zeros(latent_frames, embeddings, dtype=torch.float64)
    for t in range(latent_frames):
        frames = frames_of_latent(t)
        for f in frames:
            if total == 1 or embeddings == 1:
                weights[t, 0] += 1.0
                continue
            num, den = f * (embeddings - 1), total - 1  # integer position: exact indices when F == L
            lo, rest = divmod(num, den)
            weights[t, lo] += 1.0 - rest / den
            if rest:
                weights[t, lo + 1] += rest / den
        weights[t] /= len(frames)
    return weights


def latent_frame_embeddings(embeddings: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """[F, tokens, D] per-frame embeddings -> [T, tokens, D], one per latent frame (see latent_frame_weights)."""
    if embeddings.ndim != 3:
        raise WanSemanticsError(f"expected per-frame CLIP vision tokens [frames, tokens, width], got shape "
                                f"{tuple(embeddings.shape)}")
    weights = latent_frame_weights(latent_frames, embeddings.shape[0])
    return torch.einsum("tf,fnd->tnd", weights, embeddings.double()).to(embeddings.dtype)


def fill_image_slots(per_latent: torch.Tensor, slots_tokens: int) -> torch.Tensor:
    """[T, n, D] -> [T, slots_tokens, D]: the embedding repeated into every image slot of the conditioning
    (I2V: one slot of 257 tokens; FLF2V: start and end, 514)."""
    n = per_latent.shape[1]
    if slots_tokens % n:
        raise WanSemanticsError(f"The conditioning has {slots_tokens} image tokens, not a multiple of the {n} tokens of "
                                "each per-frame embedding: give CLIP vision penultimate tokens of the same model "
                                "(ViT-H, 257 tokens) as the start/end images.")
    return per_latent.repeat(1, slots_tokens // n, 1)


@dataclass(frozen=True)
class VideoLayout:
    """Where the video tokens of a model call sit in Wan's token sequence ([prefix][T frames][extra frames],
    each frame `per_frame` tokens in row-major order)."""

    latent_frames: int
    per_frame: int
    extra_frames: int = 0  # frames concatenated after the video along time (time_dim_concat)

    def video_slice(self, total_tokens: int) -> slice:
        video = self.latent_frames * self.per_frame
        prefix = total_tokens - video - self.extra_frames * self.per_frame  # reference-image tokens, if any
        if prefix < 0:
            raise WanSemanticsError(f"{total_tokens} tokens cannot hold {self.latent_frames} latent frames of "
                                    f"{self.per_frame} tokens")
        return slice(prefix, prefix + video)


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def per_frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, attention: Attention) -> torch.Tensor:
    """q [B, T*S, C] (S tokens per latent frame, frame-major), k/v [T, N, C] -> [B, T*S, C]: the queries
    of latent frame t attend to row t of k/v only."""
    b, length, c = q.shape
    frames = k.shape[0]
    if length % frames:
        raise WanSemanticsError(f"{length} video tokens do not split into {frames} latent frames")
    q = q.reshape(b * frames, length // frames, c)
    k = k.unsqueeze(0).expand(b, *k.shape).reshape(b * frames, k.shape[1], k.shape[2])
    v = v.unsqueeze(0).expand(b, *v.shape).reshape(b * frames, v.shape[1], v.shape[2])
    return attention(q, k, v, heads).reshape(b, length, -1)


def blend(original: torch.Tensor, per_frame: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 - strength) original + strength per_frame, with the end points exact."""
    if strength == 0:
        return original
    if strength == 1:
        return per_frame
    return original * (1.0 - strength) + per_frame * strength


def image_attention(q: torch.Tensor, original: Callable[[], torch.Tensor], k_frames: torch.Tensor,
                    v_frames: torch.Tensor, heads: int, layout: VideoLayout, strength: float,
                    attention: Attention) -> torch.Tensor:
    """The image part of Wan's I2V cross-attention with per-frame tokens on the video tokens.

    `original()` computes Attention(q, k_img, v_img) of the unpatched model (only called when needed);
    k_frames / v_frames [T, N, C] are the block's k_img / v_img of each latent frame's tokens."""
    if strength == 0:
        return original()
    part = layout.video_slice(q.shape[1])
    whole = part.start == 0 and part.stop == q.shape[1]
    new = per_frame_attention(q[:, part], k_frames, v_frames, heads, attention)
    if strength == 1 and whole:
        return new
    out = original()
    mixed = blend(out[:, part], new, strength)
    if whole:
        return mixed
    out = out.clone()
    out[:, part] = mixed
    return out
