"""Tuning in one queue: Value List drives a setting through ComfyUI's list execution, Story Consistency scores every
run, Consistency Plot draws each run's scores at its value (and says what is wrong with mismatched inputs)."""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest

import consistency_fixtures as cf
import test_consistency
from test_story_pipeline import CHARACTERS, PANELS, csa_defaults


@pytest.fixture(scope="module")
def sweep(pack):
    from comfyui_storydiffusion.consistency import sweep

    return sweep


def test_value_list_parses_numbers_and_says_what_is_wrong(sweep, pack):
    from comfyui_storydiffusion.consistency.score import ConsistencyError

    assert sweep.parse_values("0, 0.25,0.5\n1e-1") == [0.0, 0.25, 0.5, 0.1]
    for text, message in (("", "is empty"), ("0.3, abc", "'abc' is not a number"), ("0.3, nan", "not a finite"),
                          ("0.5, 0.5", "repeats a value"), (", ".join(str(i) for i in range(40)), "at most 32")):
        with pytest.raises(ConsistencyError, match=message):
            sweep.parse_values(text)


def _pixel(picture: np.ndarray, x: float, y: float) -> tuple:
    return tuple(int(c) for c in picture[round(y), round(x)])


def test_plot_draws_each_score_at_its_value(sweep):
    values, scores = [0.7, 0.1, 0.4], [0.91, 0.62, 0.80]  # given out of order: lines run in value order
    picture = sweep.render_sweep_plot(values, {"self (mean)": scores})
    assert picture.dtype == np.uint8 and picture.shape == (picture.shape[0], sweep.WIDTH, 3)
    colour = sweep.SERIES_STYLE["self (mean)"][0]
    # the chart's geometry, as render_sweep_plot lays it out: the dot of every run at (value, score)
    fonts = sweep.FontSet()
    title_h = fonts.line_metrics(sweep.TITLE_SIZE)[1]
    left = sweep.MARGIN + fonts.width("-0.00", sweep.TEXT_SIZE) + sweep.GAP
    top = sweep.MARGIN + title_h + sweep.GAP
    right, bottom = sweep.WIDTH - sweep.MARGIN - 8, top + sweep.CHART_H
    low, high = sweep.value_range(scores)
    assert (low, high) == pytest.approx((0.60, 0.95))
    pad = 0.04 * (right - left)
    for v, s in zip(values, scores):
        x = left + pad + (v - 0.1) / 0.6 * (right - left - 2 * pad)
        y = bottom - (s - low) / (high - low) * (bottom - top)
        assert _pixel(picture, x, y) == colour, (v, s)
    # nothing of that colour where no run is: the middle of the chart above the line
    assert _pixel(picture, (left + right) / 2, top + 5) != colour


def test_plot_handles_missing_scores_and_thumbnails(sweep):
    values = [0.0, 0.5]
    panels = [np.zeros((3, 16, 16, 3), np.float32), np.ones((3, 16, 16, 3), np.float32)]
    with_thumbs = sweep.render_sweep_plot(values, {"self (mean)": [0.5, 0.7], "cross (references)": [math.nan] * 2},
                                          panels=panels)
    without = sweep.render_sweep_plot(values, {"self (mean)": [0.5, 0.7], "cross (references)": [math.nan] * 2})
    assert with_thumbs.shape[0] == without.shape[0] + 2 * (sweep.THUMB + sweep.GAP) + sweep.GAP
    rows = with_thumbs[without.shape[0] - sweep.MARGIN:]
    assert (rows == 0).all(axis=-1).any() and (rows == 255).all(axis=-1).any()  # the black and the white panels
    assert sweep.sweep_table(values, {"self (mean)": [0.5, 0.7], "cross": [math.nan, 0.3]}) == \
        "rate | self (mean) | cross\n0 | 0.5000 | -\n0.5 | 0.7000 | 0.3000"


def test_plot_says_what_is_wrong(sweep, pack):
    from comfyui_storydiffusion.consistency.score import ConsistencyError

    with pytest.raises(ConsistencyError, match="got 3 values but 2 'self \\(mean\\)' scores"):
        sweep.render_sweep_plot([0.1, 0.2, 0.3], {"self (mean)": [0.5, 0.6]})
    with pytest.raises(ConsistencyError, match="got 2 values but 1 panel batches"):
        sweep.render_sweep_plot([0.1, 0.2], {"self (mean)": [0.5, 0.6]}, panels=[np.zeros((1, 8, 8, 3))])
    with pytest.raises(ConsistencyError, match="got no values"):
        sweep.render_sweep_plot([], {"self (mean)": []})


# ---------------------------------------------------------------------------------------------------
# list execution in ComfyUI's executor


class SweepCapture:
    captured: ClassVar[list] = []
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    CATEGORY = "tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"table": ("STRING", {"forceInput": True}), "plot": ("IMAGE",),
                             "scores": ("FLOAT", {"forceInput": True})}}

    def capture(self, table, plot, scores):
        SweepCapture.captured.append((table, plot, scores))
        return {}


