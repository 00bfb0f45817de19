"""Story Consistency: its numbers are cosine similarities of core CLIP Vision Encode outputs, grouped by the story's
characters; references count for their own character only; the edge cases say what to do; the heatmap shows it."""
from __future__ import annotations

import gc
from typing import ClassVar

import numpy as np
import pytest
import torch

import consistency_fixtures as cf
import harness

CHARACTERS = "[Mia] a young woman with red hair\n[Leo] an old man with a beard"
# rows: 0 Mia, 1 Mia, 2 NC, 3 Leo, 4 Mia+Leo, 5 Leo, 6 Mia
PANELS = "[Mia] a\n[Mia] b\n[NC] c\n[Leo] d\n[Mia] and [Leo] e\n[Leo] f\n[Mia] g"
MIA, LEO, NC = (0, 1, 4, 6), (3, 4, 5), (2,)


def pattern(seed: int, h: int = 48, w: int = 64) -> torch.Tensor:
    """A structured picture [1, h, w, 3]: a random 4x4 colour grid, upsampled (random noise would all look alike)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).movedim(1, -1)


def panels_of(seeds, h=48, w=64) -> torch.Tensor:
    return torch.cat([pattern(s, h, w) for s in seeds])


def hand_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) written out: dot / (|a| |b|), float64; token embeddings [N, T, D] averaged first."""
    a, b = (x.detach().double().mean(1) if x.ndim == 3 else x.detach().double() for x in (a, b))
    return (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])


def pair_stats(matrix: torch.Tensor, rows) -> tuple[float, float]:
    values = [float(matrix[i, j]) for n, i in enumerate(rows) for j in rows[n + 1:]]
    return sum(values) / len(values), min(values)


@pytest.fixture(scope="module")
def story(pack):
    from comfyui_storydiffusion.story.parse import parse_story

    return parse_story(CHARACTERS, PANELS)


@pytest.fixture(scope="module")
def glue(pack):
    from comfyui_storydiffusion.consistency import comfy_adapter

    return comfy_adapter


@pytest.fixture(scope="module")
def encoders(pack):
    return {kind: cf.make_encoder(kind) for kind in cf.KINDS}


def ref(name, images):
    from comfyui_storydiffusion.consistency.score import CharacterReference

    return CharacterReference(name, images)


# ---------------------------------------------------------------------------------------------------
# in ComfyUI's executor, next to core CLIP Vision Encode


class TensorImageForTests:
    """Test-only node: an IMAGE the test put in `images` under a key."""

    images: ClassVar[dict] = {}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "get"
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    @classmethod
    def IS_CHANGED(cls, key):
        return float("nan")  # the tensors change between prompts: never reuse a cached output

    def get(self, key):
        return (TensorImageForTests.images[key],)


class StoryForTests:
    """Test-only node: a STORY parsed by the pack's parser (the Story node's STORY without a text encoder)."""

    RETURN_TYPES = ("STORYDIFFUSION_STORY",)
    FUNCTION = "parse"
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"characters": ("STRING", {"default": ""}), "panels": ("STRING", {"default": ""})}}

    def parse(self, characters, panels):
        from comfyui_storydiffusion.story.parse import parse_story

        return (parse_story(characters, panels),)


class CaptureForTests:
    captured: ClassVar[dict] = {}
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {name: (kind, {"forceInput": True}) for name, kind in (
            ("self_consistency", "FLOAT"), ("self_min", "FLOAT"), ("cross", "FLOAT"), ("report", "STRING"),
            ("heatmap", "IMAGE"), ("panels_out", "CLIP_VISION_OUTPUT"), ("mia_refs_out", "CLIP_VISION_OUTPUT"),
            ("leo_refs_out", "CLIP_VISION_OUTPUT"))}}

    def capture(self, **values):
        CaptureForTests.captured.update(values)
        return {}


@pytest.fixture(scope="module")
def test_nodes(comfy_nodes):
    added = {"ConsistencyTinyEncoder": cf.TinyEncoderNode, "ConsistencyTensorImage": TensorImageForTests,
             "ConsistencyStory": StoryForTests, "ConsistencyCapture": CaptureForTests}
    comfy_nodes.NODE_CLASS_MAPPINGS.update(added)
    yield
    for name in added:
        comfy_nodes.NODE_CLASS_MAPPINGS.pop(name, None)


