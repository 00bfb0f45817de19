"""Images before encoding (plain torch): the optional centre region, and batching images of one size together."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def center_region(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """The middle `fraction` of each side of every image [N, H, W, C] (1.0 = the whole image)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center_region must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return images
    _, h, w, _ = images.shape
    keep_h, keep_w = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - keep_h) // 2, (w - keep_w) // 2
    return images[:, top:top + keep_h, left:left + keep_w, :]


def rgb(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [N, H, W, C] -> its first three channels (an alpha channel is dropped, as ComfyUI's encoder does)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE batch [N, H, W, 3], got shape {tuple(images.shape)}")
    if images.shape[-1] == 1:
        return images.expand(-1, -1, -1, 3)
    return images[..., :3]


def size_groups(batches: Sequence[torch.Tensor]) -> list[tuple[tuple[int, int], list[int]]]:
    """Batches that share a height and width, in order of first appearance: [((h, w), [batch indices])]."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, batch in enumerate(batches):
        groups.setdefault((int(batch.shape[1]), int(batch.shape[2])), []).append(index)
    return list(groups.items())
