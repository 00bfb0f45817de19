"""The predictor nodes inside ComfyUI's executor: loader, per-frame embeddings, error messages."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import harness
import motion_fixtures

EMBED_DIM, TOKENS, POOLED_DIM = 32, 17, 24  # the tiny CLIP vision model of motion_fixtures


class CaptureForTests:
    """Test-only output node: hands the predictor's outputs back to the test."""

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "tests"
    captured: ClassVar[list] = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision_output": ("CLIP_VISION_OUTPUT",), "embeds": ("EMBEDS",),
                             "total_frames": ("INT", {"forceInput": True})}}

    def capture(self, clip_vision_output, embeds, total_frames):
        CaptureForTests.captured.append((clip_vision_output, embeds, total_frames))
        return {}


@pytest.fixture(scope="module")
def test_nodes(comfy_nodes):
    added = {"TinyClipVisionForTests": motion_fixtures.TinyClipVisionNode, "CaptureForTests": CaptureForTests}
    comfy_nodes.NODE_CLASS_MAPPINGS.update(added)
    yield
    for name in added:
        comfy_nodes.NODE_CLASS_MAPPINGS.pop(name, None)


@pytest.fixture(scope="module")
def predictor_files(pack, models_dir):
    """A trained-looking predictor for the tiny CLIP vision model, one for another model, a corrupt file."""
    from comfyui_storydiffusion.motion.predictor import PredictorConfig, SemanticMotionPredictor, save_predictor

    folder = models_dir / "storydiffusion"
    torch.manual_seed(0)
    model = SemanticMotionPredictor(PredictorConfig(embed_dim=EMBED_DIM, tokens=TOKENS, width=16, layers=1, heads=2,
                                                    max_frames=8, kind="penultimate"))
    with torch.no_grad():
        model.out_proj.weight.normal_(0, 0.5)
    save_predictor(model, str(folder / "tiny_motion.safetensors"))
    other = SemanticMotionPredictor(PredictorConfig(embed_dim=1280, tokens=257, width=16, layers=1, heads=2,
                                                    max_frames=8, kind="penultimate"))
    save_predictor(other, str(folder / "vit_h_motion.safetensors"))
    (folder / "corrupt_motion.safetensors").write_bytes(b"\x00" * 64)
    return {"good": "tiny_motion.safetensors", "other": "vit_h_motion.safetensors", "corrupt": "corrupt_motion.safetensors"}


def prompt(images: dict, frames=5, interpolation="linear", embeddings="penultimate", predictor=None, end=True):
    """images: node id -> EmptyImage inputs; "start" (optionally batched with "start2", "start3") and "end"."""
    p = {"cv": {"class_type": "TinyClipVisionForTests", "inputs": {"seed": 0}}}
    for key, (w, h, color) in images.items():
        p[key] = {"class_type": "EmptyImage", "inputs": {"width": w, "height": h, "batch_size": 1, "color": color}}
    start = ["start", 0]
    for extra in ("start2", "start3"):
        if extra in images:
            p[f"batch_{extra}"] = {"class_type": "ImageBatch", "inputs": {"image1": start, "image2": [extra, 0]}}
            start = [f"batch_{extra}", 0]
    inputs = {"clip_vision": ["cv", 0], "start": start, "frames": frames, "interpolation": interpolation,
              "embeddings": embeddings}
    if end:
        inputs["end"] = ["end", 0]
    if predictor is not None:
        p["loader"] = {"class_type": "StoryDiffusionMotionPredictorLoader", "inputs": {"predictor_name": predictor}}
        inputs["predictor"] = ["loader", 0]
    p["smp"] = {"class_type": "StoryDiffusionSemanticMotionPredictor", "inputs": inputs}
    p["out"] = {"class_type": "CaptureForTests", "inputs": {"clip_vision_output": ["smp", 0], "embeds": ["smp", 1],
                                                            "total_frames": ["smp", 2]}}
    return p


def run(comfy, p):
    CaptureForTests.captured.clear()
    comfy.run(p)
    (result,) = CaptureForTests.captured
    return result


def solid(w, h, color):
    return torch.tensor([(color >> 16) & 255, (color >> 8) & 255, color & 255]).float().div(255).expand(1, h, w, 3)