def graph(encoder: dict, panels="[Mia] a\n[Mia] b", references: dict | None = None, crop="center") -> dict:
    """Story Consistency and core CLIP Vision Encode of the same images, side by side; `encoder` = the node making
    the CLIP_VISION. references: name -> image key."""
    p = {"cv": encoder,
         "panels": {"class_type": "ConsistencyTensorImage", "inputs": {"key": "panels"}},
         "story": {"class_type": "ConsistencyStory", "inputs": {"characters": CHARACTERS, "panels": panels}},
         "core": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["cv", 0], "image": ["panels", 0],
                                                              "crop": crop}}}
    score_inputs = {"clip_vision": ["cv", 0], "panels": ["panels", 0], "story": ["story", 0], "crop": crop,
                    "center_region": 1.0}
    capture = {}
    chain = None
    for name, key in (references or {}).items():
        p[f"img_{name}"] = {"class_type": "ConsistencyTensorImage", "inputs": {"key": key}}
        inputs = {"character": name, "images": [f"img_{name}", 0]}
        if chain:
            inputs["references"] = [chain, 0]
        chain = f"ref_{name}"
        p[chain] = {"class_type": "StoryDiffusionConsistencyReference", "inputs": inputs}
        p[f"core_{name}"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["cv", 0],
                                                                          "image": [f"img_{name}", 0], "crop": crop}}
        capture[f"{name.lower()}_refs_out"] = [f"core_{name}", 0]
    if chain:
        score_inputs["references"] = [chain, 0]
    p["score"] = {"class_type": "StoryDiffusionStoryConsistency", "inputs": score_inputs}
    capture.update({"self_consistency": ["score", 0], "self_min": ["score", 1], "cross": ["score", 2],
                    "report": ["score", 3], "heatmap": ["score", 4], "panels_out": ["core", 0]})
    p["capture"] = {"class_type": "ConsistencyCapture", "inputs": capture}
    return p


def run(comfy, prompt, images: dict) -> tuple[dict, dict]:
    TensorImageForTests.images = images
    CaptureForTests.captured = {}
    outputs = comfy.run(prompt)
    return dict(CaptureForTests.captured), outputs


@pytest.mark.parametrize("kind", cf.KINDS)
def test_node_numbers_are_cosines_of_core_clip_vision_encode(comfy, test_nodes, kind):
    images = {"panels": panels_of(range(7)), "mia": panels_of([20, 21], 40, 40), "leo": panels_of([30], 56, 32)}
    encoder = {"class_type": "ConsistencyTinyEncoder", "inputs": {"kind": kind, "seed": 1}}
    got, outputs = run(comfy, graph(encoder, PANELS, {"Mia": "mia", "Leo": "leo"}), images)

    panel_embeds = got["panels_out"]["image_embeds"]
    assert panel_embeds.ndim == (3 if kind == "siglip" else 2)  # SigLIP: core gives token features, no pooled vector
    matrix = hand_cosines(panel_embeds, panel_embeds)
    mia, leo = pair_stats(matrix, MIA), pair_stats(matrix, LEO)
    assert got["self_consistency"] == pytest.approx((mia[0] + leo[0]) / 2, abs=1e-6)
    assert got["self_min"] == pytest.approx(min(mia[1], leo[1]), abs=1e-6)
    cross_mia = hand_cosines(panel_embeds[list(MIA)], got["mia_refs_out"]["image_embeds"]).mean()
    cross_leo = hand_cosines(panel_embeds[list(LEO)], got["leo_refs_out"]["image_embeds"]).mean()
    assert got["cross"] == pytest.approx(float(cross_mia + cross_leo) / 2, abs=1e-6)
    # the report carries the same per-character numbers, and the node shows it in the UI
    assert f"[Mia] panels 0, 1, 4, 6: self mean {mia[0]:.3f}, min {mia[1]:.3f}" in got["report"]
    assert f"[Leo] panels 3, 4, 5: self mean {leo[0]:.3f}" in got["report"]
    assert "[NC] panel 2: no character, not scored." in got["report"]
    assert outputs["score"]["text"] == [got["report"]]
    assert got["heatmap"].ndim == 4 and got["heatmap"].shape[0] == 1 and got["heatmap"].shape[-1] == 3


