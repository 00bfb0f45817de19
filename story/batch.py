"""Join several IMAGE batches into one (plain torch): what "Batch Images (StoryDiffusion)" does.

Every batch is [N, H, W, C] floats. The first batch sets the size: a batch of another size is
scaled to cover it (aspect ratio kept), centre-cropped to exactly that size, and a warning names
the input and both sizes (joining panels of different sizes is usually a mistake in the graph, but
refusing would stop a long run at its last step). Channel counts are matched by adding an opaque
alpha channel (1.0) to the batches that lack one, as core ImageBatch does.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..common.errors import StoryDiffusionError

log = logging.getLogger("StoryDiffusion")


class BatchError(StoryDiffusionError):
    pass


def _check(name: str, images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise BatchError(f"{name} is not an IMAGE batch [N, H, W, 3] (got {shape}); connect an IMAGE output")
    if images.shape[0] == 0:
        raise BatchError(f"{name} is an empty image batch; connect a node that outputs at least one image")
    return images


def resize_cover(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, H, W, C] scaled (bilinear, aspect kept) to cover height x width, then centre-cropped to it."""
    h, w = images.shape[1:3]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = images.movedim(-1, 1).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.movedim(1, -1).clamp(0.0, 1.0).to(images.dtype)


def _with_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    if images.shape[-1] < channels:  # 3 -> 4: opaque alpha
        alpha = torch.ones(*images.shape[:-1], 1, dtype=images.dtype, device=images.device)
        images = torch.cat([images, alpha], dim=-1)
    return images


def join_batches(batches: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """(input name, IMAGE batch) pairs in order -> one batch in that order, sized like the first."""
    if not batches:
        raise BatchError("no images to batch; connect image1 and image2")
    checked = [(name, _check(name, images)) for name, images in batches]
    first_name, first = checked[0]
    height, width = first.shape[1], first.shape[2]
    channels = max(3 if images.shape[-1] == 1 else images.shape[-1] for _, images in checked)
    out = []
    for name, images in checked:
        if images.shape[1:3] != first.shape[1:3]:
            log.warning("Batch Images (StoryDiffusion): %s is %dx%d, %s is %dx%d; %s is scaled and centre-cropped "
                        "to %dx%d", name, images.shape[2], images.shape[1], first_name, width, height, name,
                        width, height)
            images = resize_cover(images, height, width)
        out.append(_with_channels(images.to(first.device, first.dtype), channels))
    return torch.cat(out, dim=0)
