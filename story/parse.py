"""Turn the two texts a user writes (characters, panels) into a Story.

Characters, one per line:   [Name] description
Panels, one per line:       prompt text that names [Name] and [Other] # caption shown on the page
                            [NC] a panel with no character # optional caption

The caption starts after the LAST `#` of a line (the official StoryDiffusion rule): in
`[Bob] stands # part one # part two` the caption is "part two" and the prompt "[Bob] stands # part one".

`[Name]` in a panel is replaced by that character's description (as the official demo does) and
recorded in Panel.characters. With exactly one character defined, a panel that names nobody shows
that character (its description is put in front), which is the classic one-hero StoryDiffusion
story. `\\[` and `\\]` write literal brackets, `\\#` a literal `#` (never a caption start). Blank
lines are skipped; line numbers in errors count them, so they match what the user sees in the text box.
"""
from __future__ import annotations

import re

from ..common.errors import StoryDiffusionError
from .model import NO_CHARACTER, Character, Panel, Story

CAPTION_SEPARATOR = "#"
_ESCAPED_OPEN, _ESCAPED_CLOSE, _ESCAPED_HASH = "\x00", "\x01", "\x02"  # placeholders for \[ \] \# while parsing


class StoryError(StoryDiffusionError):
    """A mistake in the story text; the message names the text box and the line."""

    def __init__(self, where: str, line: int, message: str):
        self.where, self.line = where, line
        super().__init__(f"{where}, line {line}: {message}")


def _lines(text: str):
    """(1-based line number, stripped line) for every non-blank line; CRLF and CR both end a line."""
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        line = line.strip()
        if line:
            yield number, line


def _protect_escapes(text: str) -> str:
    return text.replace("\\[", _ESCAPED_OPEN).replace("\\]", _ESCAPED_CLOSE).replace("\\#", _ESCAPED_HASH)


def _restore_escapes(text: str) -> str:
    return text.replace(_ESCAPED_OPEN, "[").replace(_ESCAPED_CLOSE, "]").replace(_ESCAPED_HASH, "#")


def _tidy(text: str) -> str:
    """Collapse runs of spaces left where tags were removed, and stray spaces before commas."""
    text = " ".join(text.split())
    return re.sub(r"\s+([,.;:!?])", r"\1", text).strip(" ,")


def _brackets(line: str, where: str, number: int) -> list[re.Match]:
    """All `[...]` tags of a line; unbalanced or nested brackets are a malformed line."""
    tags = list(re.finditer(r"\[([^\[\]]*)\]", line))
    rest = re.sub(r"\[[^\[\]]*\]", "", line)
    if "[" in rest or "]" in rest:
        raise StoryError(where, number, f"unbalanced '[' or ']' in {_restore_escapes(line)!r}; "
                                        "write a character as [Name], or \\[ \\] for literal brackets")
    return tags


def parse_characters(text: str) -> tuple[Character, ...]:
    """`[Name] description` per line -> Characters, in order. Names are case-sensitive."""
    where = "characters"
    characters: list[Character] = []
    seen: dict[str, int] = {}
    for number, raw in _lines(text):
        line = _protect_escapes(raw)
        match = re.fullmatch(r"\[([^\[\]]*)\]\s*(.*)", line)
        if not match:
            raise StoryError(where, number, f"expected '[Name] description', got {raw!r}")
        name, description = match.group(1).strip(), match.group(2).strip()
        if not name:
            raise StoryError(where, number, "the character name between [ ] is empty")
        if name.upper() == NO_CHARACTER:
            raise StoryError(where, number, f"[{NO_CHARACTER}] is reserved for panels without a character; "
                                            "choose another name")
        if name in seen:
            raise StoryError(where, number, f"character [{name}] is defined twice (first on line {seen[name]}); "
                                            "remove or rename one")
        _brackets(description, where, number)
        if not description:
            raise StoryError(where, number, f"character [{name}] has no description; write it after the ]")
        seen[name] = number
        characters.append(Character(name=name, description=_restore_escapes(description), line=number))
    return tuple(characters)


def parse_panel(line: str, number: int, characters: dict[str, Character]) -> Panel:
    """One panel line -> Panel with character tags replaced by descriptions."""
    where = "panels"
    text = _protect_escapes(line)
    # the LAST unescaped '#' starts the caption (official rule); earlier ones stay in the prompt
    prompt_part, separator, caption = text.rpartition(CAPTION_SEPARATOR)
    if not separator:
        prompt_part = text
    caption = _restore_escapes(caption.strip()) if separator else ""
    names: list[str] = []
    no_character = False

    def replace(tag: re.Match) -> str:
        nonlocal no_character
        name = tag.group(1).strip()
        if name.upper() == NO_CHARACTER:
            no_character = True
            return " "
        if name not in characters:
            hint = [n for n in characters if n.lower() == name.lower()]
            did_you_mean = f" (did you mean [{hint[0]}]?)" if hint else ""
            known = ", ".join(f"[{n}]" for n in characters) or "none"
            raise StoryError(where, number, f"[{name}] is not a defined character{did_you_mean}; "
                                            f"defined: {known}. Add it to the characters or use [{NO_CHARACTER}]")
        if name not in names:
            names.append(name)
        return characters[name].description

    _brackets(prompt_part, where, number)
    prompt = re.sub(r"\[([^\[\]]*)\]", replace, prompt_part)
    if no_character and names:
        raise StoryError(where, number, f"[{NO_CHARACTER}] marks a panel without characters, but the line "
                                        f"also names {', '.join(f'[{n}]' for n in names)}; keep one")
    if not no_character and not names:
        if len(characters) == 1:
            (only,) = characters.values()
            names.append(only.name)
            prompt = f"{only.description}, {prompt}"
        else:
            raise StoryError(where, number, f"the panel names no character; add [Name] for who is in it, "
                                            f"or [{NO_CHARACTER}] for a panel without characters")
    prompt = _tidy(_restore_escapes(prompt))
    if not prompt:
        raise StoryError(where, number, "the panel has nothing to draw: write a prompt before the '#'")
    return Panel(prompt=prompt, caption=caption, characters=tuple(names), line=number)


def identity_panels_for(panels: tuple[Panel, ...], count: int) -> dict[str, tuple[int, ...]]:
    """Per character, the first `count` panels that show it: the official code denoises these first
    (together, writing the identity bank) and the rest read from them."""
    if count < 1:
        raise ValueError(f"identity panels per character must be at least 1, got {count}")
    found: dict[str, list[int]] = {}
    for index, panel in enumerate(panels):
        for name in panel.characters:
            chosen = found.setdefault(name, [])
            if len(chosen) < count:
                chosen.append(index)
    return {name: tuple(indices) for name, indices in found.items()}


def parse_story(characters_text: str, panels_text: str, identity_panels: int = 3) -> Story:
    """Both texts -> Story; raises StoryError naming the text box and line of the first mistake."""
    characters = parse_characters(characters_text)
    by_name = {c.name: c for c in characters}
    panels = tuple(parse_panel(line, number, by_name) for number, line in _lines(panels_text))
    if not panels:
        raise StoryError("panels", 1, "the story has no panels; write one panel prompt per line")
    return Story(characters=characters, panels=panels,
                 identity_panels=identity_panels_for(panels, identity_panels))
