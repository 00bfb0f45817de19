"""Story consistency scores from image embeddings (plain torch): who is in which panel comes from the STORY.

For every character, "self" is the cosine similarity between the embeddings of the panels that show it
(mean and minimum over its pairs of panels), "cross" the similarity of those panels to the character's own
reference images. [NC] panels and panels without the character are left out of its scores. The overall
scores are means over the characters (each character counts once, however many panels it has), the
overall minimum the worst pair of any character.

Embeddings are one vector per image: a [N, D] tensor is used as it is (CLIP's projected image_embeds,
DINOv2's class token); a [N, T, D] tensor (SigLIP in ComfyUI: token features, its attention-pooling head
is not loaded) is averaged over its tokens. Everything is computed in float64 on the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common.errors import StoryDiffusionError

NO_SCORE = float("nan")  # an overall score with nothing to average (documented on the node's outputs)


class ConsistencyError(StoryDiffusionError):
    """Something the Story Consistency node was given cannot be scored; the message says what to change."""


@dataclass(frozen=True)
class CharacterReference:
    """Reference images of one story character: the value chained by Story Consistency Reference nodes."""

    character: str
    images: torch.Tensor  # IMAGE [N, H, W, C] in 0..1

    def __deepcopy__(self, memo):  # immutable in use: never copy the images
        return self


# ---------------------------------------------------------------------------------------------------
# embeddings and similarity


def pooled(image_embeds: torch.Tensor) -> torch.Tensor:
    """One float64 vector per image: [N, D] as given, [N, T, D] averaged over its T tokens."""
    if not isinstance(image_embeds, torch.Tensor):
        raise TypeError(f"image embeddings must be a tensor, got {type(image_embeds).__name__}")
    embeds = image_embeds.detach().to(device="cpu", dtype=torch.float64)
    if embeds.ndim == 2:
        return embeds
    if embeds.ndim == 3:
        return embeds.mean(dim=1)
    raise ConsistencyError(f"The CLIP vision model returned image_embeds of shape {tuple(image_embeds.shape)}; "
                           "expected [images, width] or [images, tokens, width]. Use a CLIP, SigLIP or DINOv2 file "
                           "that Load CLIP Vision loads.")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """[N, M] cosine similarities between the rows of a and b (b = a when not given), float64 in [-1, 1]."""
    a = F.normalize(a.to(torch.float64), dim=-1, eps=1e-12)
    b = a if b is None else F.normalize(b.to(torch.float64), dim=-1, eps=1e-12)
    return (a @ b.T).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# what is scored against what


def panel_rows(image_count: int, story_length: int, selected: Sequence[int] | None = None) -> tuple[int, ...]:
    """The story index of every image row; raises when the images and the story do not line up."""
    if image_count == 0:
        raise ConsistencyError("The panels IMAGE batch is empty: connect the decoded story panels (VAE Decode, or "
                               "Panels In Story Order for panels sampled in separate runs).")
    if selected is None:
        if image_count != story_length:
            raise ConsistencyError(
                f"{image_count} panel images arrived but the story has {story_length} panels. Connect every panel "
                "of the story in story order (Panels In Story Order joins panels sampled in separate runs), or, to "
                "score only some panels, connect Select Story Panels' `panels` output to panel_indices.")
        return tuple(range(image_count))
    rows = tuple(int(r) for r in selected)
    if len(rows) != image_count:
        raise ConsistencyError(f"panel_indices lists {len(rows)} story panels but {image_count} panel images arrived: "
                               "connect the images sampled from that same selection.")
    bad = [r for r in rows if not 0 <= r < story_length]
    if bad:
        raise ConsistencyError(f"panel_indices names panels {bad}, outside the story's {story_length} panels: connect "
                               "the selection made from this story.")
    return rows


def check_references(references: Sequence[CharacterReference], story_names: Sequence[str]) -> dict[str, int]:
    """name -> index in `references`; raises for a name that is not a character of the story or is given twice."""
    found: dict[str, int] = {}
    known = ", ".join(f"[{n}]" for n in story_names) or "none"
    for index, ref in enumerate(references):
        if ref.character not in story_names:
            hint = [n for n in story_names if n.lower() == ref.character.lower()]
            did_you_mean = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConsistencyError(f"A Story Consistency Reference names {ref.character!r}, which is not a character "
                                   f"of the story{did_you_mean}; the story's characters are {known}. Write the name "
                                   "exactly as in the Story node's characters text.")
        if ref.character in found:
            raise ConsistencyError(f"Two Story Consistency Reference nodes name {ref.character!r}: give each "
                                   "character one node (put all of its images in that node's batch).")
        if ref.images.ndim != 4 or ref.images.shape[0] == 0:
            raise ConsistencyError(f"The reference images of {ref.character!r} are empty: connect at least one image.")
        found[ref.character] = index
    return found


# ---------------------------------------------------------------------------------------------------
# scores


@dataclass(frozen=True)
class CharacterScore:
    """One character's numbers; rows are image rows (see StoryScores.story_rows for their story index)."""

    name: str
    rows: tuple[int, ...]
    self_mean: float | None = None  # None: fewer than two panels
    self_min: float | None = None
    worst_pair: tuple[int, int] | None = None
    panel_self: tuple[float, ...] = ()  # per row of `rows`: mean similarity to the character's other panels
    outlier: int | None = None  # the least consistent panel (characters with three panels or more)
    outlier_gap: float | None = None  # how far it lies below the mean of the character's other panels
    reference_count: int = 0
    cross_mean: float | None = None  # None: no references, or no panel shows the character
    cross_min: float | None = None
    panel_cross: tuple[float, ...] = ()  # per row of `rows`: mean similarity to the references


