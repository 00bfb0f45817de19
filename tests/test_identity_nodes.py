"""PhotoMaker v1 nodes in ComfyUI: parity with core PhotoMakerEncode, delayed merge ranges, story
batches with several characters, the LoRA patch, bad input, and KSampler end to end."""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

import identity_fixtures as F
import tiny_models


@pytest.fixture(scope="module")
def nodes_mod(comfy_nodes):
    return importlib.import_module("comfyui_storydiffusion.nodes.identity")


@pytest.fixture(scope="module")
def pm_file(models_dir):
    """fp16 values, like the public file: core's encoder stores fp16 weights on CPU, so the parity test
    compares the same numbers."""
    name = "tiny_photomaker.bin"
    sd = {part: {k: v.half() for k, v in tensors.items()} for part, tensors in F.photomaker_state_dict(seed=11).items()}
    F.write_photomaker(str(models_dir / "photomaker" / name), sd)
    return name


@pytest.fixture(scope="module")
def photomaker(nodes_mod, pm_file):
    return nodes_mod.PhotoMakerLoader().load(pm_file)[0]


@pytest.fixture(scope="module")
def clip():
    return tiny_models.make_clip("sdxl", seed=2)


def fuse(nodes_mod, clip, photomaker, text, start_merge=0.0, trigger="img", **kw):
    return nodes_mod.PhotoMakerFuse().fuse(clip, photomaker, text, trigger, start_merge, **kw)[0]


