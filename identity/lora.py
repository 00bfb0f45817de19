"""The LoRA that ships inside photomaker-v1.bin (`lora_weights`): format check, pairing, layer names.

The public file stores the old diffusers attention-processor format, one low-rank pair per
projection of every SDXL UNet attention layer:

    unet.<diffusers module path>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight

`down` is [rank, in], `up` is [out, rank], no alpha (scale 1): W' = W + strength * up @ down.
`<path>.to_out` means the layer `<path>.to_out.0`. Plain python/torch; the ComfyUI adapter maps
the layer names onto a MODEL's own keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..common.errors import StoryDiffusionError

KEY_PATTERN = re.compile(r"^(?P<base>unet\.(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out))_lora\."
                         r"(?P<side>down|up)\.weight$")


class LoraWeightsError(StoryDiffusionError):
    """`lora_weights` is not in the PhotoMaker v1 format (message lists the offending keys)."""


@dataclass(frozen=True)
class LoraPair:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]

    def delta(self, strength: float = 1.0) -> torch.Tensor:
        """The weight change this pair makes: strength * up @ down, [out, in]."""
        return strength * (self.up.float() @ self.down.float())


def diffusers_layer(base: str) -> str:
    """'unet.X.attn1.processor.to_out' -> 'X.attn1.to_out.0' (the diffusers UNet parameter path, no '.weight')."""
    m = re.match(r"^unet\.(.+)\.processor\.(to_q|to_k|to_v|to_out)$", base)
    if not m:
        raise LoraWeightsError(f"{base!r} is not a PhotoMaker LoRA layer name.")
    proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
    return f"{m.group(1)}.{proj}"


def parse_lora_weights(sd: dict) -> dict[str, LoraPair]:
    """Check `lora_weights` and pair it up: {'unet.….processor.to_k': LoraPair}.

    Raises LoraWeightsError naming unknown keys, half pairs and rank mismatches.
    """
    if not sd:
        raise LoraWeightsError("the PhotoMaker file has an empty `lora_weights`: use the public photomaker-v1 file.")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        m = KEY_PATTERN.match(key)
        if not m:
            unknown.append(key)
            continue
        halves.setdefault(m.group("base"), {})[m.group("side")] = value
    if unknown:
        raise LoraWeightsError(f"`lora_weights` has {len(unknown)} keys outside the PhotoMaker v1 format "
                               f"('unet.<layer>.processor.to_k_lora.down.weight'), e.g. {sorted(unknown)[:5]}.")
    pairs = {}
    problems = []
    for base, sides in sorted(halves.items()):
        if set(sides) != {"down", "up"}:
            problems.append(f"{base} lacks its {'up' if 'down' in sides else 'down'} half")
            continue
        down, up = sides["down"], sides["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            problems.append(f"{base} has down {tuple(down.shape)} / up {tuple(up.shape)} (ranks differ)")
            continue
        pairs[base] = LoraPair(down, up)
    if problems:
        raise LoraWeightsError("`lora_weights` is damaged: " + "; ".join(problems[:8]) +
                               (f" … and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return pairs


def to_comfy_format(pairs: dict[str, LoraPair]) -> dict[str, torch.Tensor]:
    """The pairs as a flat LoRA state dict in the names ComfyUI's LoRA loader reads (`<base>_lora.up.weight`)."""
    flat = {}
    for base, pair in pairs.items():
        flat[f"{base}_lora.down.weight"] = pair.down
        flat[f"{base}_lora.up.weight"] = pair.up
    return flat