@dataclass(frozen=True)
class StoryScores:
    matrix: torch.Tensor  # [N, N] panel x panel cosine similarity (float64), image rows
    story_rows: tuple[int, ...]  # story index of every image row
    characters: tuple[CharacterScore, ...]
    unscored: tuple[int, ...]  # image rows that show no character ([NC])
    self_consistency: float  # mean over characters of their self mean; NaN when no character has two panels
    self_min: float  # the lowest pair of any character; NaN likewise
    cross_consistency: float  # mean over characters of their cross mean; NaN when nothing has references


def _character_score(name: str, rows: tuple[int, ...], matrix: torch.Tensor, panel_embeds: torch.Tensor,
                     refs: torch.Tensor | None) -> CharacterScore:
    values: dict = {"name": name, "rows": rows}
    n = len(rows)
    if n >= 2:
        index = torch.tensor(rows)
        sub = matrix[index][:, index]
        upper = torch.triu_indices(n, n, offset=1)
        pairs = sub[upper[0], upper[1]]
        worst = int(torch.argmin(pairs))
        panel_self = (sub.sum(dim=1) - sub.diagonal()) / (n - 1)
        values.update(self_mean=float(pairs.mean()), self_min=float(pairs[worst]),
                      worst_pair=(rows[int(upper[0, worst])], rows[int(upper[1, worst])]),
                      panel_self=tuple(float(v) for v in panel_self))
        if n >= 3:
            low = int(torch.argmin(panel_self))
            others = torch.cat([panel_self[:low], panel_self[low + 1:]])
            values.update(outlier=rows[low], outlier_gap=float(others.mean() - panel_self[low]))
    if refs is not None:
        values["reference_count"] = int(refs.shape[0])
        if n:
            cross = cosine_matrix(panel_embeds[torch.tensor(rows)], refs)
            values.update(cross_mean=float(cross.mean()), cross_min=float(cross.min()),
                          panel_cross=tuple(float(v) for v in cross.mean(dim=1)))
    return CharacterScore(**values)


