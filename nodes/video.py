"""Nodes that turn panels into transitions and transitions into one story video file.

Panel Pairs fans the panels out into per-pair lists (ComfyUI then runs downstream nodes once per
pair), Story Video collects the per-pair segments back and joins them, Video Combine encodes.
"""
from __future__ import annotations

import torch

from ..common.sockets import CATEGORY
from ..video import comfy_adapter, encode, join

VIDEO_CATEGORY = f"{CATEGORY}/video"


class StoryDiffusionPanelPairs:
    DESCRIPTION = ("Splits a batch of panels into adjacent pairs: lists of start images and end images. Nodes "
                   "connected to these outputs run once per pair (ComfyUI list semantics), e.g. one transition "
                   "video per pair; collect the results with Story Video.")
    CATEGORY = VIDEO_CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE", "INT")
    RETURN_NAMES = ("start_images", "end_images", "pair_count")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = ("Panel i of each pair (one IMAGE [1,H,W,3] per pair).",
                       "Panel i+1 of each pair (one IMAGE [1,H,W,3] per pair).",
                       "Number of pairs: panels - 1.")
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "panels": ("IMAGE", {"tooltip": "The story panels in reading order, as one IMAGE batch (at least 2)."}),
        }}

    def split(self, panels):
        if panels.ndim != 4 or panels.shape[0] < 2:
            count = panels.shape[0] if panels.ndim == 4 else 0
            raise ValueError(f"Panel Pairs needs at least 2 panels to make a transition, got {count}. "
                             f"Batch the panels together (e.g. with Batch Images) before this node.")
        starts = [panels[i:i + 1] for i in range(panels.shape[0] - 1)]
        ends = [panels[i + 1:i + 2] for i in range(panels.shape[0] - 1)]
        return (starts, ends, len(starts))


class StoryDiffusionStoryVideo:
    DESCRIPTION = ("Joins transition segments (one IMAGE batch per panel pair, in order) into one video: "
                   "overlapping frames are cross-faded, each panel can be held, and in-between frames can be "
                   "blended to raise the frame rate. Outputs the frames and the new fps.")
    CATEGORY = VIDEO_CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("frames", "fps", "frame_count")
    OUTPUT_TOOLTIPS = ("All frames of the story video.", "Frame rate of the output: fps x frame_rate_multiplier.",
                       "Number of frames.")
    FUNCTION = "join"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "segments": ("IMAGE", {"tooltip": "Transition segments, one IMAGE batch per panel pair, in story order "
                                              "(a list, e.g. from nodes fed by Panel Pairs). Segments of another "
                                              "size are resized to the first one."}),
            "fps": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 240.0, "step": 0.01,
                              "tooltip": "Frame rate of the segments."}),
            "overlap": ("INT", {"default": 1, "min": 0, "max": 256,
                                "tooltip": "Frames cross-faded at each junction. 1 = segments share the panel frame "
                                           "(shown once); 0 = hard cut; more = a longer linear cross-fade."}),
            "hold_frames": ("INT", {"default": 0, "min": 0, "max": 1000,
                                    "tooltip": "Extra frames each panel stays still: first, last and every junction."}),
            "frame_rate_multiplier": ("INT", {"default": 1, "min": 1, "max": 16,
                                              "tooltip": "Insert linear blends between frames: 2 doubles the frame "
                                                         "rate (and the frame count) at the same duration."}),
        }}

    def join(self, segments, fps, overlap, hold_frames, frame_rate_multiplier):
        fps, overlap, hold, factor = fps[0], overlap[0], hold_frames[0], frame_rate_multiplier[0]
        frames = join.assemble_story_video(list(segments), overlap=overlap, hold=hold, blend_factor=factor)
        return (frames, float(fps) * factor, int(frames.shape[0]))


