"""The STORY value passed between nodes: which characters each panel shows.

Produced by the story node, consumed by the consistent attention node (character groups, identity
panels) and the ID-fuse node (which reference set each panel uses). Immutable and plain, so it is
safe in ComfyUI's output cache and across `ModelPatcher.clone()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

NO_CHARACTER = "NC"


@dataclass(frozen=True)
class Character:
    name: str
    description: str
    line: int = 0  # 1-based line in the characters text, for error messages


@dataclass(frozen=True)
class Panel:
    prompt: str  # what is drawn (character names already replaced by descriptions by the parser)
    caption: str  # what the comic page shows under/over the panel ("" for none)
    characters: tuple[str, ...]  # names of the characters in the panel; () for an [NC] panel
    line: int = 0  # 1-based line in the panels text


@dataclass(frozen=True)
class Story:
    characters: tuple[Character, ...]
    panels: tuple[Panel, ...]
    identity_panels: dict = field(default_factory=dict)  # name -> tuple of panel indices

    @property
    def panel_characters(self) -> list[tuple[str, ...]]:
        return [p.characters for p in self.panels]

    def share_mask(self) -> list[list[bool]]:
        """share[i][j]: panel i may read tokens of panel j (i != j, at least one character in common)."""
        chars = [set(c) for c in self.panel_characters]
        return [[i != j and bool(a & b) for j, b in enumerate(chars)] for i, a in enumerate(chars)]

    def __len__(self) -> int:
        return len(self.panels)
