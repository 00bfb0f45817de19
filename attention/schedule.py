"""Where and when Consistent Self-Attention applies: layer selection, step lookup, on/off schedule.

Layers are named the way ComfyUI names UNet transformer blocks: (kind, block id, index in the
stack), kind in input/middle/output. The official StoryDiffusion code patches the output (up)
blocks only; "all" and a written list are offered too. DiT blocks are (kind, block index, 0) with
kind double/single (Flux's double-stream and single-stream blocks); on a DiT the "official" choice
means the family's default block set, which its adapter passes in.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..common.sigmas import SigmaWindow
from .core import mix_seed

LayerKey = tuple  # (kind: str, block: int, index: int)
KINDS = ("input", "middle", "output", "double", "single")  # append only: ordinals seed the sampling

LAYERS_OUTPUT = "output blocks (official)"
LAYERS_ALL = "all blocks"
LAYERS_CUSTOM = "custom list"
LAYER_CHOICES = (LAYERS_OUTPUT, LAYERS_ALL, LAYERS_CUSTOM)

SCHEDULE_EVERY_STEP = "every step"
SCHEDULE_OFFICIAL = "official random"
SCHEDULE_CHOICES = (SCHEDULE_EVERY_STEP, SCHEDULE_OFFICIAL)

_ENTRY = re.compile(r"^(input|middle|output|double|single)(?:\s+(\d+)(?:\s*-\s*(\d+))?)?(?:\s*\.\s*(\d+))?$")


def layer_ordinal(key: LayerKey) -> int:
    """A stable integer for a layer key (part of the sampling seed)."""
    kind, block, index = key
    return (KINDS.index(kind) + 1) * 1_000_000 + int(block) * 1_000 + int(index)


def parse_layer_list(text: str) -> list[tuple[str, int | None, int | None, int | None]]:
    """Parse "output 3-5, middle, input 7.0" (UNets) or "double 10-18, single 0-37" (DiTs) into
    (kind, first block, last block, stack index) rules.

    Entries are separated by commas or new lines; a block range is inclusive; ".j" picks one
    transformer of a deep stack (SDXL); no block id means every block of that kind.
    """
    rules = []
    for n, raw in enumerate(re.split(r"[,\n;]", text), start=1):
        entry = raw.strip().lower()
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if not m:
            raise ValueError(f"layer entry {n} {raw.strip()!r} is not understood: write e.g. "
                             "'output 3-11', 'middle', 'input 7', 'output 0.1' (block.index), or on a DiT 'double 10-18', "
                             "'single 0-37', separated by commas")
        kind, first, last, index = m.groups()
        first_i = int(first) if first is not None else None
        last_i = int(last) if last is not None else first_i
        if first_i is not None and last_i < first_i:
            raise ValueError(f"layer entry {n} {raw.strip()!r}: the range must go up ({first}-{last})")
        rules.append((kind, first_i, last_i, int(index) if index is not None else None))
    if not rules:
        raise ValueError("the custom layer list is empty: write e.g. 'output 3-11' or pick another layer choice")
    return rules


def select_layers(available: Sequence[LayerKey], choice: str, custom: str = "",
                  official: Sequence[LayerKey] | None = None) -> list[LayerKey]:
    """The layers of `available` that the choice names (raises if a custom list names none).

    official: what LAYERS_OUTPUT means for this model (a DiT family's default blocks); None = the
    UNet's output blocks."""
    if choice == LAYERS_ALL:
        return list(available)
    if choice == LAYERS_OUTPUT:
        if official is not None:
            return list(official)
        return [key for key in available if key[0] == "output"]
    if choice != LAYERS_CUSTOM:
        raise ValueError(f"unknown layer choice {choice!r}; use one of {LAYER_CHOICES}")
    rules = parse_layer_list(custom)
    chosen = [key for key in available if any(_matches(rule, key) for rule in rules)]
    if not chosen:
        names = ", ".join(f"{k} {b}.{i}" for k, b, i in available)
        raise ValueError(f"the custom layer list {custom!r} matches no transformer block of this model; it has: {names}")
    return chosen


def _matches(rule, key: LayerKey) -> bool:
    kind, first, last, index = rule
    if key[0] != kind:
        return False
    if first is not None and not (first <= key[1] <= last):
        return False
    return index is None or index == key[2]


def step_index(sigma: float, sample_sigmas: Iterable[float]) -> int:
    """The sampling step a model call belongs to: the last schedule sigma at or above `sigma`.

    Exact for first-order samplers; a second-order sampler's mid-step calls fall in the step they
    refine.
    """
    step = -1
    for s in list(sample_sigmas)[:-1]:
        if s >= sigma * (1 - 1e-4) - 1e-8:
            step += 1
        else:
            break
    return max(step, 0)


@dataclass(frozen=True)
class Schedule:
    """When CSA is on for a layer call.

    window: CSA runs while window.end_sigma <= sigma <= window.start_sigma (from start/end percent).
    official: StoryDiffusion's released schedule — plain attention at step 0, then each layer call
    uses CSA with probability 0.7 before step 20 and 0.9 from step 20, a coin seeded by
    (seed, step, layer) so runs repeat exactly.
    """
    window: SigmaWindow = field(default_factory=SigmaWindow)
    official: bool = False
    seed: int = 0

    def active(self, step: int, sigma: float, layer: LayerKey) -> bool:
        if not self.window.contains(sigma):
            return False
        if not self.official:
            return True
        if step == 0:
            return False
        probability = 0.7 if step < 20 else 0.9
        return random.Random(mix_seed(self.seed, 0x5C4ED, step, layer_ordinal(layer))).random() < probability
