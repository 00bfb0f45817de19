"""What the README says about other packs, checked with their unmodified snapshots loaded in-process.

- ComfyUI_IPAdapter_plus: its "IPAdapter Model Loader" output drives our Per-frame Semantic Conditioning
  (same sample as our own loader's value), and its "IPAdapter Embeds" / "IPAdapter Embeds Batch" take our
  EMBEDS (Semantic Motion Predictor) and run through a KSampler with a tiny SD1.5 checkpoint.
- ComfyUI-VideoHelperSuite: our frames (Story Video) go into its "Video Combine", which writes a file; its
  "Load Video" output goes into our Panel Pairs, one pair per adjacent frame pair.

Snapshots come from ../shared/thirdparty (tests/thirdparty_fixtures.py); without them these tests skip.
"""
from __future__ import annotations

import os
import shutil
from typing import ClassVar

import pytest
import torch

import ipadapter_fixtures as fx
import motion_fixtures

POOLED_DIM = 24  # pooled image_embeds width of motion_fixtures' tiny CLIP vision model


# ---------------------------------------------------------------------------------------------------
# test-only nodes


class InteropCapturePairs:
    """Test-only output node: hands a frame batch and Panel Pairs' outputs (lists) back to the test."""

    INPUT_IS_LIST = True
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "tests"
    captured: ClassVar[list] = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("IMAGE",), "start_images": ("IMAGE",), "end_images": ("IMAGE",),
                             "pair_count": ("INT", {"forceInput": True}), "frame_count": ("INT", {"forceInput": True})}}

    def capture(self, frames, start_images, end_images, pair_count, frame_count):
        InteropCapturePairs.captured.append({"frames": frames, "starts": start_images, "ends": end_images,
                                             "pair_count": pair_count, "frame_count": frame_count})
        return {}


@pytest.fixture(scope="module")
def test_nodes(comfy_nodes):
    added = {"InteropTinyClipVision": motion_fixtures.TinyClipVisionNode, "InteropCapturePairs": InteropCapturePairs,
             "TestFrameEmbeddings": fx.TestFrameEmbeddingsNode}
    missing = [k for k in added if k not in comfy_nodes.NODE_CLASS_MAPPINGS]
    comfy_nodes.NODE_CLASS_MAPPINGS.update(added)
    yield
    for name in missing:
        comfy_nodes.NODE_CLASS_MAPPINGS.pop(name, None)


def saved_latent(outputs, node="save"):
    import folder_paths
    from safetensors.torch import load_file

    saved = outputs[node]["latents"][0]
    return load_file(os.path.join(folder_paths.get_output_directory(), saved["subfolder"], saved["filename"]))["latent_tensor"]


def sampler_nodes(ckpt: str, model: list, prefix: str, batch_size=2) -> dict:
    """Text encodes, an empty 64 px latent batch, a 1-step KSampler on `model` and SaveLatent."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a fox"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch_size}},
        "sample": {"class_type": "KSampler", "inputs": {"model": model, "seed": 1, "steps": 1, "cfg": 4.0,
                                                        "sampler_name": "euler", "scheduler": "normal",
                                                        "positive": ["pos", 0], "negative": ["neg", 0],
                                                        "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }


# ---------------------------------------------------------------------------------------------------
# 1. IPAdapter_plus's loader -> our Per-frame Semantic Conditioning


@pytest.mark.parametrize("kind,ext", [("plain", "safetensors"), ("plus", "bin")])
def test_ipadapter_plus_model_loader_feeds_per_frame_conditioning(comfy, comfy_nodes, test_nodes, ipadapter_plus,
                                                                   checkpoint_files, models_dir, kind, ext):
    """Its "IPAdapter Model Loader" value in our IPADAPTER input gives exactly the sample our loader's value gives."""
    ckpt = checkpoint_files("sd15")
    # fits the tiny checkpoint: 768 context, its 4 cross-attentions are 320 wide (as test_comfyui_prompt_end_to_end)
    name = f"interop-{kind}-ip-adapter_sd15.{ext}"
    groups = fx.ipadapter_state_dict([320] * 4, 768, kind=kind, clip_dim=32, num_tokens=16 if kind == "plus" else 4,
                                     dtype=torch.float16)
    fx.write_ipadapter(str(models_dir / "ipadapter" / name), groups)

    def prompt(loader, weight):
        p = sampler_nodes(ckpt, ["apply", 0], f"interop_loader_{kind}_{loader}_{weight}")
        p["loader"] = {"class_type": loader, "inputs": {"ipadapter_file": name}}
        p["embeds"] = {"class_type": "TestFrameEmbeddings", "inputs": {"frames": 2, "dim": 32, "tokens": 5, "seed": 0}}
        p["apply"] = {"class_type": "StoryDiffusionPerFrameSemanticConditioning",
                      "inputs": {"model": ["ckpt", 0], "ipadapter": ["loader", 0], "clip_vision_output": ["embeds", 0],
                                 "weight": weight, "start_percent": 0.0, "end_percent": 1.0}}
        return p

    theirs = saved_latent(comfy.run(prompt("IPAdapterModelLoader", 1.0)))
    ours = saved_latent(comfy.run(prompt("StoryDiffusionIPAdapterLoader", 1.0)))
    off = saved_latent(comfy.run(prompt("IPAdapterModelLoader", 0.0)))
    assert theirs.shape == (2, 4, 8, 8) and torch.isfinite(theirs).all()
    assert torch.equal(theirs, ours)
    assert (theirs - off).abs().max() > 1e-3  # the image branch really ran


