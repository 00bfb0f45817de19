"""The one module of video/ that speaks ComfyUI: output paths with ComfyUI's counter, workflow
metadata, the progress bar and VIDEO values (joining is in join.py, encoding in encode.py).
"""
from __future__ import annotations

import json
import os
from fractions import Fraction

import torch

from .join import VideoError


def output_path(filename_prefix: str, extension: str, width: int, height: int) -> tuple[str, str, str]:
    """(full path, file name, subfolder) in ComfyUI's output folder: `<prefix>_00001_.<ext>`, counter increasing.

    The counter follows core SaveImage/SaveVideo naming, so files from every node share one sequence.
    """
    import folder_paths

    prefix = (filename_prefix or "").strip() or "StoryDiffusion/video"
    try:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, folder_paths.get_output_directory(), width, height)
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise VideoError(f"cannot create the output folder for prefix {prefix!r}: {e.strerror or e}. "
                         f"Use a filename_prefix whose folders can be created inside ComfyUI's output folder.") from e
    except Exception as e:  # get_save_image_path refuses prefixes that leave the output folder
        raise VideoError(f"filename_prefix {prefix!r} is not allowed: it must stay inside ComfyUI's output folder "
                         f"(no '..' or absolute paths).") from e
    file = f"{name}_{counter:05}_.{extension}"
    return os.path.join(folder, file), file, subfolder


def saved_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict:
    """Workflow and prompt as container tags (like core SaveVideo), unless ComfyUI runs --disable-metadata."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return {}
    tags = {}
    if prompt is not None:
        tags["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        tags[key] = json.dumps(value)
    return tags


def progress_bar(total: int):
    """A callback `on_frame(n)` that moves ComfyUI's progress bar for the running node."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)
    return lambda done: bar.update_absolute(done, total)


def video_from_file(path: str):
    """A VIDEO that core SaveVideo / GetVideoComponents read back from the written file."""
    from comfy_api.latest import InputImpl

    return InputImpl.VideoFromFile(path)


def video_from_frames(images: torch.Tensor, fps: float):
    """A VIDEO made of frames in memory (for files FFmpeg cannot decode back, e.g. animated webp)."""
    from comfy_api.latest import InputImpl, Types

    return InputImpl.VideoFromComponents(
        Types.VideoComponents(images=images, frame_rate=Fraction(round(fps * 1000), 1000)))