@pytest.fixture(scope="module")
def sweep_nodes(comfy_nodes, test_consistency_nodes):
    comfy_nodes.NODE_CLASS_MAPPINGS["SweepCapture"] = SweepCapture
    yield
    comfy_nodes.NODE_CLASS_MAPPINGS.pop("SweepCapture", None)


@pytest.fixture(scope="module")
def test_consistency_nodes(comfy_nodes):
    added = {"ConsistencyTinyEncoder": cf.TinyEncoderNode, "ConsistencyCapture": test_consistency.CaptureForTests}
    comfy_nodes.NODE_CLASS_MAPPINGS.update(added)
    yield
    for name in added:
        comfy_nodes.NODE_CLASS_MAPPINGS.pop(name, None)


def sweep_prompt(ckpt: str, csa_inputs: dict, rate) -> dict:
    """Story -> CSA (rate and rate_high_res: a number or a link) -> KSampler -> VAE Decode -> Story Consistency -> Consistency Plot."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "StoryDiffusionStory", "inputs": {
            "clip": ["1", 1], "characters": CHARACTERS, "panels": PANELS, "style": "Comic book",
            "negative": "blurry", "identity_panels": 2}},
        "3": {"class_type": "StoryDiffusionConsistentSelfAttention",
              "inputs": dict(csa_inputs, model=["1", 0], story=["2", 3], rate=rate, rate_high_res=rate)},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": ["2", 4]}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["4", 0], "seed": 5,
            "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "cv": {"class_type": "ConsistencyTinyEncoder", "inputs": {"kind": "clip", "seed": 1}},
        "score": {"class_type": "StoryDiffusionStoryConsistency", "inputs": {
            "clip_vision": ["cv", 0], "panels": ["6", 0], "story": ["2", 3], "crop": "center", "center_region": 1.0}},
    }


def test_value_list_sweeps_the_rate_and_the_plot_pairs_each_score_with_its_value(comfy, comfy_nodes, sweep_nodes,
                                                                                 checkpoint_files):
    ckpt, csa_inputs = checkpoint_files("sd15"), csa_defaults(comfy_nodes)
    rates = [0.0, 0.5, 1.0]
    # one run per rate, each rate on its own
    single = []
    for rate in rates:
        test_consistency.CaptureForTests.captured = {}
        prompt = sweep_prompt(ckpt, csa_inputs, rate)
        prompt["capture"] = {"class_type": "ConsistencyCapture", "inputs": {"self_consistency": ["score", 0],
                                                                            "self_min": ["score", 1]}}
        comfy.run(prompt)
        single.append((test_consistency.CaptureForTests.captured["self_consistency"],
                       test_consistency.CaptureForTests.captured["self_min"]))
    assert len({s for s, _ in single}) == len(rates)  # the rate changes the panels, so the scores
    # the same three runs in one queue: Value List -> rate
    prompt = sweep_prompt(ckpt, csa_inputs, ["values", 0])
    prompt["values"] = {"class_type": "StoryDiffusionValueList", "inputs": {"values": "0, 0.5, 1"}}
    prompt["plot"] = {"class_type": "StoryDiffusionConsistencyPlot", "inputs": {
        "values": ["values", 0], "self_consistency": ["score", 0], "self_min": ["score", 1], "panels": ["6", 0],
        "label": "rate"}}
    prompt["capture"] = {"class_type": "SweepCapture", "inputs": {"table": ["plot", 1], "plot": ["plot", 0],
                                                                  "scores": ["score", 0]}}
    SweepCapture.captured = []
    outputs = comfy.run(prompt)
    (table, plot, scores), = SweepCapture.captured
    assert scores == pytest.approx([s for s, _ in single], abs=1e-6)  # run k used rate k
    lines = table[0].splitlines()
    assert lines[0] == "rate | self (mean) | self (worst pair)"
    for line, rate, (mean, worst) in zip(lines[1:], rates, single):
        assert line == f"{rate:g} | {mean:.4f} | {worst:.4f}"
    assert len(plot) == 1 and plot[0].shape[0] == 1 and plot[0].shape[-1] == 3
    assert outputs["plot"]["text"] == table


def test_a_swept_rate_outside_zero_to_one_is_refused(comfy_nodes, checkpoint_files):
    """A linked value skips the widget's 0..1 range: Consistent Self-Attention says so instead of clamping it."""
    import tiny_models

    node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionConsistentSelfAttention"]()
    model = tiny_models.make_model("sd15")
    for name in ("rate", "rate_high_res"):
        with pytest.raises(ValueError, match=f"{name} is 1.5: .* between 0 and 1 .*Value List"):
            node.patch(model, **dict(csa_defaults(comfy_nodes), **{name: 1.5}))