class StoryDiffusionVideoCombine:
    DESCRIPTION = ("Encodes an IMAGE batch into a video file in ComfyUI's output folder (mp4 H.264, webm VP9, gif, "
                   "animated webp) with an animated preview, and outputs a VIDEO for core Save Video / Get Video "
                   "Components. Frames are converted and encoded one at a time; the file appears only when complete.")
    CATEGORY = VIDEO_CATEGORY
    RETURN_TYPES = ("VIDEO", "STRING")
    RETURN_NAMES = ("video", "filename")
    OUTPUT_TOOLTIPS = ("The written video (mp4/webm: the file itself; gif/webp: its frames and fps).",
                       "Full path of the written file.")
    OUTPUT_NODE = True
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames, in order (e.g. from Story Video). mp4/webm need an "
                                                "even width and height (yuv420p): odd sizes are padded by one "
                                                "repeated column/row (63x65 -> 64x66) with a warning in the log."}),
                "fps": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 240.0, "step": 0.01,
                                  "tooltip": "Frames per second (gif stores delays in 1/100 s, so it rounds)."}),
                "format": (list(encode.FORMATS), {"default": "mp4",
                                                "tooltip": "mp4 = H.264 (MPEG-4 part 2 if no H.264 encoder), webm = VP9, "
                                                           "gif, webp = animated WebP. mp4/webm pad odd sizes to "
                                                           "even (see images)."}),
                "quality": ("INT", {"default": 85, "min": 1, "max": 100,
                                    "tooltip": "1-100, higher = better and bigger. mp4/webm: mapped to crf; webp: "
                                               "libwebp quality; gif: palette size."}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 100,
                                       "tooltip": "gif/webp: how often the file repeats, 0 = forever. mp4/webm "
                                                  "store no loop count (players decide)."}),
                "pingpong": ("BOOLEAN", {"default": False,
                                         "tooltip": "Play forward then backward (the end frames are not repeated)."}),
                "filename_prefix": ("STRING", {"default": "StoryDiffusion/story",
                                               "tooltip": "File name prefix inside the output folder; may contain "
                                                          "subfolders. A counter is appended: prefix_00001_.mp4"}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def combine(self, images, fps, format, quality, loop_count, pingpong, filename_prefix,
                prompt=None, extra_pnginfo=None):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError("Video Combine got an empty IMAGE batch: there are no frames to encode. "
                             "Check the node that feeds 'images'.")
        encode.pick_codec(format)  # unsupported format: fail before creating any file
        order = encode.playback_order(images.shape[0], pingpong)
        height, width = images.shape[1:3]
        path, file, subfolder = comfy_adapter.output_path(filename_prefix, format, width, height)
        written = encode.write_video(encode.frames_as_uint8(images, order), path, format, fps, quality=quality,
                                     loop=loop_count, metadata=comfy_adapter.saved_metadata(prompt, extra_pnginfo),
                                     on_frame=comfy_adapter.progress_bar(len(order)))
        if format in ("mp4", "webm"):
            video = comfy_adapter.video_from_file(written.path)
        else:  # FFmpeg cannot decode animated webp, and core SaveVideo cannot remux gif: hand over the frames
            frames = images[..., :3] if not pingpong else images[order][..., :3]
            video = comfy_adapter.video_from_frames(frames, written.fps)
        # the frontend plays .mp4/.webm in a <video> and animated webp as an image when "animated" is set;
        # a gif must be shown as a plain image to animate
        preview = {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                   "animated": (format != "gif",)}
        return {"ui": preview, "result": (video, written.path)}


NODE_CLASS_MAPPINGS = {
    "StoryDiffusionPanelPairs": StoryDiffusionPanelPairs,
    "StoryDiffusionStoryVideo": StoryDiffusionStoryVideo,
    "StoryDiffusionVideoCombine": StoryDiffusionVideoCombine,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StoryDiffusionPanelPairs": "Panel Pairs (StoryDiffusion)",
    "StoryDiffusionStoryVideo": "Story Video (StoryDiffusion)",
    "StoryDiffusionVideoCombine": "Video Combine (StoryDiffusion)",
}