def test_crop_none_is_core_crop_none(comfy, test_nodes):
    images = {"panels": panels_of([1, 2, 3], 32, 96)}  # wide panels: center and none see different pixels
    encoder = {"class_type": "ConsistencyTinyEncoder", "inputs": {"kind": "clip", "seed": 0}}
    results = {}
    for crop in ("center", "none"):
        got, _ = run(comfy, graph(encoder, "[Mia] a\n[Mia] b\n[Mia] c", crop=crop), images)
        expected = pair_stats(hand_cosines(got["panels_out"]["image_embeds"], got["panels_out"]["image_embeds"]),
                              (0, 1, 2))
        assert got["self_consistency"] == pytest.approx(expected[0], abs=1e-6)
        results[crop] = got["self_consistency"]
    assert abs(results["center"] - results["none"]) > 1e-4


def test_wrong_panel_count_and_unknown_reference_fail_with_what_to_do(comfy, test_nodes):
    encoder = {"class_type": "ConsistencyTinyEncoder", "inputs": {"kind": "clip", "seed": 0}}
    with pytest.raises(harness.PromptFailed, match=r"3 panel images arrived but the story has 2 panels.*Panels In Story "
                                                   r"Order.*panel_indices"):
        run(comfy, graph(encoder), {"panels": panels_of([1, 2, 3])})
    with pytest.raises(harness.PromptFailed, match=r"names 'mia', which is not a character of the story \(did you mean "
                                                   r"Mia\?\); the story's characters are \[Mia\], \[Leo\]"):
        run(comfy, graph(encoder, references={"mia": "mia"}), {"panels": panels_of([1, 2]), "mia": panels_of([3])})


# ---------------------------------------------------------------------------------------------------
# the numbers (the glue called directly)


@pytest.mark.parametrize("kind", cf.KINDS)
def test_identical_panels_score_one_and_different_ones_do_not(glue, story, encoders, kind):
    seeds = [5, 5, 9, 8, 5, 7, 5]  # Mia's panels (0, 1, 4, 6) all the same picture; Leo's (3, 4, 5) not
    result = glue.score(encoders[kind], panels_of(seeds), story)
    mia, leo = result.scores.characters
    assert mia.self_mean == pytest.approx(1.0, abs=1e-6) and mia.self_min == pytest.approx(1.0, abs=1e-6)
    assert leo.self_min < 1.0 - 1e-6  # panels 3, 4 and 5 are three different pictures
    assert result.encode_calls == 1  # every panel in one encode


@pytest.mark.parametrize("kind", cf.KINDS)
def test_permuting_the_panels_permutes_the_matrix(glue, encoders, kind):
    from comfyui_storydiffusion.story.parse import parse_story

    lines = PANELS.split("\n")
    order = [4, 0, 6, 2, 5, 1, 3]
    panels = panels_of(range(7))
    base = glue.score(encoders[kind], panels, parse_story(CHARACTERS, PANELS)).scores
    moved = glue.score(encoders[kind], panels[order], parse_story(CHARACTERS, "\n".join(lines[i] for i in order))).scores
    torch.testing.assert_close(moved.matrix, base.matrix[order][:, order], atol=1e-6, rtol=0)
    for a, b in zip(base.characters, moved.characters, strict=True):
        assert a.name == b.name
        assert b.self_mean == pytest.approx(a.self_mean, abs=1e-6)
        assert sorted(order[r] for r in b.rows) == list(a.rows)
    assert moved.self_consistency == pytest.approx(base.self_consistency, abs=1e-6)
    assert not torch.allclose(moved.matrix, base.matrix, atol=1e-4)  # the permutation really moved something


def test_story_groups_and_nc_panels(glue, story, encoders):
    cv = encoders["clip"]
    panels = panels_of(range(7))
    base = glue.score(cv, panels, story).scores
    mia, leo = base.characters
    assert (mia.rows, leo.rows, base.unscored) == (MIA, LEO, NC)
    assert (mia.self_mean, mia.self_min) == pytest.approx(pair_stats(base.matrix, MIA), abs=1e-12)
    assert (leo.self_mean, leo.self_min) == pytest.approx(pair_stats(base.matrix, LEO), abs=1e-12)
    # another [NC] picture changes the matrix but no score; another Leo-only picture changes Leo only
    nc_changed = panels.clone()
    nc_changed[2] = pattern(99)[0]
    other = glue.score(cv, nc_changed, story).scores
    assert not torch.allclose(other.matrix[2], base.matrix[2], atol=1e-4)
    assert (other.self_consistency, other.self_min) == pytest.approx((base.self_consistency, base.self_min), abs=1e-6)
    leo_changed = panels.clone()
    leo_changed[5] = pattern(98)[0]
    other = glue.score(cv, leo_changed, story).scores
    assert other.characters[0].self_mean == pytest.approx(mia.self_mean, abs=1e-6)
    assert abs(other.characters[1].self_mean - leo.self_mean) > 1e-5


