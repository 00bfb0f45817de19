"""Put panels sampled in separate runs back in story order (plain torch, no ComfyUI).

A story is often sampled in two runs: the identity panels together (writing the identity bank),
then the other panels (reading it). Each run's images come with the PanelSelection that picked its
conditioning rows; `in_story_order` places every image at its story index.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import PanelSelection
from .share import collected_shares, share_bounds


def _ranges(rows) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    rows = sorted(rows)
    parts, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def _size(images: torch.Tensor) -> str:
    size = f"{images.shape[2]}x{images.shape[1]}"
    return size if images.ndim < 4 or images.shape[3] == 3 else f"{size} with {images.shape[3]} channels"


def _collected(name: str, images: torch.Tensor, selection: PanelSelection) -> PanelSelection:
    """A share (one machine's part of a split selection, story/share.py) stands for the whole selection: its images
    are the Distributed Collector's batch, every participant's share in participant order. Refuses a batch that
    misses shares, saying which panels and what to do."""
    if not selection.is_share or images.ndim != 4:
        return selection
    whole, received, count = selection.whole(), images.shape[0], selection.participants
    if received == len(whole):
        return whole
    present = collected_shares(received, len(whole), count)
    if present is None or present == 0:
        return selection  # not a collected batch: the size check below names both counts
    missing = whole.rows[share_bounds(len(whole), count)[present][0]:]
    who = "the master's share only" if present == 1 else f"the shares of participants 0-{present - 1} only"
    raise ValueError(
        f"images_{name} has {received} images, {who}, but the selection was split among {count} participants "
        f"({len(whole)} panels): story panels {_ranges(missing)} are missing and nothing was joined. A worker that "
        f"is offline when the run starts is skipped by ComfyUI-Distributed (its log says 'is offline, skipping'), "
        f"and queueing without workers runs the master alone. Start the missing worker(s) and queue again, or set "
        f"participants on Select Story Panels to {present} (the master plus the workers that answer). Connect the "
        f"images output of Distributed Collector here, not a single machine's images.")


def in_story_order(parts: Sequence[tuple[str, torch.Tensor, PanelSelection]],
                   allow_gaps: bool = False) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(name, images [B, H, W, C], selection) per run -> (images in story order, their story indices).

    Refuses (ValueError, saying what to do) a batch whose size is not its selection's, a story panel
    given twice, selections of stories of different lengths, images of different sizes (nothing is
    resized) and, unless allow_gaps, a story panel given by no input; a `panels` value that is not a
    panel selection is a TypeError.
    """
    if not parts:
        raise ValueError("no images to put in story order: connect at least one images/panels pair")
    for name, images, selection in parts:
        if not isinstance(selection, PanelSelection):
            raise TypeError(f"panels_{name} is not a panel selection: connect the 'panels' output of "
                             f"Select Story Panels")
    parts = [(name, images, _collected(name, images, selection)) for name, images, selection in parts]
    for name, images, selection in parts:
        if images.ndim != 4:
            raise ValueError(f"images_{name} is not an image batch (shape {list(images.shape)})")
        if images.shape[0] != len(selection.rows):
            raise ValueError(
                f"images_{name} has {images.shape[0]} images but panels_{name} selects {len(selection.rows)} "
                f"panels ({_ranges(selection.rows)}): connect the images decoded from the run that used that "
                f"selection (its latent batch must be its panel_count)")
    lengths = {name: selection.story_length for name, _, selection in parts}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"panels_{n} from a story of {k} panels" for n, k in lengths.items())
        raise ValueError(f"the panel selections come from different stories ({described}): connect selections "
                         f"made from the same Story node")
    owner: dict[int, str] = {}
    for name, _, selection in parts:
        for row in selection.rows:
            if row in owner:
                raise ValueError(f"story panel {row} is given twice (in panels_{owner[row]} and panels_{name}): "
                                 f"each panel must come from exactly one run; change one selection")
            owner[row] = name
    first_name, first_images, _ = parts[0]
    for name, images, _ in parts[1:]:
        if images.shape[1:] != first_images.shape[1:]:
            raise ValueError(f"images_{first_name} are {_size(first_images)} but images_{name} are {_size(images)}: "
                             f"the panels of one story must have the same size; sample both runs at the same "
                             f"width and height, or resize one batch (e.g. Upscale Image) first - this node "
                             f"does not resize")
    story_length = next(iter(lengths.values()))
    missing = [i for i in range(story_length) if i not in owner]
    if missing and not allow_gaps:
        raise ValueError(f"story panels {_ranges(missing)} are in none of the inputs (the story has {story_length} "
                         f"panels): connect their images and selection as another pair, or turn on allow_gaps to "
                         f"join only the panels given")
    where = {row: (k, j) for k, (_, _, selection) in enumerate(parts) for j, row in enumerate(selection.rows)}
    order = tuple(sorted(owner))
    device, dtype = first_images.device, first_images.dtype
    images = torch.stack([parts[where[row][0]][1][where[row][1]].to(device=device, dtype=dtype) for row in order])
    return images, order
