"""Join transition segments into one story video, in plain torch.

Adjacent segments usually share the panel frame at their boundary, so the last `overlap` frames of
one segment are cross-faded linearly into the first `overlap` frames of the next; every panel can be
held for a few extra frames; and linear blends between consecutive frames can multiply the frame
rate. Everything is a generator, so the caller decides where frames land (one preallocated tensor,
or straight into an encoder, see encode.py).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import torch

try:
    from ..common.errors import StoryDiffusionError
except ImportError:  # video/ imported as a top-level package on its own (bench/bench_video.py)
    StoryDiffusionError = ValueError

log = logging.getLogger(__name__)


class VideoError(StoryDiffusionError):
    """Bad input or an environment problem, with a message that says what to do."""


# ---------------------------------------------------------------------------------------------------
# joining segments


def _check_segments(segments: Sequence[torch.Tensor], overlap: int, hold: int) -> None:
    if overlap < 0 or hold < 0:
        raise VideoError(f"overlap ({overlap}) and hold ({hold}) must be 0 or more.")
    if len(segments) == 0:
        raise VideoError("No segments to join: connect at least one IMAGE batch to 'segments'.")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if not isinstance(seg, torch.Tensor) or seg.ndim != 4 or seg.shape[-1] < 3:
            shape = tuple(seg.shape) if isinstance(seg, torch.Tensor) else type(seg).__name__
            raise VideoError(f"segment {i + 1} is not an IMAGE batch [frames, height, width, 3] (got {shape}).")
        frames = seg.shape[0]
        if frames == 0:
            raise VideoError(f"segment {i + 1} is empty (0 frames): check the node that produced it.")
        ends = (i > 0) + (i < last)  # how many of its ends are cross-faded
        if len(segments) > 1 and frames < ends * overlap:
            raise VideoError(
                f"segment {i + 1} has {frames} frames, but an overlap of {overlap} cross-fades {ends * overlap} of them "
                f"({'both ends' if ends == 2 else 'one end'}); lower 'overlap' to at most {frames // ends}."
            )


def _match_size(seg: torch.Tensor, height: int, width: int, index: int) -> torch.Tensor:
    """Resize a segment whose frames differ in size from the first segment (bilinear, antialiased)."""
    seg = seg[..., :3]
    if seg.shape[1:3] == (height, width):
        return seg
    log.warning("StoryDiffusion video: segment %d is %dx%d, resized to %dx%d like the first segment.",
                index + 1, seg.shape[2], seg.shape[1], width, height)
    resized = torch.nn.functional.interpolate(seg.movedim(-1, 1).float(), size=(height, width),
                                              mode="bilinear", antialias=True, align_corners=False)
    return resized.movedim(1, -1).clamp(0.0, 1.0)


def joined_frame_count(lengths: Sequence[int], overlap: int = 0, hold: int = 0, blend_factor: int = 1) -> int:
    """Frames `join_segments` + `blend_frames` yield for segments of these lengths."""
    if not lengths:
        return 0
    n = len(lengths)
    joined = sum(lengths) - (overlap * (n - 1) if n > 1 else 0) + hold * (n + 1)
    return joined * blend_factor


def join_segments(segments: Sequence[torch.Tensor], overlap: int = 0, hold: int = 0) -> Iterator[torch.Tensor]:
    """Yield the frames [H, W, 3] of the segments joined in order.

    overlap N: at each junction the last N frames of one segment and the first N of the next become
    N frames `(1 - w) * a + w * b` with w = k / (N + 1), k = 1..N. With N = 1 and segments that share
    the panel frame, the junction shows that panel once instead of twice.
    hold k: each panel is shown k extra frames: the first frame, the last frame, and at every junction
    the last frame of the earlier segment (hard cut) or the middle frame of the cross-fade.
    Frames are views into the segments where no arithmetic was needed (no copies).
    """
    _check_segments(segments, overlap, hold)
    height, width = segments[0].shape[1:3]
    last = len(segments) - 1
    if last == 0:
        overlap = 0
    tail = None  # the previous segment's last `overlap` frames, waiting to be cross-faded
    for i, raw in enumerate(segments):
        seg = _match_size(raw, height, width, i)
        frames = seg.shape[0]
        start = 0
        if i == 0:
            for _ in range(hold):
                yield seg[0]
        elif overlap > 0:
            middle = (overlap - 1) // 2
            for k in range(overlap):
                weight = (k + 1) / (overlap + 1)
                mixed = tail[k] * (1.0 - weight) + seg[k] * weight
                yield mixed
                if k == middle:
                    for _ in range(hold):
                        yield mixed
            start = overlap
        end = frames - overlap if i < last else frames
        for j in range(start, end):
            yield seg[j]
        if i < last:
            if overlap == 0:
                for _ in range(hold):
                    yield seg[frames - 1]
            tail = seg[frames - overlap:]
        else:
            for _ in range(hold):
                yield seg[frames - 1]


def blend_frames(frames: Iterable[torch.Tensor], factor: int = 1) -> Iterator[torch.Tensor]:
    """Multiply the frame rate by `factor`: after each frame, `factor - 1` linear blends towards the next.

    The last frame is repeated instead, so T frames become exactly T * factor and the duration at
    `fps * factor` is unchanged.
    """
    if factor < 1:
        raise VideoError(f"frame rate multiplier must be 1 or more (got {factor}).")
    previous = None
    for frame in frames:
        if previous is not None:
            yield previous
            for t in range(1, factor):
                weight = t / factor
                yield previous * (1.0 - weight) + frame * weight
        previous = frame
    if previous is not None:
        for _ in range(factor):
            yield previous


def assemble_story_video(segments: Sequence[torch.Tensor], overlap: int = 0, hold: int = 0,
                         blend_factor: int = 1) -> torch.Tensor:
    """Join + blend into ONE preallocated float32 IMAGE tensor (the only full copy of the video)."""
    _check_segments(segments, overlap, hold)
    lengths = [s.shape[0] for s in segments]
    total = joined_frame_count(lengths, overlap if len(segments) > 1 else 0, hold, blend_factor)
    height, width = segments[0].shape[1:3]
    out = torch.empty((total, height, width, 3), dtype=torch.float32)
    written = 0
    for frame in blend_frames(join_segments(segments, overlap, hold), blend_factor):
        out[written] = frame
        written += 1
    assert written == total, (written, total)
    return out
