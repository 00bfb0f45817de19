"""No shipped workflow keeps test sizes: each one carries the settings a user of its model family runs.

A template is something people run as it is: a file saved at the tests' 64 px and 2 steps gives a page of noise with
real weights. The tests set their own sizes, steps and frame counts when they run a file (tests/workflow_sizes.py);
this module checks what the files themselves hold, read by widget name from workflows/*.json:

- every widget that sets a size, a step count or a frame count is one tests/workflow_sizes.py knows (so the browser
  test shrinks it);
- each is at least its model family's real minimum (FAMILIES, with the reasoning), and the tests' own value is below
  that minimum, so a test value saved into a file fails here;
- each workflow's note states the settings the file ships with (size, steps, frames) and what fits a 24 GB card.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

import comfy_env
import workflow_sizes

REPO = comfy_env.REPO
WORKFLOWS_DIR = os.path.join(REPO, "workflows")
SHIPPED = sorted(f[:-5] for f in os.listdir(WORKFLOWS_DIR) if f.endswith(".json"))


@dataclass(frozen=True)
class Family:
    min_side: int  # px, the shorter side of an image or a video frame
    side_why: str
    min_steps: int
    steps_why: str


# What a first real run of each family needs at least (the shipped files go above: 20-30 steps, 512 / 1024 px).
FAMILIES = {
    "SD1.5": Family(512, "trained at 512 px: smaller images lose their composition (repeated, cut-off faces)",
                    20, "dpmpp_2m / euler need about 20 steps to converge: fewer leave noise"),
    "SDXL": Family(768, "trained at about one megapixel (1024 px buckets): 768 px is the least that keeps it whole",
                   20, "about 20 steps to converge"),
    "Flux.1 dev": Family(512, "trained from 0.25 to 2 megapixels", 20,
                         "guidance-distilled, not step-distilled: under about 20 steps images stay unfinished"),
    "Z-Image Turbo": Family(512, "below 512 px it leaves its training range", 8,
                            "step-distilled to 8 steps (its model card; ComfyUI's template uses 9): fewer blur"),
    "Wan 2.1 FLF2V": Family(480, "480p (832x480) is the smallest resolution Wan 2.1 was trained at", 20,
                            "its samplers need about 20 steps (the reference code uses 40-50)"),
}
# the model file a workflow loads -> its family (a workflow with another file must be added here)
FAMILY_BY_MODEL = {
    "v1-5-pruned-emaonly-fp16.safetensors": "SD1.5",
    "v1-5-pruned-emaonly.safetensors": "SD1.5",
    "sd_xl_base_1.0.safetensors": "SDXL",
    "flux1-dev.safetensors": "Flux.1 dev",
    "z_image_turbo_bf16.safetensors": "Z-Image Turbo",
    "wan2.1_flf2v_720p_14B_fp16.safetensors": "Wan 2.1 FLF2V",
}
MODEL_WIDGETS = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name"}
# a transition of fewer frames is a jump cut, not motion: one second at 16 fps, and AnimateDiff's 16-frame clips
MIN_FRAMES_PER_TRANSITION = 16
# mm_sd_v15_v2 was trained on 16-frame clips: shorter context windows break its motion; ADE's default overlap is 4
MIN_CONTEXT_LENGTH, MIN_CONTEXT_OVERLAP = 16, 4
# widget names that size a run: a node type in a shipped workflow with one of these (unlinked) must be in
# workflow_sizes.TEST_VALUES, or the browser test would run it at full size on the CPU
SIZE_WIDGET_NAMES = {"width", "height", "steps", "frames", "length", "context_length", "context_overlap"}


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOWS_DIR, f"{name}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def node_info(comfy_nodes, request):
    """`info(node type)` -> its inputs in /object_info form, from the node classes of the in-process ComfyUI (and
    AnimateDiff-Evolved's, loaded in-process when a workflow uses them; skips without the snapshot)."""
    def info(node_type: str) -> dict:
        if node_type not in comfy_nodes.NODE_CLASS_MAPPINGS and node_type.startswith("ADE_"):
            request.getfixturevalue("ade")
        if node_type not in comfy_nodes.NODE_CLASS_MAPPINGS and node_type.startswith("Distributed"):
            request.getfixturevalue("distributed")  # ComfyUI-Distributed (story_distributed)
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_type]
        if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 nodes describe themselves
            return cls.GET_NODE_INFO_V1()
        inputs = cls.INPUT_TYPES()
        return {"input": inputs, "input_order": {section: list(values) for section, values in inputs.items()}}
    return info


