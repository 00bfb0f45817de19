"""Video nodes inside a real ComfyUI: list semantics, files in the output folder, VIDEO accepted by core nodes."""
from __future__ import annotations

import os

import pytest
import torch

import harness

COLOURS = (0x000000, 0x808080, 0xFFFFFF)  # panel i is a flat grey: 0, 0.5, 1


def panels_prompt(size: int = 32) -> dict:
    """Three flat panels batched together (EmptyImage + ImageBatch)."""
    prompt = {f"p{i}": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                               "color": c}} for i, c in enumerate(COLOURS)}
    prompt["b01"] = {"class_type": "ImageBatch", "inputs": {"image1": ["p0", 0], "image2": ["p1", 0]}}
    prompt["panels"] = {"class_type": "ImageBatch", "inputs": {"image1": ["b01", 0], "image2": ["p2", 0]}}
    return prompt


def story_prompt(prefix: str, fmt: str = "mp4", overlap: int = 0, hold: int = 0, multiplier: int = 1) -> dict:
    prompt = panels_prompt()
    prompt["pairs"] = {"class_type": "StoryDiffusionPanelPairs", "inputs": {"panels": ["panels", 0]}}
    # a per-pair "transition": [start, end]; ImageBatch runs once per pair because the inputs are lists
    prompt["segment"] = {"class_type": "ImageBatch", "inputs": {"image1": ["pairs", 0], "image2": ["pairs", 1]}}
    prompt["story"] = {"class_type": "StoryDiffusionStoryVideo",
                       "inputs": {"segments": ["segment", 0], "fps": 4.0, "overlap": overlap, "hold_frames": hold,
                                  "frame_rate_multiplier": multiplier}}
    prompt["combine"] = {"class_type": "StoryDiffusionVideoCombine",
                         "inputs": {"images": ["story", 0], "fps": ["story", 1], "format": fmt, "quality": 90,
                                    "loop_count": 0, "pingpong": False, "filename_prefix": prefix}}
    return prompt


def decoded_means(path: str) -> tuple[list[float], float]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        means = [float(f.to_ndarray(format="rgb24").mean()) / 255 for f in container.decode(stream)]
        return means, float(stream.average_rate)


def written(outputs: dict, output_dir, node: str = "combine") -> str:
    (item,) = outputs[node]["images"]
    assert item["type"] == "output"
    return os.path.join(output_dir, item["subfolder"], item["filename"])


def test_panel_pairs_fan_out_one_segment_per_pair_and_story_video_joins_them(comfy, output_dir):
    outputs = comfy.run(story_prompt("vt/cut", overlap=0))
    path = written(outputs, output_dir)
    means, fps = decoded_means(path)
    # 3 panels -> 2 pairs -> 2 segments of [start, end] -> 4 frames with a hard cut
    assert means == pytest.approx([0.0, 0.5, 0.5, 1.0], abs=0.02)
    assert fps == 4.0
    assert outputs["combine"]["animated"] == [True] or outputs["combine"]["animated"] == (True,)
    assert path.endswith("cut_00001_.mp4")


def test_overlap_hold_and_frame_blending_through_a_prompt(comfy, output_dir):
    outputs = comfy.run(story_prompt("vt/blend", overlap=1, hold=1, multiplier=2))
    means, fps = decoded_means(written(outputs, output_dir))
    # joined: [0, 0(hold), 0.5, 0.5(hold), 1, 1(hold)] -> x2 blended
    assert means == pytest.approx([0, 0, 0, 0.25, 0.5, 0.5, 0.5, 0.75, 1, 1, 1, 1], abs=0.02)
    assert fps == 8.0


def test_counter_increases_and_nothing_else_is_left_in_the_folder(comfy, output_dir):
    first = written(comfy.run(story_prompt("vt/count")), output_dir)
    again = story_prompt("vt/count")
    again["combine"]["inputs"]["quality"] = 80  # an identical prompt would come from ComfyUI's cache
    second = written(comfy.run(again), output_dir)
    assert os.path.basename(first) == "count_00001_.mp4" and os.path.basename(second) == "count_00002_.mp4"
    assert sorted(f for f in os.listdir(os.path.dirname(first)) if f.startswith(".") or "count" in f) == \
        ["count_00001_.mp4", "count_00002_.mp4"]


@pytest.mark.parametrize("fmt,animated", [("webm", True), ("gif", False), ("webp", True)])
def test_other_formats_land_in_the_output_folder_with_a_preview(comfy, output_dir, fmt, animated):
    outputs = comfy.run(story_prompt(f"vt/fmt_{fmt}", fmt=fmt, overlap=1))
    path = written(outputs, output_dir)
    assert path.endswith(f".{fmt}") and os.path.getsize(path) > 0
    assert list(outputs["combine"]["animated"]) == [animated]
    if fmt != "webp":
        means, _ = decoded_means(path)
        assert means == pytest.approx([0.0, 0.5, 1.0], abs=0.03)


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_video_output_is_accepted_by_core_save_video_and_get_video_components(comfy, output_dir, fmt):
    prompt = story_prompt(f"vt/core_{fmt}", fmt=fmt, overlap=1)
    prompt["save"] = {"class_type": "SaveVideo", "inputs": {"video": ["combine", 0], "filename_prefix": f"vt/saved_{fmt}",
                                                           "format": "auto", "codec": "auto"}}
    prompt["parts"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["combine", 0]}}
    prompt["frames"] = {"class_type": "SaveImage", "inputs": {"images": ["parts", 0], "filename_prefix": f"vt/parts_{fmt}"}}
    outputs = comfy.run(prompt)
    saved = written(outputs, output_dir, "save")
    means, fps = decoded_means(saved)
    assert means == pytest.approx([0.0, 0.5, 1.0], abs=0.03) and fps == 4.0
    assert len(outputs["frames"]["images"]) == 3


