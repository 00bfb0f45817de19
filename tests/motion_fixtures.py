"""Tiny CLIP vision models and synthetic videos for the motion tests and bench (no downloads).

`comfy.clip_vision.load` picks its config from the layer count of a file (ViT-L/H/G only), so the tiny
model is built in-process: ComfyUI's own ClipVisionModel class from a small JSON config, weights
initialised with tiny_models.init_weights. Its encode_image is ComfyUI's real preprocessing + forward.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import torch

import tiny_models


def tiny_clip_vision_config(image_size: int = 32, patch: int = 8, hidden: int = 32, layers: int = 3,
                            projection: int = 24) -> dict:
    """(image_size / patch)^2 + 1 tokens of width `hidden`; pooled image_embeds of width `projection`."""
    return {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": hidden,
            "image_size": image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": hidden * 2, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
            "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch,
            "projection_dim": projection, "torch_dtype": "float32"}


def make_clip_vision(seed: int = 0, **kw):
    """A comfy.clip_vision.ClipVisionModel with tiny random (seeded) weights."""
    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny_clip_vision.json")
        with open(path, "w") as f:
            json.dump(tiny_clip_vision_config(**kw), f)
        clip_vision = comfy.clip_vision.ClipVisionModel(path)
    tiny_models.init_weights(clip_vision.model, seed)
    return clip_vision


def shape_frame(t: float, size: int = 32, phase: float = 0.0, direction: float = 1.0) -> np.ndarray:
    """RGB uint8 frame: a bright disk on a circle around the centre (a nonlinear path) at time t in [0, 1]."""
    angle = phase + direction * 2.0 * math.pi * 0.75 * t
    cy = size / 2 + size * 0.3 * math.sin(angle)
    cx = size / 2 + size * 0.3 * math.cos(angle)
    yy, xx = np.mgrid[0:size, 0:size]
    disk = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (size * 0.14) ** 2
    frame = np.full((size, size, 3), 30, np.uint8)
    frame[disk] = (240, 200, 40)
    return frame


def write_video(path: str, frames: list[np.ndarray], fps: int = 8) -> str:
    """RGB frames -> an MJPG .avi (OpenCV can always write that codec)."""
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_orbit_videos(folder: str, count: int = 8, frames: int = 24, size: int = 32, seed: int = 0) -> list[str]:
    """`count` videos of a disk orbiting the centre, each with its own start angle and direction."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        phase = float(rng.uniform(0, 2 * math.pi))
        direction = 1.0 if i % 2 == 0 else -1.0
        clip = [shape_frame(j / (frames - 1), size, phase, direction) for j in range(frames)]
        paths.append(write_video(os.path.join(folder, f"orbit_{i:02d}.avi"), clip))
    return paths


def image_batch(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB frames -> a ComfyUI IMAGE [N, H, W, 3] in 0..1."""
    return torch.from_numpy(np.stack(frames)).float() / 255.0


class TinyClipVisionNode:
    """Test-only node: the in-process tiny CLIP_VISION (ComfyUI only loads full-size files)."""

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "make"
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def make(self, seed):
        return (make_clip_vision(seed=seed),)
