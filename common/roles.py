"""The chunks of a model call: what each index of ComfyUI's `cond_or_uncond` means for the guider that made it."""
from __future__ import annotations

from .errors import StoryDiffusionError

CFG_ROLES = ("positive", "negative")  # CFGGuider / BasicGuider: calc_cond_batch([positive, negative])
DUAL_CFG_ROLES = ("negative", "middle", "positive")  # DualCFGGuider: calc_cond_batch([negative, middle, positive])


def chunk_roles(guider) -> tuple:
    """What each index of `cond_or_uncond` means for this guider: 0 is the positive prompt for CFGGuider
    but the *negative* one for DualCFGGuider, whose chunks are (negative, middle, positive)."""
    conds = getattr(guider, "original_conds", None) or getattr(guider, "conds", None) or {}
    if "middle" in conds:
        return DUAL_CFG_ROLES
    return CFG_ROLES


def role_names(roles: tuple, kinds) -> list:
    """The role of each chunk index in `kinds` (a call's cond_or_uncond) for a guider whose chunks are `roles`."""
    kinds = [int(k) for k in kinds]
    if any(k >= len(roles) for k in kinds):
        raise StoryDiffusionError(f"StoryDiffusion: a model call has chunks {kinds} but the guider has {len(roles)} "
                                  f"({', '.join(roles)}); use KSampler, CFGGuider, BasicGuider or DualCFGGuider")
    return [roles[k] for k in kinds]