def score_story(panel_embeds: torch.Tensor, panel_characters: Sequence[tuple[str, ...]], character_names: Sequence[str],
                reference_embeds: Mapping[str, torch.Tensor] | None = None,
                story_rows: Sequence[int] | None = None) -> StoryScores:
    """Scores of every character shown in the panels or given references.

    panel_embeds: [N, D] (one row per panel image); panel_characters[k]: the characters of image row k;
    character_names: the story's characters in their order; reference_embeds: name -> [R, D].
    """
    count = panel_embeds.shape[0]
    if len(panel_characters) != count:
        raise ValueError(f"{len(panel_characters)} panel character tuples for {count} embeddings")
    reference_embeds = dict(reference_embeds or {})
    matrix = cosine_matrix(panel_embeds)
    characters = []
    for name in character_names:
        rows = tuple(k for k in range(count) if name in panel_characters[k])
        refs = reference_embeds.get(name)
        if rows or refs is not None:
            characters.append(_character_score(name, rows, matrix, panel_embeds, refs))
    self_means = [c.self_mean for c in characters if c.self_mean is not None]
    self_mins = [c.self_min for c in characters if c.self_min is not None]
    cross_means = [c.cross_mean for c in characters if c.cross_mean is not None]
    return StoryScores(
        matrix=matrix,
        story_rows=tuple(story_rows) if story_rows is not None else tuple(range(count)),
        characters=tuple(characters),
        unscored=tuple(k for k in range(count) if not panel_characters[k]),
        self_consistency=sum(self_means) / len(self_means) if self_means else NO_SCORE,
        self_min=min(self_mins) if self_mins else NO_SCORE,
        cross_consistency=sum(cross_means) / len(cross_means) if cross_means else NO_SCORE,
    )


# ---------------------------------------------------------------------------------------------------
# report


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _panels(rows: Sequence[int], story_rows: Sequence[int]) -> str:
    return ", ".join(str(story_rows[r]) for r in rows)


def character_lines(c: CharacterScore, story_rows: Sequence[int]) -> list[str]:
    """The report's lines for one character."""
    shown = f"panels {_panels(c.rows, story_rows)}" if len(c.rows) != 1 else f"panel {story_rows[c.rows[0]]} only"
    if not c.rows:
        shown = "in no scored panel"
    parts = []
    if c.self_mean is not None:
        a, b = c.worst_pair
        parts.append(f"self mean {_number(c.self_mean)}, min {_number(c.self_min)} (panels {story_rows[a]} & "
                     f"{story_rows[b]})")
    elif c.rows:
        parts.append("no self score (it takes two panels of the character; add a panel or a reference)")
    images = f"{c.reference_count} reference image{'s' if c.reference_count != 1 else ''}"
    if c.cross_mean is not None:
        parts.append(f"cross mean {_number(c.cross_mean)}, min {_number(c.cross_min)} ({images})")
    elif c.reference_count:
        parts.append(f"{images} but no scored panel shows it: no cross score")
    head = f"[{c.name}] {shown}: " + "; ".join(parts)
    lines = [head]
    for i, row in enumerate(c.rows):
        parts = []
        if c.panel_self:
            parts.append(f"{_number(c.panel_self[i])} to its other panels")
        if c.panel_cross:
            parts.append(f"{_number(c.panel_cross[i])} to the references")
        if parts:
            lines.append(f"  panel {story_rows[row]}: " + ", ".join(parts))
    if c.outlier is not None:
        lines.append(f"  least consistent: panel {story_rows[c.outlier]} "
                     f"({_number(c.outlier_gap)} below the mean of the character's other panels)")
    return lines


def format_report(scores: StoryScores, encoder: str, story_length: int) -> str:
    """The readable report: overall numbers, then per character and per panel (panel numbers are story indices)."""
    count = len(scores.story_rows)
    scope = f"{count} panels" if count == story_length else f"{count} of the story's {story_length} panels"
    lines = [f"Story consistency: {scope}; {encoder}.",
             ("Cosine similarity of image embeddings (1 = the same embedding); panel numbers are story indices "
              "(0-based)."),
             (f"self  (panels of one character):   mean {_number(scores.self_consistency)}, "
              f"worst pair {_number(scores.self_min)}"),
             f"cross (panels vs their references): mean {_number(scores.cross_consistency)}"]
    if math.isnan(scores.self_consistency):
        lines.append("No character appears in two scored panels, so there is no self score (NaN).")
    lines.append("")
    for c in scores.characters:
        lines.extend(character_lines(c, scores.story_rows))
    if scores.unscored:
        plural = "s" if len(scores.unscored) > 1 else ""
        lines.append(f"[NC] panel{plural} {_panels(scores.unscored, scores.story_rows)}: no character, not scored.")
    return "\n".join(lines)