# ---------------------------------------------------------------------------------------------------
# 2. our EMBEDS -> IPAdapter_plus's embeds nodes -> KSampler

# IPAdapter_plus patches SD1.5 by a fixed list (input 1,2,4,5,7,8 / output 3-11 / middle) numbering the
# file's 16 layers in that order, so its adapter for the tiny checkpoint has the public 16-layer SD1.5
# layout, every layer 320 wide (the tiny UNet's width), 768 context, pooled CLIP width of the tiny model.
IPA_PLUS_FILES = {"plain": "interop-ip-adapter_sd15_16layers.safetensors",
                  "plus": "interop-ip-adapter-plus_sd15_16layers.safetensors"}
PENULTIMATE_DIM = 32  # hidden width of the tiny CLIP vision model (17 tokens)


@pytest.fixture(scope="module")
def ipa_plus_adapter_files(models_dir):
    """plain: pooled embeddings (4 tokens); plus: IPAdapter_plus's SD1.5 Resampler (768 wide, 12 heads x 64,
    depth 4, 16 queries) on penultimate hidden states."""
    plain = fx.ipadapter_state_dict([320] * 16, 768, kind="plain", clip_dim=POOLED_DIM, num_tokens=4, seed=5,
                                    dtype=torch.float16)
    plus = fx.ipadapter_state_dict([320] * 16, 768, kind="plus", clip_dim=PENULTIMATE_DIM, num_tokens=16,
                                   resampler_dim=768, resampler_inner=768, depth=4, seed=6, dtype=torch.float16)
    for kind, groups in (("plain", plain), ("plus", plus)):
        fx.write_ipadapter(str(models_dir / "ipadapter" / IPA_PLUS_FILES[kind]), groups)
    return IPA_PLUS_FILES


def embeds_prompt(ckpt, node, loader="IPAdapterModelLoader", weight=1.0, end_color=0xFFFFFF, prefix="e", kind="plain"):
    """Tiny CLIP vision -> our Semantic Motion Predictor (2 frames) -> its EMBEDS into `node` -> KSampler with the
    predictor's total_frames as the latent batch. plain: pooled embeddings; plus: penultimate ones, and the
    negative is our EMBEDS of a black panel (IPAdapter_plus would encode a 224 px black image itself, which the
    32 px tiny CLIP vision model cannot take)."""
    embeddings = "pooled" if kind == "plain" else "penultimate"
    p = sampler_nodes(ckpt, ["apply", 0], f"interop_{prefix}_{kind}_{node}_{loader}_{weight}_{end_color}")
    p["latent"]["inputs"]["batch_size"] = ["smp", 2]
    p.update({
        "cv": {"class_type": "InteropTinyClipVision", "inputs": {"seed": 0}},
        "start": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x202020}},
        "end": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": end_color}},
        "smp": {"class_type": "StoryDiffusionSemanticMotionPredictor",
                "inputs": {"clip_vision": ["cv", 0], "start": ["start", 0], "end": ["end", 0], "frames": 2,
                           "interpolation": "linear", "embeddings": embeddings}},
        "loader": {"class_type": loader, "inputs": {"ipadapter_file": IPA_PLUS_FILES[kind]}},
        "apply": {"class_type": node, "inputs": {"model": ["ckpt", 0], "ipadapter": ["loader", 0], "pos_embed": ["smp", 1],
                                                 "weight": weight, "weight_type": "linear", "start_at": 0.0, "end_at": 1.0,
                                                 "embeds_scaling": "V only", "clip_vision": ["cv", 0]}},
    })
    if kind == "plus":
        p["black"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}}
        p["smp_black"] = {"class_type": "StoryDiffusionSemanticMotionPredictor",
                          "inputs": {"clip_vision": ["cv", 0], "start": ["black", 0], "end": ["black", 0], "frames": 2,
                                     "interpolation": "linear", "embeddings": embeddings}}
        p["apply"]["inputs"]["neg_embed"] = ["smp_black", 1]
    return p