def test_references_are_scored_against_their_own_character_only(glue, story, encoders):
    cv = encoders["dinov2"]
    panels = panels_of(range(7))
    mia_refs, leo_refs = panels_of([40, 41], 40, 40), panels_of([50])
    base = glue.score(cv, panels, story, [ref("Mia", mia_refs), ref("Leo", leo_refs)]).scores
    mia, leo = base.characters
    core = cv.encode_image(panels)["image_embeds"]
    assert mia.cross_mean == pytest.approx(float(hand_cosines(core[list(MIA)], cv.encode_image(mia_refs)["image_embeds"])
                                                 .mean()), abs=1e-6)
    assert leo.cross_mean == pytest.approx(float(hand_cosines(core[list(LEO)], cv.encode_image(leo_refs)["image_embeds"])
                                                 .mean()), abs=1e-6)
    assert (mia.reference_count, leo.reference_count) == (2, 1)
    other = glue.score(cv, panels, story, [ref("Mia", mia_refs), ref("Leo", panels_of([51]))]).scores
    assert other.characters[0].cross_mean == pytest.approx(mia.cross_mean, abs=1e-9)
    assert abs(other.characters[1].cross_mean - leo.cross_mean) > 1e-6
    only_mia = glue.score(cv, panels, story, [ref("Mia", mia_refs)]).scores
    assert only_mia.characters[1].cross_mean is None
    assert only_mia.cross_consistency == pytest.approx(mia.cross_mean, abs=1e-9)


def test_mixed_sizes_are_resized_by_core_and_said_so(glue, story, encoders):
    cv = encoders["clip"]
    panels, refs = panels_of(range(7), 48, 64), panels_of([60, 61], 100, 30)
    result = glue.score(cv, panels, story, [ref("Mia", refs)])
    assert result.encode_calls == 2  # one per size: every panel still in one batch
    assert "Images of 2 sizes (30x100, 64x48) were encoded in 2 batches" in result.report
    assert "resizes every image to the encoder's 32 px input (centre-cropped)" in result.report
    expected = hand_cosines(cv.encode_image(panels)["image_embeds"][list(MIA)], cv.encode_image(refs)["image_embeds"])
    assert result.scores.characters[0].cross_mean == pytest.approx(float(expected.mean()), abs=1e-6)
    same_size = glue.score(cv, panels, story, [ref("Mia", panels_of([60, 61], 48, 64))])
    assert same_size.encode_calls == 1 and "sizes" not in same_size.report


def test_one_panel_characters_and_references_without_panels(glue, encoders):
    from comfyui_storydiffusion.story.parse import parse_story

    cv = encoders["siglip"]
    story = parse_story(CHARACTERS, "[Mia] a\n[Leo] b\n[Mia] c")
    scores = glue.score(cv, panels_of([1, 2, 3]), story)
    assert "[Leo] panel 1 only: no self score (it takes two panels of the character" in scores.report
    assert scores.scores.self_consistency == pytest.approx(scores.scores.characters[0].self_mean)  # Mia only
    lonely = parse_story(CHARACTERS, "[Mia] a\n[Leo] b\n[NC] c")
    result = glue.score(cv, panels_of([1, 2, 3]), lonely, [ref("Mia", panels_of([4]))])
    assert np.isnan(result.scores.self_consistency) and np.isnan(result.scores.self_min)
    assert "No character appears in two scored panels, so there is no self score (NaN)." in result.report
    assert result.scores.cross_consistency == pytest.approx(result.scores.characters[0].cross_mean)
    # a subset of the panels (Select Story Panels' selection) that does not show a referenced character
    from comfyui_storydiffusion.story.model import PanelSelection

    subset = glue.score(cv, panels_of([1, 3]), story, [ref("Leo", panels_of([4]))],
                        selected_rows=PanelSelection((0, 2), 3).rows)
    assert "[Mia] panels 0, 2: self mean" in subset.report
    assert "[Leo] in no scored panel: 1 reference image but no scored panel shows it: no cross score" in subset.report
    assert "2 of the story's 3 panels" in subset.report and np.isnan(subset.scores.cross_consistency)