def test_panel_batch_gives_one_transition_per_adjacent_pair(pack, comfy, test_nodes, predictor_files, models_dir):
    from comfyui_storydiffusion.motion.interpolate import interpolate
    from comfyui_storydiffusion.motion.predictor import load_predictor, predict_transition

    colors = [0xFF2000, 0x20A0FF, 0x30FF40]
    images = {"start": (48, 48, colors[0]), "start2": (48, 48, colors[1]), "start3": (48, 48, colors[2])}
    output, embeds, total = run(comfy, prompt(images, frames=5, predictor=predictor_files["good"], end=False))

    assert total == 10  # 2 transitions x 5 frames
    assert embeds.shape == (10, TOKENS, EMBED_DIM)
    assert torch.equal(output.penultimate_hidden_states, embeds)
    assert output.image_embeds.shape == (10, POOLED_DIM) and output.last_hidden_state.shape == (10, TOKENS, EMBED_DIM)

    # the same numbers as the core, called directly with ComfyUI's own encoder
    clip_vision = motion_fixtures.make_clip_vision(seed=0)
    panels = torch.cat([solid(48, 48, c) for c in colors])
    encoded = clip_vision.encode_image(panels)
    model = load_predictor(str(models_dir / "storydiffusion" / predictor_files["good"]))
    hidden = encoded.penultimate_hidden_states
    expected = torch.cat([predict_transition(hidden[0], hidden[1], 5, "linear", model),
                          predict_transition(hidden[1], hidden[2], 5, "linear", model)])
    assert torch.equal(embeds, expected)
    assert not torch.allclose(embeds[1:4], interpolate(hidden[0], hidden[1], 5)[1:4])  # the predictor acted
    assert torch.equal(embeds[4], hidden[1]) and torch.equal(embeds[5], hidden[1])  # panels are the key frames
    pooled = encoded.image_embeds
    assert torch.allclose(output.image_embeds[2], (pooled[0] + pooled[1]) / 2, atol=1e-5)  # other fields interpolated


def test_start_and_end_of_different_sizes_without_predictor(pack, comfy, test_nodes):
    from comfyui_storydiffusion.motion.interpolate import interpolate

    images = {"start": (64, 40, 0xFF0000), "end": (32, 32, 0x0000FF)}
    output, embeds, total = run(comfy, prompt(images, frames=4, interpolation="slerp", embeddings="pooled",
                                              predictor="none"))
    assert total == 4 and embeds.shape == (4, POOLED_DIM)  # pooled EMBEDS: [frames, D]
    clip_vision = motion_fixtures.make_clip_vision(seed=0)
    a = clip_vision.encode_image(solid(64, 40, 0xFF0000)).image_embeds[0]
    b = clip_vision.encode_image(solid(32, 32, 0x0000FF)).image_embeds[0]
    assert torch.equal(embeds, interpolate(a, b, 4, "slerp")[:, 0])
    assert torch.equal(output.image_embeds, embeds)


def test_predictor_node_errors_say_what_to_do(pack, comfy, test_nodes, predictor_files):
    images = {"start": (32, 32, 0xFF0000), "end": (32, 32, 0x00FF00)}
    with pytest.raises(harness.PromptFailed, match=r"257 token\(s\) x 1280 but the CLIP vision model gives 17 x 32"):
        run(comfy, prompt(images, predictor=predictor_files["other"]))
    with pytest.raises(harness.PromptFailed, match="corrupt or truncated"):
        run(comfy, prompt(images, predictor=predictor_files["corrupt"]))
    with pytest.raises(harness.PromptFailed, match="trained on penultimate embeddings but pooled"):
        run(comfy, prompt(images, embeddings="pooled", predictor=predictor_files["good"]))
    with pytest.raises(harness.PromptFailed, match="prompt invalid"):
        run(comfy, prompt(images, frames=1))  # below the input's minimum of 2
    with pytest.raises(harness.PromptFailed, match="needs two panels"):
        run(comfy, prompt({"start": (32, 32, 0xFF0000)}, end=False))
    with pytest.raises(harness.PromptFailed, match="at most 8 frames"):
        run(comfy, prompt(images, frames=9, predictor=predictor_files["good"]))