def test_ipadapter_plus_embeds_nodes_declare_the_embeds_socket(ipadapter_plus, pack):
    from comfyui_storydiffusion.common.sockets import EMBEDS_TYPE

    produced = pack.NODE_CLASS_MAPPINGS["StoryDiffusionSemanticMotionPredictor"].RETURN_TYPES[1]
    assert produced == EMBEDS_TYPE == "EMBEDS"
    for node in ("IPAdapterEmbeds", "IPAdapterEmbedsBatch"):
        spec = ipadapter_plus.nodes[node].INPUT_TYPES()
        assert spec["required"]["pos_embed"][0] == produced and spec["optional"]["neg_embed"][0] == produced


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_our_embeds_through_ipadapter_plus_embeds_batch_one_embedding_per_frame(comfy, test_nodes, ipadapter_plus,
                                                                                 checkpoint_files, ipa_plus_adapter_files,
                                                                                 kind):
    """"IPAdapter Embeds Batch" gives frame j our embedding j: a new end panel changes frame 1 only."""
    ckpt = checkpoint_files("sd15")
    node = "IPAdapterEmbedsBatch"
    base = saved_latent(comfy.run(embeds_prompt(ckpt, node, kind=kind)))
    other_end = saved_latent(comfy.run(embeds_prompt(ckpt, node, end_color=0x3060C0, kind=kind)))
    off = saved_latent(comfy.run(embeds_prompt(ckpt, node, weight=0.0, kind=kind)))
    assert base.shape == (2, 4, 8, 8) and torch.isfinite(base).all()
    assert (base - off).abs().max() > 1e-3  # the embeddings steer the sample
    assert torch.equal(other_end[0], base[0])  # frame 0 sees only embedding 0 (the start panel)
    assert (other_end[1] - base[1]).abs().max() > 1e-3  # frame 1 follows embedding 1 (the end panel)


def test_our_embeds_through_ipadapter_plus_embeds_all_frames_share_them(comfy, test_nodes, ipadapter_plus,
                                                                        checkpoint_files, ipa_plus_adapter_files):
    """"IPAdapter Embeds" (not Batch) accepts them too, but concatenates: every frame sees every embedding."""
    ckpt = checkpoint_files("sd15")
    node = "IPAdapterEmbeds"
    base = saved_latent(comfy.run(embeds_prompt(ckpt, node)))
    other_end = saved_latent(comfy.run(embeds_prompt(ckpt, node, end_color=0x3060C0)))
    assert base.shape == (2, 4, 8, 8) and torch.isfinite(base).all()
    assert (other_end[0] - base[0]).abs().max() > 1e-3


def test_our_loader_value_works_in_ipadapter_plus_embeds_batch(comfy, test_nodes, ipadapter_plus, checkpoint_files,
                                                               ipa_plus_adapter_files):
    """The README's "same IPADAPTER value": our loader's output in its Embeds Batch samples exactly like its own."""
    ckpt = checkpoint_files("sd15")
    theirs = saved_latent(comfy.run(embeds_prompt(ckpt, "IPAdapterEmbedsBatch", prefix="l")))
    ours = saved_latent(comfy.run(embeds_prompt(ckpt, "IPAdapterEmbedsBatch", loader="StoryDiffusionIPAdapterLoader",
                                                prefix="l")))
    assert torch.equal(theirs, ours)


# ---------------------------------------------------------------------------------------------------
# 3. VideoHelperSuite

GREYS = (0x000000, 0x808080, 0xFFFFFF)  # panel i is a flat grey: 0, 0.5, 1


