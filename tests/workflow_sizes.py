"""Sizes, steps and frame counts: the shipped workflows carry real settings, the tests run them small.

The shipped files (workflows/*.json) hold what a user of each model family runs (512 or 1024 px, 20-30 steps, 16 or 33
frames per transition). The tests run the same files on tiny random models on a CPU, so they set the widgets that
decide the cost of a run themselves. This module is the one place that knows which widgets those are, per node type,
and the values the tests use:

- the browser test (tests/test_workflows.py) loads a shipped workflow unchanged, checks it, then sets these widgets in
  the page (tests/browser/run_workflow.mjs --set, by node id and widget name) before the frontend queues it;
- tests/test_shipped_workflows.py reads the same widgets of every shipped file (`widget_values`) and checks that none
  is saved with a test value.

A widget that is linked (e.g. Empty Latent Image's batch_size from the Story's panel_count, Wan's length from the
predictor's total_frames) is never set: the link decides it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import workflow_builder  # scripts/ is not a package: found through the path set above

TEST_SIZE = 64  # px: 8x8 latents, the smallest every family's VAE and patch size divide (Wan 2.1: 64 px -> 8x8)
TEST_STEPS = 2  # a first step and one after it: multistep samplers (dpmpp_2m, uni_pc, res_multistep) use their history
# frames per transition: 4k + 1 for Wan's VAE (2 latent frames: the first alone, then 4), and more than the
# AnimateDiff test window below, so its context windows slide
TEST_FRAMES = 5
TEST_SWEEP = "0, 1"  # two runs of a swept setting (Value List): no sharing, and all tokens shared
TEST_CONTEXT_LENGTH, TEST_CONTEXT_OVERLAP = 4, 2  # AnimateDiff-Evolved context windows: 0-3, then the last 4 frames

# node type -> {widget name: the value the tests run with}: every widget that sets a size, a step count or a frame
# count in a shipped workflow
TEST_VALUES: dict[str, dict[str, int | str]] = {
    "EmptyLatentImage": {"width": TEST_SIZE, "height": TEST_SIZE},
    "EmptySD3LatentImage": {"width": TEST_SIZE, "height": TEST_SIZE},
    "WanFirstLastFrameToVideo": {"width": TEST_SIZE, "height": TEST_SIZE, "length": TEST_FRAMES},
    "KSampler": {"steps": TEST_STEPS},
    "StoryDiffusionValueList": {"values": TEST_SWEEP},  # runs: one per value
    # its steps and panel size are the reading KSampler's and latent's: the tests set both alike
    "StoryDiffusionIdentityBankFromImages": {"steps": TEST_STEPS, "width": TEST_SIZE, "height": TEST_SIZE},
    "StoryDiffusionSemanticMotionPredictor": {"frames": TEST_FRAMES},
    # not a size: a story split among machines (story_distributed) runs on the one test server, every panel there
    "StoryDiffusionSelectPanels": {"participants": 1},
    "ADE_StandardStaticContextOptions": {"context_length": TEST_CONTEXT_LENGTH,
                                         "context_overlap": TEST_CONTEXT_OVERLAP},
}
FRONTEND_ONLY = ("MarkdownNote", "Note")


def linked_widgets(node: dict) -> set[str]:
    """Names of the widgets of a UI-format node that are fed by a link (the link decides their value)."""
    return {i["widget"]["name"] for i in node.get("inputs", []) if "widget" in i and i.get("link") is not None}


def browser_settings(workflow: dict) -> dict[str, dict[str, int]]:
    """{node id: {widget: test value}} for a UI-format workflow: what run_workflow.mjs --set changes in the page."""
    settings = {}
    for node in workflow["nodes"]:
        values = TEST_VALUES.get(node["type"], {})
        unlinked = {name: value for name, value in values.items() if name not in linked_widgets(node)}
        if unlinked:
            settings[str(node["id"])] = unlinked
    return settings


def widget_values(node: dict, info: dict) -> dict:
    """{widget name: saved value} of a UI-format node, read from its positional widgets_values with the node's inputs
    in /object_info form (`info`: {"input": ..., "input_order": ...}), the way the frontend restores them: each widget
    in input order, a seed's control-after-generate and an image upload button taking their own slots."""
    values = list(node.get("widgets_values", []))
    named, i = {}, 0
    for name, kind, options in workflow_builder.node_inputs(info):
        if not workflow_builder.is_widget(kind, options):
            continue
        if i < len(values):
            named[name] = values[i]
        i += len(workflow_builder.widget_slots(name, kind, options, None))
    return named