def test_progress_bar_reports_every_frame(comfy_nodes, output_dir, monkeypatch):
    """The node moves its ProgressBar once per written frame. What reaches the UI hook is core's choice: 0.3.75 and
    0.8.0 pass every update on; 0.29.0 drops updates closer than 100 ms to the last one sent, but always sends the
    first and the final one (comfy/utils.py ProgressBar.update_absolute)."""
    import comfy.utils

    asked, shown = [], []

    class SpyBar(comfy.utils.ProgressBar):  # core's own bar (and throttle), recording what the node asks of it
        def update_absolute(self, value, total=None, preview=None):
            asked.append((value, self.total if total is None else total))
            super().update_absolute(value, total, preview)

    monkeypatch.setattr(comfy.utils, "ProgressBar", SpyBar)  # the pack looks the class up when the node runs
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: shown.append((value, total)))
    try:
        node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionVideoCombine"]()
        node.combine(torch.rand(5, 16, 16, 3), 8.0, "mp4", 80, 0, True, "vt/progress")
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert asked == [(i, 8) for i in range(1, 9)]  # ping-pong: 5 + 3 frames, one update each
    # the UI sees the first frame, then increasing counts of frames written, ending at the total
    assert shown[:1] == [(1, 8)] and shown[-1:] == [(8, 8)], shown
    assert shown == sorted(set(shown)) and set(shown) <= set(asked), shown


# ---------------------------------------------------------------------------------------------------
# bad input


def test_panel_pairs_needs_two_panels(comfy):
    prompt = panels_prompt()
    prompt["pairs"] = {"class_type": "StoryDiffusionPanelPairs", "inputs": {"panels": ["p0", 0]}}
    prompt["story"] = {"class_type": "StoryDiffusionStoryVideo",
                       "inputs": {"segments": ["pairs", 0], "fps": 4.0, "overlap": 0, "hold_frames": 0,
                                  "frame_rate_multiplier": 1}}
    prompt["combine"] = {"class_type": "StoryDiffusionVideoCombine",
                         "inputs": {"images": ["story", 0], "fps": 4.0, "format": "mp4", "quality": 80,
                                    "loop_count": 0, "pingpong": False, "filename_prefix": "vt/bad"}}
    with pytest.raises(harness.PromptFailed, match="needs at least 2 panels"):
        comfy.run(prompt)


def test_empty_batch_is_refused_before_any_file_exists(comfy_nodes, output_dir):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionVideoCombine"]()
    with pytest.raises(ValueError, match="empty IMAGE batch"):
        node.combine(torch.zeros(0, 16, 16, 3), 8.0, "mp4", 80, 0, False, "vt/empty")
    assert not os.path.exists(os.path.join(output_dir, "vt")) or \
        not [f for f in os.listdir(os.path.join(output_dir, "vt")) if "empty" in f]


def test_segments_of_different_sizes_are_resized_to_the_first(comfy_nodes, caplog):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStoryVideo"]()
    frames, fps, count = node.join([torch.zeros(2, 16, 24, 3), torch.ones(3, 10, 10, 3)], [6.0], [1], [0], [1])
    assert frames.shape == (4, 16, 24, 3) and count == 4 and fps == 6.0
    assert "resized to 24x16" in caplog.text


def test_unsupported_format_names_the_available_encoders(comfy_nodes, output_dir, monkeypatch):
    import comfyui_storydiffusion.video.encode as core

    monkeypatch.setattr(core, "_encoder_exists", lambda codec: codec == "gif")
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionVideoCombine"]()
    with pytest.raises(core.VideoError, match="Encoders available here: gif: gif"):
        node.combine(torch.rand(2, 16, 16, 3), 8.0, "webm", 80, 0, False, "vt/unsupported")
    assert not [f for f in os.listdir(output_dir) if "unsupported" in f]


@pytest.mark.parametrize("prefix,message", [("../outside/x", "must stay inside"),
                                            ("vt/blocker.txt/x", "cannot create the output folder")])
def test_unwritable_or_escaping_prefix_is_a_clear_error(comfy_nodes, output_dir, prefix, message):
    os.makedirs(os.path.join(output_dir, "vt"), exist_ok=True)
    with open(os.path.join(output_dir, "vt", "blocker.txt"), "w") as f:
        f.write("a file, not a folder")
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionVideoCombine"]()
    with pytest.raises(ValueError, match=message):
        node.combine(torch.rand(2, 16, 16, 3), 8.0, "mp4", 80, 0, False, prefix)


def test_every_input_has_a_tooltip(comfy_nodes):
    for node_id in ("StoryDiffusionPanelPairs", "StoryDiffusionStoryVideo", "StoryDiffusionVideoCombine"):
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("StoryDiffusion/")


def test_video_combine_warns_about_odd_sizes_in_the_log_and_its_tooltips(comfy_nodes, output_dir, caplog):
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionVideoCombine"]
    required = cls.INPUT_TYPES()["required"]
    assert "padded" in required["images"][1]["tooltip"] and "64x66" in required["images"][1]["tooltip"]
    assert "odd sizes" in required["format"][1]["tooltip"]
    with caplog.at_level("WARNING"):
        result = cls().combine(torch.rand(3, 65, 63, 3), 8.0, "mp4", 80, 0, False, "vt/odd")
    assert os.path.exists(result["result"][1])
    padded = [r.getMessage() for r in caplog.records if "padded" in r.getMessage()]
    assert len(padded) == 1 and "63x65, padded to 64x66" in padded[0]