def test_edge_cases_say_what_to_do(glue, story, encoders, pack):
    from comfyui_storydiffusion.consistency.score import ConsistencyError
    from comfyui_storydiffusion.nodes.consistency import StoryConsistency, StoryConsistencyReference
    from comfyui_storydiffusion.story.model import PanelSelection

    cv = encoders["clip"]
    with pytest.raises(ConsistencyError, match="The panels IMAGE batch is empty"):
        glue.score(cv, torch.zeros(0, 32, 32, 3), story)
    with pytest.raises(ConsistencyError, match="6 panel images arrived but the story has 7 panels"):
        glue.score(cv, panels_of(range(6)), story)
    with pytest.raises(ConsistencyError, match="panel_indices lists 2 story panels but 3 panel images arrived"):
        glue.score(cv, panels_of(range(3)), story, selected_rows=(0, 1))
    with pytest.raises(ConsistencyError, match=r"'Tom', which is not a character of the story; .*\[Mia\], \[Leo\]"):
        glue.score(cv, panels_of(range(7)), story, [ref("Tom", panels_of([1]))])
    with pytest.raises(ConsistencyError, match="Two Story Consistency Reference nodes name 'Mia'"):
        glue.score(cv, panels_of(range(7)), story, [ref("Mia", panels_of([1])), ref("Mia", panels_of([2]))])
    node = StoryConsistency()
    with pytest.raises(ConsistencyError, match="panel_indices comes from a story of 3 panels but this story has 7"):
        node.score(cv, panels_of(range(2)), story, "center", 1.0, panel_indices=PanelSelection((0, 1), 3))
    binder = StoryConsistencyReference()
    with pytest.raises(ConsistencyError, match="needs the character's name"):
        binder.bind("  ", panels_of([1]))
    with pytest.raises(ConsistencyError, match="for 'Mia': the IMAGE batch is empty"):
        binder.bind("Mia", torch.zeros(0, 8, 8, 3))
    (chain,) = binder.bind("Mia", panels_of([1]))
    with pytest.raises(ConsistencyError, match="'Mia' already has a Story Consistency Reference node"):
        binder.bind("Mia", panels_of([2]), chain)
    (chain,) = binder.bind(" Leo ", panels_of([2]), chain)
    assert [r.character for r in chain] == ["Mia", "Leo"]


def test_center_region_scores_the_middle_of_each_panel(glue, story, encoders):
    cv = encoders["clip"]
    panels = panels_of(range(7), 60, 80)
    middle = panels[:, 15:45, 20:60, :]  # the central half of each side
    cropped = glue.score(cv, panels, story, region=0.5).scores
    direct = glue.score(cv, middle, story).scores
    torch.testing.assert_close(cropped.matrix, direct.matrix, atol=1e-9, rtol=0)
    assert not torch.allclose(cropped.matrix, glue.score(cv, panels, story).scores.matrix, atol=1e-4)


def test_report_names_the_least_consistent_panel(pack):
    from comfyui_storydiffusion.consistency.score import format_report, score_story

    # three panels of Mia point the same way, the fourth away: it is the outlier
    embeds = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.2, 1.0]], dtype=torch.float64)
    scores = score_story(embeds, [("Mia",)] * 4, ["Mia", "Leo"])
    (mia,) = scores.characters
    assert mia.outlier == 3 and mia.outlier_gap > 0.5
    report = format_report(scores, "test vectors", 4)
    assert "least consistent: panel 3" in report and "[Leo]" not in report


# ---------------------------------------------------------------------------------------------------
# the heatmap


