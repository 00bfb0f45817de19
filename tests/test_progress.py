"""Long-running nodes move ComfyUI's progress bar to its total: Story (per panel), Comic Page (per page),
Train Motion Predictor (per step, also when resuming) and Video Combine (per frame, see test_video_nodes).

`comfy.utils.ProgressBar` is replaced by a recorder; the pack's comfy_adapter modules look it up at
call time, so the recorder sees every bar a node makes.
"""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import motion_fixtures
import tiny_models


class RecordingBar:
    bars: ClassVar[list[RecordingBar]] = []

    def __init__(self, total, node_id=None):
        self.total, self.updates = total, []
        RecordingBar.bars.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.updates.append((value, self.total))

    def update(self, value):
        self.update_absolute((self.updates[-1][0] if self.updates else 0) + value)


@pytest.fixture
def bars(comfy_nodes, monkeypatch):
    import comfy.utils

    RecordingBar.bars = []
    monkeypatch.setattr(comfy.utils, "ProgressBar", RecordingBar)
    return RecordingBar.bars


def reaches_total(bar):
    values = [value for value, _ in bar.updates]
    return bar.updates and values == sorted(values) and bar.updates[-1] == (bar.total, bar.total)


def test_story_node_reports_every_panel(comfy_nodes, bars):
    panels = "\n".join(f"[Mia] panel {i} # caption {i}" for i in range(5)) + "\n[Mia] panel 0 # again"
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]()
    *_, count = node.build(tiny_models.make_clip("sd15", seed=1), "[Mia] a girl", panels, "(No style)", "", 2)
    (bar,) = bars
    assert count == 6 and bar.total == 6 and reaches_total(bar)
    assert [value for value, _ in bar.updates] == [1, 2, 3, 4, 5, 6]  # a repeated prompt still counts


def test_comic_page_node_reports_every_page(comfy_nodes, bars):
    images = torch.rand(9, 32, 32, 3)
    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionComicPage"]()
    (pages,) = node.compose(images, "", "grid", 2, 2, 256, 0, 8, 4, "#ffffff", "below panel", 0.2, 24, 2, 0)
    (bar,) = bars
    assert pages.shape[0] == 3 and bar.total == 3 and reaches_total(bar)
    assert [value for value, _ in bar.updates] == [1, 2, 3]


def test_training_reports_every_step_and_a_resumed_run(comfy_nodes, bars, models_dir, tmp_path):
    from comfyui_storydiffusion.motion.comfy_adapter import train_into_model_folder
    from comfyui_storydiffusion.motion.training import TrainOptions

    videos = tmp_path / "videos"
    motion_fixtures.write_orbit_videos(str(videos), count=3, frames=10, size=32)
    clip_vision = motion_fixtures.make_clip_vision(seed=0)

    def options():
        return TrainOptions(kind="pooled", frames=4, steps=3, batch_size=2, lr=1e-3, warmup=1, image_size=32,
                            model={"width": 16, "layers": 1, "heads": 2, "max_frames": 8})

    train_into_model_folder(clip_vision, str(videos), "progress_test", options())
    train_into_model_folder(clip_vision, str(videos), "progress_test", options())  # resumes the finished run
    first, resumed = bars
    assert first.total == 3 and reaches_total(first) and [v for v, _ in first.updates] == [1, 2, 3]
    assert resumed.total == 3 and reaches_total(resumed)
