"""The harness itself: the pack loads in a real ComfyUI, and core nodes run end to end on tiny files."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import tiny_models


def core_prompt(ckpt: str, seed: int, size: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red fox reading a comic"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent_image": ["4", 0], "seed": seed, "steps": 2, "cfg": 5.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_tiny_models_are_seeded_and_finite():
    import torch

    a = tiny_models.make_model("sd15", seed=3).model.diffusion_model.state_dict()
    b = tiny_models.make_model("sd15", seed=3).model.diffusion_model.state_dict()
    c = tiny_models.make_model("sd15", seed=4).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())


@pytest.mark.parametrize("family,expected", [("sd15", "SD15"), ("sdxl", "SDXL")])
def test_checkpoint_files_are_detected(checkpoint_files, models_dir, family, expected):
    import comfy.sd

    path = os.path.join(models_dir, "checkpoints", checkpoint_files(family))
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    assert type(model.model.model_config).__name__ == expected
    assert clip is not None and vae is not None


def test_server_lists_pack_nodes_without_import_errors(server, pack):
    info = server.get("/object_info")
    missing = [n for n in pack.NODE_CLASS_MAPPINGS if n not in info]
    assert not missing, f"server did not register {missing}"
    log = server.read_log()
    ours = [line for line in log.splitlines() if "comfyui-storydiffusion" in line]
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line], log[-3000:]
    # ComfyUI prints "   0.1 seconds: .../custom_nodes/comfyui-storydiffusion" in its import-time table
    (timing,) = [line for line in ours if "seconds:" in line]
    assert float(timing.split("seconds")[0].split()[-1]) < 0.5, timing


@pytest.mark.parametrize("family,size", [("sd15", 64), ("sdxl", 64)])
def test_core_workflow_through_server_is_deterministic(server, checkpoint_files, family, size):
    ckpt = checkpoint_files(family)
    pixels = []
    for run in range(2):
        outputs = server.run(core_prompt(ckpt, seed=42, size=size, prefix=f"harness_{family}_{run}"))
        files = server.output_files(outputs)
        assert len(files) == 1 and files[0].endswith(".png") and os.path.exists(files[0])
        pixels.append(np.asarray(Image.open(files[0])))
    assert pixels[0].shape == (size, size, 3)
    assert np.array_equal(pixels[0], pixels[1])
    assert pixels[0].std() > 0  # not a blank image


def test_in_process_executor_runs_core_nodes(comfy, checkpoint_files, output_dir):
    outputs = comfy.run(core_prompt(checkpoint_files("sd15"), seed=7, size=64, prefix="inproc"))
    (image,) = [i for o in outputs.values() for i in o.get("images", [])]
    assert os.path.exists(os.path.join(output_dir, image["subfolder"], image["filename"]))


def test_executor_cache_args_cover_every_key_the_executor_reads():
    """The in-process executor gets every cache_args key this ComfyUI's execution.py reads unguarded (0.29.0 added
    "ram_inactive"), as main.py passes them: one missing key is a KeyError in every in-process prompt."""
    import re

    import harness
    from comfy_env import comfy_path

    with open(os.path.join(comfy_path(), "execution.py")) as f:
        read = set(re.findall(r"""cache_args\[["'](\w+)["']\]""", f.read()))
    args = harness.executor_cache_args()
    assert {"lru", "ram"} <= set(args) and set(args.values()) == {0}, args
    assert read <= set(args), f"execution.py reads {sorted(read - set(args))}, which main.py does not pass"