def executable(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] not in workflow_sizes.FRONTEND_ONLY]


def family_of(workflow: dict, node_info) -> str:
    models = {workflow_sizes.widget_values(n, node_info(n["type"]))[MODEL_WIDGETS[n["type"]]]
              for n in executable(workflow) if n["type"] in MODEL_WIDGETS}
    unknown = sorted(m for m in models if m not in FAMILY_BY_MODEL)
    assert not unknown, f"no family for {unknown}: add the model file to FAMILY_BY_MODEL (with its family's minimums)"
    families = {FAMILY_BY_MODEL[m] for m in models}
    assert len(families) == 1, f"one model family per workflow, found {families}"
    return families.pop()


def size_settings(workflow: dict, node_info) -> list[tuple[dict, str, object]]:
    """(node, widget, saved value) of every unlinked size/steps/frames widget of the workflow."""
    out = []
    for node in executable(workflow):
        values = workflow_sizes.widget_values(node, node_info(node["type"]))
        linked = workflow_sizes.linked_widgets(node)
        for name in sorted(set(values) & SIZE_WIDGET_NAMES - linked):
            out.append((node, name, values[name]))
    return out


def minimum(family: Family, node_type: str, widget: str) -> tuple[int, str]:
    """(the least a real run uses for this widget, why)."""
    if widget in ("width", "height"):
        return family.min_side, family.side_why
    if widget == "steps":
        return family.min_steps, family.steps_why
    if widget in ("frames", "length"):
        return MIN_FRAMES_PER_TRANSITION, "frames per transition: one second at 16 fps"
    if widget == "context_length":
        return MIN_CONTEXT_LENGTH, "mm_sd_v15_v2 was trained on 16-frame clips"
    if widget == "context_overlap":
        return MIN_CONTEXT_OVERLAP, "AnimateDiff-Evolved's default overlap"
    raise AssertionError(f"{node_type}.{widget}: no minimum in this test")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_carries_real_settings(name, node_info):
    workflow = load(name)
    family_name = family_of(workflow, node_info)
    family = FAMILIES[family_name]
    settings = size_settings(workflow, node_info)
    assert settings, f"{name}: no size or steps widget found"
    problems = []
    for node, widget, value in settings:
        label = f"node {node['id']} ({node['type']}).{widget}"
        test_value = workflow_sizes.TEST_VALUES.get(node["type"], {}).get(widget)
        if test_value is None:
            problems.append(f"{label}: tests/workflow_sizes.py TEST_VALUES does not shrink it for the tests")
            continue
        least, why = minimum(family, node["type"], widget)
        assert test_value < least, f"{label}: the test value {test_value} is not below the minimum {least}"
        if value < least:
            problems.append(f"{label} = {value}: below {least} ({why})")
        if node["type"] in ("StoryDiffusionSemanticMotionPredictor", "WanFirstLastFrameToVideo") and \
                widget in ("frames", "length") and family_name == "Wan 2.1 FLF2V" and (value - 1) % 4:
            problems.append(f"{label} = {value}: Wan 2.1 needs 4k + 1 frames (its VAE packs 4 frames per latent frame)")
    assert problems == [], f"{name} is saved with settings no real run uses:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_note_states_its_settings(name, node_info):
    """The note a user reads states the size, steps and frames the file ships with, and what fits a 24 GB card."""
    workflow = load(name)
    notes = "\n".join(str(v) for n in workflow["nodes"] if n["type"] in workflow_sizes.FRONTEND_ONLY
                      for v in n["widgets_values"])
    assert "24 GB" in notes, f"{name}: the note does not say what fits a 24 GB card"
    missing = []
    for node in executable(workflow):
        values = workflow_sizes.widget_values(node, node_info(node["type"]))
        linked = workflow_sizes.linked_widgets(node)
        if {"width", "height"} <= set(values) - linked and f"{values['width']}×{values['height']}" not in notes:
            missing.append(f"{values['width']}×{values['height']} ({node['type']})")
        if "steps" in values and f"{values['steps']} steps" not in notes:
            missing.append(f"{values['steps']} steps ({node['type']})")
        if "frames" in values and "frames" not in linked and f"{values['frames']} frames per transition" not in notes:
            missing.append(f"{values['frames']} frames per transition ({node['type']})")
    assert missing == [], f"{name}: its note does not state {missing}"