def plain(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def test_equals_core_photomaker_encode_single_image(nodes_mod, clip, photomaker, pm_file, models_dir, monkeypatch):
    """Core PhotoMakerEncode (first image, no delay) with the same weights gives the same CONDITIONING.

    Core keys its trigger removal on ComfyUI word ids, which are per weighted segment, so the shared
    case is a prompt whose words before the trigger are their own segments."""
    import comfy.ops
    import comfy_extras.nodes_photomaker as core

    t = F.TINY
    monkeypatch.setattr(core, "VISION_CONFIG_DICT", {**core.VISION_CONFIG_DICT, "hidden_size": t["hidden"],
                        "intermediate_size": t["intermediate"], "num_attention_heads": 1,
                        "num_hidden_layers": t["layers"], "patch_size": t["patch"], "projection_dim": t["proj"]})
    reference = core.PhotoMakerIDEncoder()
    reference.visual_projection_2 = comfy.ops.manual_cast.Linear(t["hidden"], t["proj2"], bias=False)
    reference.fuse_module = core.FuseModule(t["proj"] + t["proj2"], comfy.ops.manual_cast)
    reference.load_state_dict(torch.load(models_dir / "photomaker" / pm_file, weights_only=True)["id_encoder"])
    images = F.reference_images(1, seed=5)
    text = "(man:1.1) photomaker (smiling in a park:1.0)"
    (core_cond, core_extra), = core.PhotoMakerEncode.execute(reference, images, clip, text).result[0]
    (ours, extra), = fuse(nodes_mod, clip, photomaker, text, trigger="photomaker", images=images)
    assert ours.shape == core_cond.shape == (1, 77, 112)
    torch.testing.assert_close(ours, core_cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(extra["pooled_output"], core_extra["pooled_output"])
    assert not torch.allclose(ours, plain(clip, "(man:1.1) (smiling in a park:1.0)")[0])  # the ID did change it


def test_delayed_merge_gives_two_timestep_ranges(nodes_mod, clip, photomaker):
    images = F.reference_images(2, seed=1)
    merged = fuse(nodes_mod, clip, photomaker, "a photo of a man img, smiling", 0.3, images=images)
    (text_cond, text_extra), (fused_cond, fused_extra) = merged
    assert (text_extra["start_percent"], text_extra["end_percent"]) == (0.0, 0.3)
    assert (fused_extra["start_percent"], fused_extra["end_percent"]) == (0.3, 1.0)
    cond, pooled = plain(clip, "a photo of a man, smiling")  # text-only = the prompt without the trigger
    assert torch.equal(text_cond, cond) and torch.equal(text_extra["pooled_output"], pooled)
    (no_delay, _), = fuse(nodes_mod, clip, photomaker, "a photo of a man img, smiling", 0.0, images=images)
    assert torch.equal(no_delay, fused_cond) and not torch.equal(fused_cond, text_cond)
    # rows other than the two class copies (positions 5, 6) come from the text encoder unchanged
    assert not torch.equal(fused_cond[0, 5:7], text_cond[0, 5:7])
    again = fuse(nodes_mod, clip, photomaker, "a photo of a man img, smiling", 0.3, images=images)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(merged, again))  # deterministic


def test_story_batch_gives_each_panel_its_characters(nodes_mod, clip, photomaker):
    from comfyui_storydiffusion.story.model import Character, Panel, Story

    story = Story(characters=(Character("Tom", "a man img"), Character("Ann", "a woman img")),
                  panels=(Panel("a man img in a park", "", ("Tom",), line=3),
                          Panel("a woman img reading a book", "", ("Ann",), line=4),
                          Panel("an empty city street at night", "", (), line=5),
                          Panel("a man img and a woman img at dinner", "", ("Tom", "Ann"), line=6)))
    tom, ann = F.reference_images(2, seed=7), F.reference_images(1, seed=8)
    chars = nodes_mod.PhotoMakerCharacter().bind("Tom", tom, "img")[0]
    chars = nodes_mod.PhotoMakerCharacter().bind("Ann", ann, "img", characters=chars)[0]
    (cond, extra), = fuse(nodes_mod, clip, photomaker, "", characters=chars, story=story)
    assert cond.shape == (4, 77, 112) and extra["pooled_output"].shape == (4, 48)
    (tom_alone, _), = fuse(nodes_mod, clip, photomaker, "a man img in a park", images=tom)
    (ann_alone, _), = fuse(nodes_mod, clip, photomaker, "a woman img reading a book", images=ann)
    assert torch.equal(cond[0], tom_alone[0]) and torch.equal(cond[1], ann_alone[0])
    assert torch.equal(cond[2], plain(clip, "an empty city street at night")[0][0])  # no trigger: unchanged
    both = nodes_mod.PhotoMakerCharacter().bind("Tom", tom, "img")[0]
    with pytest.raises(ValueError, match="bound twice"):
        nodes_mod.PhotoMakerCharacter().bind("Tom", ann, "img", characters=both)
    stranger = nodes_mod.PhotoMakerCharacter().bind("Bob", tom, "img")[0]
    with pytest.raises(ValueError, match=r"\['Bob'\] are not in the story"):
        fuse(nodes_mod, clip, photomaker, "", characters=stranger, story=story)


@pytest.mark.parametrize("text,images,match", [
    ("a photo of a man, smiling", 1, "no trigger word 'img'"),
    ("img of a man", 1, "no class word before it"),
    ("a man img and his friend img", 1, "appears 2 times"),
    ("a photo of a man img", 0, "reference IMAGE batch is empty"),
])
def test_bad_prompts_and_images_raise_clear_errors(nodes_mod, clip, photomaker, text, images, match):
    with pytest.raises(ValueError, match=match):
        fuse(nodes_mod, clip, photomaker, text, images=F.reference_images(2)[:images])


def test_non_sdxl_clip_and_model_are_refused(nodes_mod, photomaker):
    with pytest.raises(ValueError, match="SDXL-only"):
        fuse(nodes_mod, tiny_models.make_clip("sd15"), photomaker, "a man img", images=F.reference_images(1))
    with pytest.raises(ValueError, match="needs an SDXL model"):
        nodes_mod.PhotoMakerApplyLoRA().apply(tiny_models.make_model("sd15"), photomaker, 1.0)


def test_lora_patches_a_clone_with_up_times_down(nodes_mod, photomaker):
    model = tiny_models.make_model("sdxl", seed=1)
    key = "diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight"
    out_key = "diffusion_model.output_blocks.2.1.transformer_blocks.1.attn1.to_out.0.weight"
    before = {k: v.clone() for k, v in model.model.state_dict().items() if k in (key, out_key)}
    patched = nodes_mod.PhotoMakerApplyLoRA().apply(model, photomaker, 0.5)[0]
    assert patched is not model and not model.patches  # the given MODEL is untouched
    patched.patch_model()
    try:
        after = patched.model.state_dict()
        for k, base in ((key, "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.processor.to_k"),
                        (out_key, "unet.up_blocks.0.attentions.2.transformer_blocks.1.attn1.processor.to_out")):
            torch.testing.assert_close(after[k], before[k] + photomaker.lora[base].delta(0.5), rtol=1e-5, atol=1e-6)
    finally:
        patched.unpatch_model()
    assert torch.equal(model.model.state_dict()[key], before[key])
    assert len(patched.patches) == len(photomaker.lora)  # every layer of the file found a target


def test_ksampler_end_to_end_on_tiny_sdxl(comfy, comfy_nodes, checkpoint_files, models_dir, output_dir):
    """Loader -> Fuse -> KSampler -> SaveImage through ComfyUI's executor, on a tiny SDXL checkpoint
    (real-size CLIP: the fuse is 768 + 1280 = 2048 wide, as in the real file).

    start_merge is 0: with 2 steps any delay leaves the fused prompt only the last step (sigma 0.03),
    where it moves the latent by ~1e-4 and the 8-bit image not at all (ranges: test_delayed_merge_...)."""
    name = "tiny_photomaker_2048.safetensors"
    F.write_photomaker(str(models_dir / "photomaker" / name),
                       F.photomaker_state_dict(seed=12, lora=False, proj=768, proj2=1280))
    import folder_paths

    input_dir = folder_paths.get_input_directory()
    pixels = (F.reference_images(1, seed=1)[0].numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(input_dir, "ref0.png"))
    # same bytes under another name: LoadImage's cache key changes, so Fuse and KSampler really rerun
    Image.fromarray(pixels).save(os.path.join(input_dir, "ref0_copy.png"))
    Image.fromarray(255 - pixels).save(os.path.join(input_dir, "ref1.png"))  # a clearly different photo

    def prompt(ref, prefix):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_files("sdxl")}},
            "2": {"class_type": "StoryDiffusionPhotoMakerLoader", "inputs": {"photomaker_name": name}},
            "3": {"class_type": "LoadImage", "inputs": {"image": ref}},
            "4": {"class_type": "StoryDiffusionPhotoMakerFuse", "inputs": {
                "clip": ["1", 1], "photomaker": ["2", 0], "text": "a photo of a man img, smiling",
                "trigger_word": "img", "start_merge": 0.0, "images": ["3", 0]}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
            "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                      "latent_image": ["6", 0], "seed": 3, "steps": 2, "cfg": 5.0,
                                                      "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
        }

    def run(ref, prefix):
        outputs = comfy.run(prompt(ref, prefix))
        (image,) = outputs["9"]["images"]
        return np.asarray(Image.open(os.path.join(output_dir, image["subfolder"], image["filename"])))

    first, repeat, other = run("ref0.png", "pm_a"), run("ref0_copy.png", "pm_b"), run("ref1.png", "pm_c")
    assert first.shape == (64, 64, 3) and first.std() > 0
    assert np.array_equal(first, repeat)  # same seed and photos: bit-identical
    assert not np.array_equal(first, other)  # a different reference photo gives a different image
