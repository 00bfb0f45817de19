"""The story parser: every syntax of the characters/panels texts, and a clear error for every mistake."""
from __future__ import annotations

from itertools import pairwise

import pytest


@pytest.fixture(scope="module")
def parse(pack):
    from comfyui_storydiffusion.story import parse

    return parse


TWO = "[Mia] a girl with red hair\n[Leo] an old man with a beard"

# (characters, panels) -> list of (prompt, caption, characters)
VALID = [
    pytest.param(TWO, "[Mia] reads a book",
                 [("a girl with red hair reads a book", "", ("Mia",))], id="one-tag"),
    pytest.param(TWO, "[Mia] and [Leo] walk # Off we go",
                 [("a girl with red hair and an old man with a beard walk", "Off we go", ("Mia", "Leo"))],
                 id="two-tags-caption"),
    pytest.param(TWO, "[Leo] waves to [Mia], then [Leo] leaves",
                 [("an old man with a beard waves to a girl with red hair, then an old man with a beard leaves",
                   "", ("Leo", "Mia"))], id="repeated-tag-recorded-once"),
    pytest.param(TWO, "[NC] an empty street at dawn # Later…",
                 [("an empty street at dawn", "Later…", ())], id="no-character"),
    pytest.param(TWO, "[nc] rain on a window", [("rain on a window", "", ())], id="nc-any-case"),
    pytest.param(TWO, "[Mia] smiles, (sunlight:1.3), (embedding:foo)",
                 [("a girl with red hair smiles, (sunlight:1.3), (embedding:foo)", "", ("Mia",))],
                 id="prompt-weighting-kept"),
    pytest.param(TWO, "\n\n[Mia] one\n   \n[Leo] two\n\n",
                 [("a girl with red hair one", "", ("Mia",)), ("an old man with a beard two", "", ("Leo",))],
                 id="blank-lines"),
    pytest.param(TWO.replace("\n", "\r\n"), "[Mia] one # a\r\n[Leo] two # b\r\n",
                 [("a girl with red hair one", "a", ("Mia",)), ("an old man with a beard two", "b", ("Leo",))],
                 id="crlf"),
    pytest.param("[小明] 一个戴眼镜的男孩\n[Zoë] une fille", "[小明]在公园里跑步 # 今天天气很好\n[Zoë] lit # «Bonjour»",
                 [("一个戴眼镜的男孩在公园里跑步", "今天天气很好", ("小明",)), ("une fille lit", "«Bonjour»", ("Zoë",))],
                 id="unicode"),
    pytest.param("[Mia] a girl", "walks in the park # alone",
                 [("a girl, walks in the park", "alone", ("Mia",))], id="single-character-implicit"),
    pytest.param(TWO, "[Mia] holds a sign saying \\[OPEN\\] # \\[sic\\]",
                 [("a girl with red hair holds a sign saying [OPEN]", "[sic]", ("Mia",))], id="escaped-brackets"),
    pytest.param(TWO, "[Mia] counts # one # two",
                 [("a girl with red hair counts # one", "two", ("Mia",))], id="last-hash-splits"),
    pytest.param("[Bob] a tall man", "[Bob] stands # part one # part two",
                 [("a tall man stands # part one", "part two", ("Bob",))], id="last-hash-splits-official-example"),
    pytest.param(TWO, "[Mia] holds sign \\#1 # we are \\#1 # today",
                 [("a girl with red hair holds sign #1 # we are #1", "today", ("Mia",))], id="escaped-hash-in-both"),
    pytest.param(TWO, "[Mia] wears shirt \\#7", [("a girl with red hair wears shirt #7", "", ("Mia",))],
                 id="escaped-hash-is-no-caption"),
    pytest.param(TWO, "[Mia] waves # \\#1 fan", [("a girl with red hair waves", "#1 fan", ("Mia",))],
                 id="escaped-hash-in-caption"),
    pytest.param(TWO, "[ Mia ] sits", [("a girl with red hair sits", "", ("Mia",))], id="spaces-in-tag"),
    pytest.param("", "[NC] a lighthouse", [("a lighthouse", "", ())], id="no-characters-at-all"),
    pytest.param("[Dr. Who] a man in a long coat, (bow tie:1.2)", "[Dr. Who] runs",
                 [("a man in a long coat, (bow tie:1.2) runs", "", ("Dr. Who",))], id="punctuated-name"),
]


@pytest.mark.parametrize("characters,panels,expected", VALID)
def test_valid_story(parse, characters, panels, expected):
    story = parse.parse_story(characters, panels)
    assert [(p.prompt, p.caption, p.characters) for p in story.panels] == expected


def test_line_numbers_count_blank_lines(parse):
    story = parse.parse_story("\n[Mia] a girl\r\n\r\n[Leo] a man", "\n[Mia] a\n\n\n[Leo] b")
    assert [c.line for c in story.characters] == [2, 4]
    assert [p.line for p in story.panels] == [2, 5]


