"""The STORY value passed between nodes: which characters each panel shows.

Produced by the story node, consumed by the consistent attention node (character groups, identity
panels) and the ID-fuse node (which reference set each panel uses). Immutable and plain, so it is
safe in ComfyUI's output cache and across `ModelPatcher.clone()`.

PanelSelection (the STORYDIFFUSION_PANELS value) says which story panels a selected conditioning
batch holds, row by row, so panels sampled in separate runs can be put back in story order.
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

    @property
    def identity_rows(self) -> tuple[int, ...]:
        """Every identity panel of every character, in story order."""
        return tuple(sorted({i for rows in self.identity_panels.values() for i in rows}))

    @property
    def other_rows(self) -> tuple[int, ...]:
        """Every panel that is not an identity panel, in story order."""
        identity = set(self.identity_rows)
        return tuple(i for i in range(len(self.panels)) if i not in identity)

    def __len__(self) -> int:
        return len(self.panels)


@dataclass(frozen=True)
class PanelSelection:
    """Which story panels a selected batch holds: rows[k] is the story index of batch row k."""
    rows: tuple[int, ...]
    story_length: int  # panels in the whole story (selections of different stories do not mix)
    # A share of a selection split among the machines of a ComfyUI-Distributed run (story/share.py): `rows` is
    # this machine's share, `split_rows` the whole selection (every participant's share, in participant order).
    split_rows: tuple[int, ...] = ()
    participant: int = 0
    participants: int = 1

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))
        object.__setattr__(self, "split_rows", tuple(int(r) for r in self.split_rows))
        if not self.rows:
            raise ValueError("a panel selection needs at least one panel")
        bad = [r for r in self.rows if not 0 <= r < self.story_length]
        if bad:
            raise ValueError(f"panels {bad} are outside the story ({self.story_length} panels, "
                             f"0-{self.story_length - 1})")
        if len(set(self.rows)) != len(self.rows):
            raise ValueError(f"a panel selection lists a panel twice: {list(self.rows)}")

    @property
    def is_share(self) -> bool:
        """One machine's share of a selection split among several (its images come back through a collector)."""
        return self.participants > 1

    def whole(self) -> PanelSelection:
        """The selection before it was split (itself when it is not a share)."""
        return PanelSelection(self.split_rows, self.story_length) if self.is_share else self

    def __len__(self) -> int:
        return len(self.rows)
