"""Select Story Panels' 'panels that are not identity panels' and its 'panels' output, and the Panels In
Story Order node that joins the images of separate runs (identity panels, then the rest) in story order."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import harness
import tiny_models

CHARACTERS = "[Mia] a girl with red hair\n[Leo] an old man with a beard"
# Mia, Leo, [NC], Mia, Leo, Mia: with two identity panels per character, Mia's are 0 and 3 and Leo's 1 and 4
PANELS = ("[Mia] at a bus stop # Monday.\n[Leo] reads a paper\n[NC] rain on the street\n"
          "[Mia] runs for the bus\n[Leo] waves\n[Mia] smiles # The end.")
NOT_IDENTITY = "panels that are not identity panels"
SIZE = 8


@pytest.fixture(scope="module")
def story_outputs(comfy_nodes):
    clip = tiny_models.make_clip("sd15", seed=3)
    return comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]().build(clip, CHARACTERS, PANELS, "(No style)", "", 2)


@pytest.fixture(scope="module")
def select(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionSelectPanels"]()


@pytest.fixture(scope="module")
def order(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStoryOrder"]()


def panel_images(rows, size=SIZE) -> torch.Tensor:
    """One constant image per story panel: panel i is filled with (i + 1) / 10, so positions are checkable."""
    return torch.stack([torch.full((size, size, 3), (r + 1) / 10) for r in rows])


def selection(rows, length=6):
    from comfyui_storydiffusion.story.model import PanelSelection

    return PanelSelection(rows=tuple(rows), story_length=length)


def test_the_story_has_identity_panels_0_1_3_4(pack):
    from comfyui_storydiffusion.story.parse import parse_story

    story = parse_story(CHARACTERS, PANELS, identity_panels=2)
    assert story.identity_panels == {"Mia": (0, 3), "Leo": (1, 4)}
    assert story.identity_rows == (0, 1, 3, 4)
    assert story.other_rows == (2, 5)


def test_selects_the_panels_that_are_not_identity_panels(select, story_outputs):
    positive, negative, _, story, count = story_outputs
    assert count == 6 and story.identity_rows == (0, 1, 3, 4)
    ((cond, extras),), ((neg_cond, _),) = positive, negative
    for choice, rows in [(NOT_IDENTITY, [2, 5]), ("identity panels", [0, 1, 3, 4]), ("panel range", [1, 2, 3, 4, 5])]:
        pos, neg, picked, first, panels, _ = select.select(positive, negative, story, choice, 1, 0)
        ((p_cond, p_extras),), ((n_cond, _),) = pos, neg
        assert torch.equal(p_cond, cond[rows])
        assert torch.equal(p_extras["pooled_output"], extras["pooled_output"][rows])
        assert torch.equal(n_cond, neg_cond[rows])
        assert (picked, first) == (len(rows), rows[0])
        assert panels.rows == tuple(rows) and panels.story_length == 6


def test_the_selection_value_is_frozen_and_checked(pack):
    import dataclasses

    panels = selection([2, 5])
    with pytest.raises(dataclasses.FrozenInstanceError):
        panels.rows = (1,)
    with pytest.raises(ValueError, match="outside the story"):
        selection([6])
    with pytest.raises(ValueError, match="lists a panel twice"):
        selection([2, 2])


def test_no_other_panels_is_a_clear_error(select, comfy_nodes):
    clip = tiny_models.make_clip("sd15", seed=3)
    positive, negative, _, story, _ = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]().build(
        clip, CHARACTERS, "[Mia] at a bus stop\n[Leo] reads a paper", "(No style)", "", 3)
    with pytest.raises(ValueError, match="every one of the story's 2 panels is an identity panel"):
        select.select(positive, negative, story, NOT_IDENTITY, 0, 0)


def test_selection_values_keep_their_order_for_saved_workflows(select):
    assert select.SELECTIONS == ("identity panels", "panel range", NOT_IDENTITY)
    spec = type(select).INPUT_TYPES()["required"]["select"]
    assert spec[0] == list(select.SELECTIONS) and spec[1]["default"] == "identity panels"
    assert type(select).RETURN_NAMES == ("positive", "negative", "panel_count", "first_panel", "panels", "latent")
    assert type(select).RETURN_TYPES[4] == "STORYDIFFUSION_PANELS" and len(type(select).OUTPUT_TOOLTIPS) == 6


def test_story_order_puts_every_image_at_its_story_index(order):
    images, count = order.join(panel_images([0, 1, 3, 4]), selection([0, 1, 3, 4]),
                               panel_images([2, 5]), selection([2, 5]), False)
    assert count == 6 and images.shape == (6, SIZE, SIZE, 3)
    for i in range(6):
        assert torch.all(images[i] == (i + 1) / 10), f"position {i} holds the wrong panel"
    # rows in any order within a run, and an optional third pair
    images, count = order.join(panel_images([4, 0]), selection([4, 0]), panel_images([5, 2]), selection([5, 2]),
                               False, panel_images([3, 1]), selection([3, 1]))
    assert count == 6 and [round(float(images[i, 0, 0, 0]) * 10) - 1 for i in range(6)] == list(range(6))


def test_story_order_with_gaps_joins_the_panels_given(order):
    images, count = order.join(panel_images([0, 3]), selection([0, 3]), panel_images([5]), selection([5]), True)
    assert count == 3
    assert [round(float(images[i, 0, 0, 0]) * 10) - 1 for i in range(3)] == [0, 3, 5]


@pytest.mark.parametrize("a,b,message", [
    # (image rows, selected rows, story length, image size) of each run
    (([0, 1, 3], [0, 1, 3, 4], 6, SIZE), ([2, 5], [2, 5], 6, SIZE),
     r"images_a has 3 images but panels_a selects 4 panels \(0-1, 3-4\)"),
    (([0, 1, 3, 4], [0, 1, 3, 4], 6, SIZE), ([2, 5], [2, 5], 7, SIZE),
     r"different stories \(panels_a from a story of 6 panels, panels_b from a story of 7 panels\)"),
    (([0, 1, 3, 4], [0, 1, 3, 4], 6, SIZE), ([2, 4, 5], [2, 4, 5], 6, SIZE),
     r"story panel 4 is given twice \(in panels_a and panels_b\)"),
    (([0, 1, 3, 4], [0, 1, 3, 4], 6, SIZE), ([2, 5], [2, 5], 6, 16),
     r"images_a are 8x8 but images_b are 16x16.*does not resize"),
    (([0, 1, 3], [0, 1, 3], 6, SIZE), ([5], [5], 6, SIZE),
     r"story panels 2, 4 are in none of the inputs .*allow_gaps"),
])
def test_story_order_errors_say_what_to_do(order, a, b, message):
    args = []
    for image_rows, rows, length, size in (a, b):
        args += [panel_images(image_rows, size), selection(rows, length)]
    with pytest.raises(ValueError, match=message):
        order.join(*args, False)


def test_story_order_needs_both_halves_of_the_third_pair(order):
    with pytest.raises(ValueError, match="images_c is connected but panels_c is not"):
        order.join(panel_images([0]), selection([0], 2), panel_images([1]), selection([1], 2), False,
                   images_c=panel_images([1]))


class PanelImagesNode:
    """Test-only node: one constant image per selected panel, filled with (story index + 1) / 10."""

    CATEGORY = "tests"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"panels": ("STORYDIFFUSION_PANELS",), "size": ("INT", {"default": SIZE, "min": 1})}}

    def make(self, panels, size):
        return (panel_images(panels.rows, size),)


def test_two_runs_join_in_story_order_through_the_executor(comfy, comfy_nodes, checkpoint_files, output_dir):
    """Story -> Select Story Panels (identity / not identity) -> images per run -> Panels In Story Order."""
    comfy_nodes.NODE_CLASS_MAPPINGS["TestStoryPanelImages"] = PanelImagesNode
    try:
        def select_node(choice):
            return {"class_type": "StoryDiffusionSelectPanels", "inputs": {
                "positive": ["2", 0], "negative": ["2", 1], "story": ["2", 3], "select": choice,
                "first_panel": 0, "count": 0}}

        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_files("sd15")}},
            "2": {"class_type": "StoryDiffusionStory", "inputs": {
                "clip": ["1", 1], "characters": CHARACTERS, "panels": PANELS, "style": "(No style)",
                "negative": "", "identity_panels": 2}},
            "3": select_node("identity panels"),
            "4": select_node(NOT_IDENTITY),
            "5": {"class_type": "TestStoryPanelImages", "inputs": {"panels": ["3", 4], "size": SIZE}},
            "6": {"class_type": "TestStoryPanelImages", "inputs": {"panels": ["4", 4], "size": SIZE}},
            "7": {"class_type": "StoryDiffusionStoryOrder", "inputs": {
                "images_a": ["6", 0], "panels_a": ["4", 4], "images_b": ["5", 0], "panels_b": ["3", 4],
                "allow_gaps": False}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "story_order"}},
            "9": {"class_type": "PreviewAny", "inputs": {"source": ["7", 1]}},
            "10": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
        }
        outputs = comfy.run(prompt)
        assert list(outputs["9"]["text"]) == ["6"]
        assert list(outputs["10"]["text"]) == ["2"]
        saved = outputs["8"]["images"]
        assert len(saved) == 6
        for i, info in enumerate(saved):
            pixels = np.asarray(Image.open(os.path.join(output_dir, info["subfolder"], info["filename"])))
            assert pixels.shape == (SIZE, SIZE, 3)
            assert np.abs(pixels.astype(int) - (i + 1) / 10 * 255).max() <= 1, f"saved image {i} is not story panel {i}"

        # a missing panel reaches the user through the executor too
        prompt["7"]["inputs"]["panels_b"] = ["4", 4]
        prompt["7"]["inputs"]["images_b"] = ["6", 0]
        with pytest.raises(harness.PromptFailed, match="story panel 2 is given twice"):
            comfy.run(prompt)
    finally:
        del comfy_nodes.NODE_CLASS_MAPPINGS["TestStoryPanelImages"]