INVALID = [
    pytest.param(TWO, "", "panels, line 1", "no panels", id="empty-story"),
    pytest.param(TWO, "  \n \r\n", "panels, line 1", "no panels", id="blank-story"),
    pytest.param(TWO, "[Mia] ok\n[Bob] runs", "panels, line 2", "[Bob] is not a defined character", id="undefined"),
    pytest.param(TWO, "[mia] runs", "panels, line 1", "did you mean [Mia]", id="wrong-case-hint"),
    pytest.param("[Mia] a\n\n[Mia] b", "[Mia] x", "characters, line 3", "defined twice (first on line 1)",
                 id="defined-twice"),
    pytest.param("Mia: a girl", "[Mia] x", "characters, line 1", "expected '[Name] description'",
                 id="malformed-character"),
    pytest.param("[Mia]", "[Mia] x", "characters, line 1", "has no description", id="no-description"),
    pytest.param("[] a girl", "[NC] x", "characters, line 1", "name between [ ] is empty", id="empty-name"),
    pytest.param("[NC] a ghost", "[NC] x", "characters, line 1", "reserved", id="reserved-name"),
    pytest.param(TWO, "[Mia] ok\n[Mia walks", "panels, line 2", "unbalanced", id="unclosed-bracket"),
    pytest.param(TWO, "Mia] walks", "panels, line 1", "unbalanced", id="stray-bracket"),
    pytest.param(TWO, "a street", "panels, line 1", "names no character", id="untagged-with-two-characters"),
    pytest.param(TWO, "[NC] [Mia] walks", "panels, line 1", "[NC] marks a panel without characters",
                 id="nc-and-character"),
    pytest.param(TWO, "[NC] # only a caption", "panels, line 1", "nothing to draw", id="empty-prompt"),
]


@pytest.mark.parametrize("characters,panels,where,message", INVALID)
def test_invalid_story_names_the_line(parse, characters, panels, where, message):
    with pytest.raises(parse.StoryError) as err:
        parse.parse_story(characters, panels)
    assert str(err.value).startswith(where + ":"), str(err.value)
    assert message in str(err.value)


def test_identity_panels_are_the_first_k_per_character(parse):
    panels = "[Mia] a\n[NC] b\n[Leo] c\n[Mia] and [Leo] d\n[Mia] e\n[Mia] f\n[Leo] g"
    story = parse.parse_story(TWO, panels, identity_panels=2)
    assert story.identity_panels == {"Mia": (0, 3), "Leo": (2, 3)}
    story = parse.parse_story(TWO, panels, identity_panels=10)  # fewer panels than asked: all of them
    assert story.identity_panels == {"Mia": (0, 3, 4, 5), "Leo": (2, 3, 6)}
    with pytest.raises(ValueError):
        parse.parse_story(TWO, panels, identity_panels=0)


def test_share_mask_follows_the_characters(parse):
    story = parse.parse_story(TWO, "[Mia] a\n[Leo] b\n[Mia] and [Leo] c\n[NC] d")
    assert story.share_mask() == [
        [False, False, True, False],
        [False, False, True, False],
        [True, True, False, False],
        [False, False, False, False],
    ]


def test_any_number_of_characters(parse):
    names = [f"C{i}" for i in range(7)]
    characters = "\n".join(f"[{n}] person number {i}" for i, n in enumerate(names))
    panels = "\n".join(f"[{a}] meets [{b}]" for a, b in pairwise(names))
    story = parse.parse_story(characters, panels, identity_panels=1)
    assert [p.characters for p in story.panels] == list(pairwise(names))
    assert story.identity_panels == {n: (max(0, i - 1),) for i, n in enumerate(names)}


def test_styles_are_the_official_nine(pack):
    from comfyui_storydiffusion.story import styles

    assert styles.STYLE_NAMES == (
        "(No style)", "Japanese Anime", "Digital/Oil Painting", "Pixar/Disney Character", "Photographic",
        "Comic book", "Line art", "Black and White Film Noir", "Isometric Rooms")
    assert styles.apply_style("(No style)", "a cat") == "a cat"
    assert styles.style_negative("(No style)", "blurry") == "blurry"
    for name in styles.STYLE_NAMES[1:]:
        styled = styles.apply_style(name, "a cat (on a mat:1.2)")
        assert "a cat (on a mat:1.2)" in styled and styled != "a cat (on a mat:1.2)"
        negative = styles.style_negative(name, "extra fingers")
        assert negative.endswith(", extra fingers") and len(negative) > len(", extra fingers")
    with pytest.raises(ValueError, match="choose one of"):
        styles.apply_style("Vaporwave", "a cat")