def story_frames_prompt() -> dict:
    """Three flat panels -> Panel Pairs -> [start, end] per pair -> Story Video (hard cuts): 4 frames at 4 fps."""
    p = {f"p{i}": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": c}}
         for i, c in enumerate(GREYS)}
    p["b01"] = {"class_type": "ImageBatch", "inputs": {"image1": ["p0", 0], "image2": ["p1", 0]}}
    p["panels"] = {"class_type": "ImageBatch", "inputs": {"image1": ["b01", 0], "image2": ["p2", 0]}}
    p["pairs"] = {"class_type": "StoryDiffusionPanelPairs", "inputs": {"panels": ["panels", 0]}}
    p["segment"] = {"class_type": "ImageBatch", "inputs": {"image1": ["pairs", 0], "image2": ["pairs", 1]}}
    p["story"] = {"class_type": "StoryDiffusionStoryVideo",
                  "inputs": {"segments": ["segment", 0], "fps": 4.0, "overlap": 0, "hold_frames": 0,
                             "frame_rate_multiplier": 1}}
    return p


def vhs_combine(p: dict, prefix: str) -> dict:
    p["vhs_combine"] = {"class_type": "VHS_VideoCombine",
                        "inputs": {"images": ["story", 0], "frame_rate": ["story", 1], "loop_count": 0,
                                   "filename_prefix": prefix, "format": "video/h264-mp4", "pingpong": False,
                                   "save_output": True, "pix_fmt": "yuv420p", "crf": 19, "save_metadata": True,
                                   "trim_to_audio": False}}
    return p


def decoded(path: str):
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        means = [float(f.to_ndarray(format="rgb24").mean()) / 255 for f in container.decode(stream)]
        return means, float(stream.average_rate)


@pytest.fixture(scope="module")
def vhs_with_ffmpeg(vhs):
    utils = vhs.submodule("videohelpersuite.utils")
    if utils.ffmpeg_path is None:
        pytest.fail("VideoHelperSuite found no ffmpeg: scripts/setup.sh installs imageio-ffmpeg into the harness venv "
                    "(run it again), or install Debian's ffmpeg")
    return vhs


def test_story_video_frames_into_vhs_video_combine_write_an_mp4(comfy, vhs_with_ffmpeg, output_dir):
    outputs = comfy.run(vhs_combine(story_frames_prompt(), "interop/vhs_story"))
    (preview,) = outputs["vhs_combine"]["gifs"]
    path = os.path.join(output_dir, preview["subfolder"], preview["filename"])
    assert preview["type"] == "output" and path.endswith(".mp4") and os.path.getsize(path) > 0
    means, fps = decoded(path)
    assert means == pytest.approx([0.0, 0.5, 0.5, 1.0], abs=0.03)  # 2 pairs x [start, end], hard cuts
    assert fps == 4.0  # Story Video's fps output drove its frame_rate


@pytest.mark.parametrize("loader", ["VHS_LoadVideo", "VHS_LoadVideoPath"])
def test_vhs_load_video_into_panel_pairs_one_pair_per_adjacent_frames(comfy, test_nodes, vhs_with_ffmpeg, output_dir,
                                                                      loader):
    import folder_paths

    outputs = comfy.run(vhs_combine(story_frames_prompt(), f"interop/vhs_src_{loader}"))
    (preview,) = outputs["vhs_combine"]["gifs"]
    source = os.path.join(output_dir, preview["subfolder"], preview["filename"])
    if loader == "VHS_LoadVideo":  # the upload variant lists the input folder
        video = f"interop_{preview['filename']}"
        shutil.copyfile(source, os.path.join(folder_paths.get_input_directory(), video))
    else:
        video = source
    p = {"load": {"class_type": loader, "inputs": {"video": video, "force_rate": 0, "custom_width": 0, "custom_height": 0,
                                                   "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1}},
         "pairs": {"class_type": "StoryDiffusionPanelPairs", "inputs": {"panels": ["load", 0]}},
         "out": {"class_type": "InteropCapturePairs",
                 "inputs": {"frames": ["load", 0], "start_images": ["pairs", 0], "end_images": ["pairs", 1],
                            "pair_count": ["pairs", 2], "frame_count": ["load", 1]}}}
    InteropCapturePairs.captured.clear()
    comfy.run(p)
    (got,) = InteropCapturePairs.captured
    (frames,) = got["frames"]
    assert frames.shape == (4, 32, 32, 3) and got["frame_count"] == [4]
    assert [float(f.mean()) for f in frames] == pytest.approx([0.0, 0.5, 0.5, 1.0], abs=0.03)
    assert got["pair_count"] == [3] and len(got["starts"]) == len(got["ends"]) == 3
    for i in range(3):
        assert torch.equal(got["starts"][i], frames[i:i + 1]) and torch.equal(got["ends"][i], frames[i + 1:i + 2])