def test_heatmap_outlines_each_characters_pairs_and_shows_the_panels(pack):
    from comfyui_storydiffusion.consistency.heatmap import (
        PALETTE,
        FontSet,
        Group,
        plan_layout,
        render_heatmap,
        scale_colour,
    )

    n = 4
    matrix = np.array([[1.0, 0.9, 0.5, 0.7], [0.9, 1.0, 0.6, 0.8], [0.5, 0.6, 1.0, 0.4], [0.7, 0.8, 0.4, 1.0]])
    colours = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0)]
    images = np.stack([np.broadcast_to(np.array(c, dtype=np.float32), (30, 40, 3)) for c in colours])
    groups = [Group("Mia", (0, 1), "[Mia]"), Group("Leo", (1, 3), "[Leo]")]
    labels = ["0", "1", "2", "3"]
    picture = render_heatmap(matrix, images, labels, groups, "title")
    again = render_heatmap(matrix, images, labels, groups, "title")
    assert np.array_equal(picture, again)  # deterministic
    lay = plan_layout(n, labels, ["[Mia]", "[Leo]"], "title", FontSet())
    assert picture.shape == (lay.height, lay.width, 3)
    y0, x0, cell = lay.grid_y, lay.grid_x, lay.cell
    # cell colours: the diagonal at the top of the scale, 0.4 (the lowest value, the scale's floor) at the bottom
    assert tuple(picture[y0 + 2 * cell + 4, x0 + 2 * cell + 4]) == scale_colour(1.0)
    assert tuple(picture[y0 + 2 * cell + 4, x0 + 3 * cell + 4]) == scale_colour(0.0)
    assert tuple(picture[y0 + 4, x0 + 2 * cell + 4]) == scale_colour((0.5 - 0.4) / 0.6)
    # thumbnails: panel 2 (blue) above column 2 and left of row 2
    assert tuple(picture[y0 - 10, x0 + 2 * cell + cell // 2]) == (0, 0, 255)
    assert tuple(picture[y0 + 2 * cell + cell // 2, x0 - 10]) == (0, 0, 255)
    # Mia's block (rows/columns 0-1) is outlined in her colour on its outer edge, not inside it
    assert tuple(picture[y0 + cell, x0 + 1]) == PALETTE[0]
    assert tuple(picture[y0 + cell // 2, x0 + cell - 1]) != PALETTE[0]
    # Leo's pairs (1, 3) are two separate blocks: cells (1, 1), (1, 3), (3, 1), (3, 3) get his colour, (2, 2) not
    leo = np.all(picture == np.array(PALETTE[1]), axis=-1)
    for i, j in ((1, 1), (1, 3), (3, 1), (3, 3)):
        assert leo[y0 + i * cell: y0 + (i + 1) * cell, x0 + j * cell: x0 + (j + 1) * cell].any(), (i, j)
    assert not leo[y0 + 2 * cell: y0 + 3 * cell, x0 + 2 * cell: x0 + 3 * cell].any()


# ---------------------------------------------------------------------------------------------------
# full-size files in the public layouts, through core's loader


@pytest.mark.parametrize("kind", cf.KINDS)
def test_full_size_files_load_through_core_loader_with_every_weight(pack, kind):
    import comfy.clip_vision
    from safetensors import safe_open

    path = cf.cached_full_size(kind)
    model = comfy.clip_vision.load(path)
    expected = {"clip": ("CLIPVisionModelProjection", 224), "siglip": ("CLIPVisionModelProjection", 384),
                "dinov2": ("Dinov2Model", 518)}[kind]
    assert (type(model.model).__name__, model.image_size) == expected
    state = model.model.state_dict()
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert set(state) <= keys, f"weights core builds but the file lacks: {sorted(set(state) - keys)[:5]}"
        for name in list(state)[:: max(1, len(state) // 40)]:  # a sample of tensors: loaded as written
            torch.testing.assert_close(state[name].float(), f.get_tensor(name).float(), atol=0, rtol=0)
    unused = keys - set(state)
    if kind == "siglip":  # the public file's attention-pooling head: core does not load it (no pooled vector)
        assert unused == set(cf.siglip_head_shapes()) and model.model.visual_projection(torch.ones(2)).tolist() == [1, 1]
        assert model.model.vision_model.embeddings.class_embedding is None
    else:
        assert not unused
    del model, state
    gc.collect()


def test_full_size_vit_l_in_the_executor_equals_core_clip_vision_encode(comfy, test_nodes, models_dir):
    """Load CLIP Vision on a real-size ViT-L/14 file: the node's number is the cosine of core's two embeddings."""
    import os

    target = models_dir / "clip_vision" / "consistency_vit_l.safetensors"
    if not target.exists():
        os.symlink(cf.cached_full_size("clip"), target)
    encoder = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "consistency_vit_l.safetensors"}}
    got, _ = run(comfy, graph(encoder), {"panels": panels_of([7, 8], 64, 64)})
    embeds = got["panels_out"]["image_embeds"]
    assert embeds.shape == (2, 768)
    assert got["self_consistency"] == pytest.approx(float(hand_cosines(embeds, embeds)[0, 1]), abs=1e-6)
    assert "CLIP at 224 px, 768-d image_embeds" in got["report"]