def test_every_input_has_a_tooltip(pack):
    from comfyui_storydiffusion.nodes import motion

    for node_id, cls in motion.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("StoryDiffusion") and cls.DESCRIPTION and cls.CATEGORY.startswith("StoryDiffusion/")
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, value in section.items():
                assert len(value) > 1 and value[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_train_node_writes_a_predictor_the_loader_lists(pack, comfy, test_nodes, models_dir, tmp_path):
    from comfyui_storydiffusion.motion.comfy_adapter import predictor_filenames
    from comfyui_storydiffusion.motion.predictor import read_metadata

    videos = tmp_path / "videos"
    motion_fixtures.write_orbit_videos(str(videos), count=3, frames=10, size=32)
    p = prompt({"start": (32, 32, 0xFF0000), "end": (32, 32, 0x00FF00)}, frames=4)
    p["train"] = {"class_type": "StoryDiffusionTrainMotionPredictor", "inputs": {
        "clip_vision": ["cv", 0], "videos_folder": str(videos), "predictor_name": "node_trained",
        "embeddings": "penultimate", "clip_frames": 4, "steps": 3, "batch_size": 2, "learning_rate": 1e-3,
        "width": 16, "layers": 1, "heads": 2, "seed": 0}}
    p["smp"]["inputs"]["predictor"] = ["train", 0]
    CaptureForTests.captured.clear()
    outputs = comfy.run(p)
    (_, embeds, total) = CaptureForTests.captured[0]
    assert total == 4 and embeds.shape == (4, TOKENS, EMBED_DIM)
    report = outputs["train"]["text"][0]
    assert "validation loss" in report and "linear interpolation" in report
    written = models_dir / "storydiffusion" / "node_trained.safetensors"
    assert "val_loss" in read_metadata(str(written))
    names = predictor_filenames()
    assert "node_trained.safetensors" in names
    assert all(name.endswith(".safetensors") and ".cache" not in name for name in names)  # no cache files listed


def test_story_transition_steers_a_ksampler_run(pack, comfy, test_nodes, checkpoint_files, models_dir):
    """Panels -> Semantic Motion Predictor -> per-frame IP-Adapter conditioning -> KSampler, in ComfyUI,
    on the tiny SD1.5 checkpoint; the latent batch size comes from the predictor's total_frames."""
    import ipadapter_fixtures

    ckpt = checkpoint_files("sd15")
    # a plain adapter for the tiny checkpoint (4 cross-attentions, 320 wide, context 768) reading the
    # tiny CLIP vision model's pooled image_embeds (24 wide)
    ipadapter_fixtures.write_ipadapter(str(models_dir / "ipadapter" / "motion-e2e-ip-adapter_sd15.safetensors"),
                                       ipadapter_fixtures.ipadapter_state_dict([320] * 4, 768, clip_dim=POOLED_DIM))
    p = prompt({"start": (32, 32, 0xFF0000), "end": (48, 32, 0x0000FF)}, frames=3, embeddings="pooled")
    del p["out"]
    p.update({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "ipa": {"class_type": "StoryDiffusionIPAdapterLoader",
                "inputs": {"ipadapter_file": "motion-e2e-ip-adapter_sd15.safetensors"}},
        "cond": {"class_type": "StoryDiffusionPerFrameSemanticConditioning",
                 "inputs": {"model": ["ckpt", 0], "ipadapter": ["ipa", 0], "embeds": ["smp", 1], "weight": 1.0,
                            "start_percent": 0.0, "end_percent": 1.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a fox running"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": ["smp", 2]}},
        "sample": {"class_type": "KSampler", "inputs": {"model": ["cond", 0], "seed": 3, "steps": 1, "cfg": 4.0,
                                                        "sampler_name": "euler", "scheduler": "normal",
                                                        "positive": ["pos", 0], "negative": ["neg", 0],
                                                        "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "motion_e2e"}},
    })
    import safetensors.torch

    latents = {}
    for weight in (1.0, 0.0):
        p["cond"]["inputs"]["weight"] = weight
        p["save"]["inputs"]["filename_prefix"] = f"motion_e2e_{weight}"
        outputs = comfy.run(p)
        (entry,) = outputs["save"]["latents"]
        latents[weight] = safetensors.torch.load_file(comfy_output_file(entry))["latent_tensor"]
    assert latents[1.0].shape[0] == 3 and torch.isfinite(latents[1.0]).all()
    assert (latents[1.0] - latents[0.0]).abs().amax(dim=(1, 2, 3)).gt(1e-4).all()  # every frame is steered


def comfy_output_file(entry):
    import os

    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), entry["subfolder"], entry["filename"])
