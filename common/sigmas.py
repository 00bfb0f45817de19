"""A window of the sampling schedule, in sigmas: when a patch is active (plain Python)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SigmaWindow:
    """Active while end_sigma <= sigma <= start_sigma (sigmas fall as sampling goes on)."""
    start_sigma: float = float("inf")
    end_sigma: float = 0.0

    def contains(self, sigma: float) -> bool:
        return self.end_sigma <= sigma <= self.start_sigma


def check_percents(start_percent: float, end_percent: float) -> None:
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be at most end_percent ({end_percent}), both in 0..1")
