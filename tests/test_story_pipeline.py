"""The story node inside real prompts: STORY -> consistent attention groups, panel_count -> latent batch,
captions -> comic pages, and clear errors for bad stories and batch mismatches."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import harness
import tiny_models

CHARACTERS = "[Mia] a girl with red hair\n[Leo] an old man with a beard"
PANELS = "[Mia] at a bus stop # Monday.\n[Leo] reads a paper\n[Mia] and [Leo] on the bus # 你好!\n[NC] rain # The end."


def csa_defaults(comfy_nodes) -> dict:
    spec = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionConsistentSelfAttention"].INPUT_TYPES()["required"]
    return {name: (opts[1]["default"] if len(opts) > 1 and "default" in opts[1] else opts[0][0])
            for name, opts in spec.items() if name != "model"}


def test_story_map_drives_the_attention_groups(comfy_nodes, pack):
    from comfyui_storydiffusion.attention import comfy as csa

    clip = tiny_models.make_clip("sd15", seed=3)
    _, _, _, story, count = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]().build(
        clip, CHARACTERS, PANELS, "(No style)", "", 1)
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionConsistentSelfAttention"]()
    (patched,) = node.patch(tiny_models.make_model("sd15"), story=story, **csa_defaults(comfy_nodes))
    config = csa.config_of(patched)
    share = config.share_for(config.rows_for(count))
    assert share.tolist() == story.share_mask()
    assert share.tolist() == [[False, False, True, False], [False, False, True, False],
                              [True, True, False, False], [False, False, False, False]]
    assert config.identity_rows == (0, 1)  # identity_panels=1: Mia's first panel 0, Leo's first panel 1
    with pytest.raises(Exception, match="the story has 4 panels but the latent batch has 3"):
        config.rows_for(3)


def story_prompt(ckpt: str, panels: str, batch_size, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "StoryDiffusionStory", "inputs": {
            "clip": ["1", 1], "characters": CHARACTERS, "panels": panels, "style": "Comic book",
            "negative": "blurry", "identity_panels": 2}},
        "3": {"class_type": "StoryDiffusionConsistentSelfAttention", "inputs": {"model": ["1", 0], "story": ["2", 3]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch_size}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["4", 0], "seed": 5,
            "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "StoryDiffusionComicPage", "inputs": {
            "images": ["6", 0], "captions": ["2", 2], "layout": "grid", "rows": 1, "columns": 2, "page_width": 256,
            "page_height": 0, "margin": 8, "gutter": 4, "background": "#ffffff", "caption_position": "below panel",
            "caption_height": 0.25, "max_font_size": 24, "border": 2, "layout_seed": 0}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def test_story_to_comic_pages_end_to_end(comfy, comfy_nodes, checkpoint_files, output_dir):
    csa_inputs = csa_defaults(comfy_nodes)
    prompt = story_prompt(checkpoint_files("sd15"), PANELS, ["2", 4], "story_e2e")
    prompt["3"]["inputs"].update(csa_inputs)
    outputs = comfy.run(prompt)
    images = outputs["8"]["images"]
    assert len(images) == 2  # 4 panels on 1x2 pages
    pages = [np.asarray(Image.open(os.path.join(output_dir, i["subfolder"], i["filename"]))) for i in images]
    assert pages[0].shape[1] == 256 and pages[0].std() > 0

    bad_batch = story_prompt(checkpoint_files("sd15"), PANELS, 3, "story_bad")
    bad_batch["3"]["inputs"].update(csa_inputs)
    for node in ("6", "7", "8"):  # the sampler fails before decoding: skip the decode and page work
        del bad_batch[node]
    bad_batch["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    with pytest.raises(harness.PromptFailed, match="the story has 4 panels but the latent batch has 3"):
        comfy.run(bad_batch)


@pytest.mark.parametrize("panels,message", [
    ("[Mia] ok\n[Bob] runs", "panels, line 2: [Bob] is not a defined character"),
    ("", "panels, line 1: the story has no panels"),
])
def test_story_errors_reach_the_user(comfy, checkpoint_files, panels, message):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_files("sd15")}},
        "2": {"class_type": "StoryDiffusionStory", "inputs": {
            "clip": ["1", 1], "characters": CHARACTERS, "panels": panels, "style": "(No style)",
            "negative": "", "identity_panels": 2}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    with pytest.raises(harness.PromptFailed) as err:
        comfy.run(prompt)
    assert message in str(err.value)
