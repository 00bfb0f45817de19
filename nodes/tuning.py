"""Nodes: sweep a setting over a list of values in one queue (Value List) and plot the consistency scores of the runs
against it (Consistency Plot). Thin: the parsing and the picture are consistency/sweep.py."""
from __future__ import annotations

import torch

from ..common.sockets import CATEGORY
from ..consistency import sweep
from ..consistency.score import ConsistencyError

SUBCATEGORY = f"{CATEGORY}/consistency"


class StoryDiffusionValueList:
    DESCRIPTION = ("A list of numbers to try, one run each: connect `values` to a number input of another node (e.g. "
                   "the rate of Consistent Self-Attention) and ComfyUI runs that node and everything after it once per "
                   "value, in one queue. Connect the same `values` to Consistency Plot to see the scores against them.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ("FLOAT", "INT")
    RETURN_NAMES = ("values", "count")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("The values, as a list: each node fed by it runs once per value, in this order.",
                       "How many values (runs).")
    FUNCTION = "values"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("STRING", {
            "default": "0.3, 0.5, 0.7",
            "tooltip": f"Numbers separated by commas (at most {sweep.MAX_VALUES}, each once): every value is one whole "
                       "sampling run."})}}

    def values(self, values):
        parsed = sweep.parse_values(values)
        return (parsed, len(parsed))


class StoryDiffusionConsistencyPlot:
    DESCRIPTION = ("Collects the Story Consistency scores of runs made with different values of a setting (a Value "
                   "List feeding e.g. the rate of Consistent Self-Attention) into one picture: the scores against the "
                   "value, and under them each run's panels. Higher self consistency = more alike characters; look at "
                   "the panels for what it costs (poses and scenes that stop varying).")
    CATEGORY = SUBCATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "table")
    OUTPUT_TOOLTIPS = ("The plot: one line per score against the value, each run's panels below.",
                       "The plotted numbers, one line per run.")
    OUTPUT_NODE = True
    FUNCTION = "plot"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "values": ("FLOAT", {"forceInput": True, "tooltip": "The Value List's values (the x axis)."}),
            "self_consistency": ("FLOAT", {"forceInput": True, "tooltip": "Story Consistency's self_consistency of "
                                                                          "every run."}),
            "label": ("STRING", {"default": "rate", "tooltip": "What the values are (the x axis' name)."}),
        }, "optional": {
            "self_min": ("FLOAT", {"forceInput": True, "tooltip": "Story Consistency's self_min of every run (the "
                                                                  "worst pair), drawn dashed."}),
            "cross_consistency": ("FLOAT", {"forceInput": True, "tooltip": "Story Consistency's cross_consistency of "
                                                                           "every run (with references)."}),
            "panels": ("IMAGE", {"tooltip": "The panels of every run (the VAE Decode that Story Consistency scored): "
                                            "a row of thumbnails per value."}),
        }}

    def plot(self, values, self_consistency, label, self_min=None, cross_consistency=None, panels=None):
        name = (label[0] if label else "rate").strip() or "value"
        series = {"self (mean)": self_consistency}
        if self_min is not None:
            series["self (worst pair)"] = self_min
        if cross_consistency is not None:
            series["cross (references)"] = cross_consistency
        try:
            batches = None if panels is None else [p.cpu().float().numpy() for p in panels]
            picture = sweep.render_sweep_plot(list(values), series, name, batches)
            table = sweep.sweep_table(list(values), series, name)
        except ConsistencyError as e:
            raise e.with_traceback(None) from None
        image = torch.from_numpy(picture).float().div(255.0).unsqueeze(0)
        return {"ui": {"text": [table]}, "result": (image, table)}


NODE_CLASS_MAPPINGS = {
    "StoryDiffusionValueList": StoryDiffusionValueList,
    "StoryDiffusionConsistencyPlot": StoryDiffusionConsistencyPlot,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StoryDiffusionValueList": "Value List (StoryDiffusion)",
    "StoryDiffusionConsistencyPlot": "Consistency Plot (StoryDiffusion)",
}
