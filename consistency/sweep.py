"""Tuning with numbers: a list of values to sweep (e.g. CSA rates) and a picture of the consistency scores against
them (Pillow + numpy, no plotting library).

ComfyUI runs a node once per item of a list input, so one queue renders the story once per swept value, scores each
run (Story Consistency) and collects the scores into one plot: score lines against the value, and under them each
run's panels, so a user sees the trade-off (more shared tokens: more alike characters, less varied panels) on their own
checkpoint. The text uses the pack's font, so the picture is the same on every machine.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..story.comic_typeset import FontSet
from .heatmap import BACKGROUND, INK, MUTED, _thumbnail
from .score import ConsistencyError

MAX_VALUES = 32  # one sampling run each: more is rarely what a user meant to queue
# series name -> colour, dashed
SERIES_STYLE = {"self (mean)": ((55, 126, 184), False), "self (worst pair)": ((55, 126, 184), True),
                "cross (references)": ((228, 26, 28), False)}
WIDTH, CHART_H, MARGIN, GAP = 880, 360, 16, 6
TEXT_SIZE, TITLE_SIZE = 13, 16
THUMB = 72  # panel thumbnails under the chart, one row per swept value


def parse_values(text: str) -> list[float]:
    """'0, 0.25, 0.5' (commas, spaces or new lines) -> [0.0, 0.25, 0.5]; a clear message for anything else."""
    items = [t for t in text.replace(",", " ").replace(";", " ").split() if t]
    if not items:
        raise ConsistencyError("Value List is empty: write the values to try, e.g. `0.3, 0.5, 0.7`.")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ConsistencyError(f"Value List: {item!r} is not a number (write numbers separated by commas, "
                                   "e.g. `0.3, 0.5, 0.7`).") from None
        if not math.isfinite(value):
            raise ConsistencyError(f"Value List: {item!r} is not a finite number.")
        values.append(value)
    if len(values) > MAX_VALUES:
        raise ConsistencyError(f"Value List has {len(values)} values; at most {MAX_VALUES} (each one is a whole "
                               "sampling run).")
    if len(set(values)) != len(values):
        raise ConsistencyError(f"Value List repeats a value: {values} (each value is one run; list each once).")
    return values


def check_series(values: Sequence[float], series: dict[str, Sequence[float]]) -> dict[str, list[float]]:
    """Series of the same length as `values` (one score per run); NaN where a run had no score."""
    out = {}
    for name, scores in series.items():
        scores = [float(s) for s in scores]
        if len(scores) != len(values):
            raise ConsistencyError(f"Consistency Plot got {len(values)} values but {len(scores)} '{name}' scores: "
                                   "connect the scores of the runs made with these values (the same Value List).")
        out[name] = scores
    return out


def value_range(scores: Sequence[float]) -> tuple[float, float]:
    """The chart's y range: the scores' range rounded out to 0.05 (0.1 of room when they are all equal)."""
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    low, high = math.floor(low / 0.05 + 1e-9) * 0.05, math.ceil(high / 0.05 - 1e-9) * 0.05
    if high - low < 0.1:
        middle = (low + high) / 2
        low, high = middle - 0.05, middle + 0.05
    return low, high


def _line(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], colour, width: int,
          dashed: bool) -> None:
    if not dashed:
        draw.line([a, b], fill=colour, width=width)
        return
    steps = max(1, int(math.hypot(b[0] - a[0], b[1] - a[1]) // 8))
    for k in range(0, steps, 2):  # dash, gap, dash, ...
        t0, t1 = k / steps, min(1.0, (k + 1) / steps)
        draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                   (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=colour, width=width)


def render_sweep_plot(values: Sequence[float], series: dict[str, Sequence[float]], label: str = "rate",
                      panels: Sequence | None = None, title: str | None = None,
                      fonts: FontSet | None = None) -> np.ndarray:
    """values[k] = the swept value of run k; series = {name: score of each run} (NaN = none); panels[k] = run k's
    images ([N, H, W, C] in 0..1) or None -> RGB uint8 [height, width, 3]: the lines, then one row of thumbnails per
    run in the order given."""
    if not values:
        raise ConsistencyError("Consistency Plot got no values: connect the Value List that drove the runs.")
    series = check_series(values, series)
    if panels is not None and len(panels) != len(values):
        raise ConsistencyError(f"Consistency Plot got {len(values)} values but {len(panels)} panel batches: connect "
                               "the images of the runs made with these values.")
    fonts = fonts or FontSet()
    title = title or f"Story consistency against {label}"
    ascent, line_h = fonts.line_metrics(TEXT_SIZE)
    title_ascent, title_h = fonts.line_metrics(TITLE_SIZE)
    legend_h = line_h * max(1, len(series))
    thumbs_h = 0 if panels is None else len(values) * (THUMB + GAP) + GAP
    height = MARGIN + title_h + GAP + CHART_H + line_h * 2 + GAP + legend_h + thumbs_h + MARGIN
    canvas = Image.new("RGB", (WIDTH, int(height)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    fonts.draw(draw, (MARGIN, MARGIN + title_ascent), title, TITLE_SIZE, INK)

    # axes: y = score, x = the swept value
    low, high = value_range([s for scores in series.values() for s in scores])
    axis_w = fonts.width("-0.00", TEXT_SIZE) + GAP
    left, top = MARGIN + axis_w, MARGIN + title_h + GAP
    right, bottom = WIDTH - MARGIN - 8, top + CHART_H
    x_low, x_high = min(values), max(values)
    x_span = (x_high - x_low) or 1.0
    pad = 0.04 * (right - left)

    def to_x(v: float) -> float:
        return left + pad + (v - x_low) / x_span * (right - left - 2 * pad) if x_high > x_low else (left + right) / 2

    def to_y(s: float) -> float:
        return bottom - (s - low) / (high - low) * (bottom - top)

    ticks = round((high - low) / 0.05)
    step = 1 if ticks <= 10 else 2 if ticks <= 20 else 4
    for k in range(0, ticks + 1, step):
        s = low + k * 0.05
        y = to_y(s)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        text = f"{s:.2f}"
        fonts.draw(draw, (left - GAP - fonts.width(text, TEXT_SIZE), y + ascent / 2 - 1), text, TEXT_SIZE, MUTED)
    draw.rectangle([left, top, right, bottom], outline=INK)
    for v in values:
        x = to_x(v)
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        text = f"{v:g}"
        fonts.draw(draw, (x - fonts.width(text, TEXT_SIZE) / 2, bottom + 4 + ascent), text, TEXT_SIZE, INK)
    fonts.draw(draw, ((left + right) / 2 - fonts.width(label, TEXT_SIZE) / 2, bottom + 4 + ascent + line_h), label,
               TEXT_SIZE, INK)

    # one line per series through its finite points (in value order), each point labelled
    order = sorted(range(len(values)), key=lambda k: values[k])
    for name, scores in series.items():
        colour, dashed = SERIES_STYLE.get(name, ((77, 175, 74), False))
        points = [(to_x(values[k]), to_y(scores[k]), scores[k]) for k in order if math.isfinite(scores[k])]
        for a, b in itertools.pairwise(points):
            _line(draw, a[:2], b[:2], colour, 3, dashed)
        for x, y, s in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            text = f"{s:.3f}"
            fonts.draw(draw, (x + 6, y - 6), text, TEXT_SIZE - 2, colour)

    # legend (a series without any score says so)
    y = bottom + 4 + line_h * 2 + GAP
    for name, scores in series.items():
        colour, dashed = SERIES_STYLE.get(name, ((77, 175, 74), False))
        mid = y + line_h / 2
        _line(draw, (MARGIN, mid), (MARGIN + 28, mid), colour, 3, dashed)
        missing = not any(math.isfinite(s) for s in scores)
        text = name + (" — no score (no character in two panels, or no references)" if missing else "")
        fonts.draw(draw, (MARGIN + 36, y + ascent), text, TEXT_SIZE, MUTED if missing else INK)
        y += line_h

    # each run's panels, labelled with its value
    if panels is not None:
        y = int(height - MARGIN - thumbs_h + GAP)
        for v, batch in zip(values, panels):
            text = f"{label} {v:g}"
            fonts.draw(draw, (MARGIN, y + THUMB / 2 + ascent / 2), text, TEXT_SIZE, INK)
            x = MARGIN + fonts.width(f"{label} -0.000", TEXT_SIZE) + GAP
            for image in np.asarray(batch):
                if x + THUMB > WIDTH - MARGIN:
                    break
                canvas.paste(_thumbnail(image, THUMB), (int(x), y))
                x += THUMB + GAP
            y += THUMB + GAP
    return np.array(canvas, dtype=np.uint8)


def sweep_table(values: Sequence[float], series: dict[str, Sequence[float]], label: str = "rate") -> str:
    """The plotted numbers as text: one line per run, in the order given."""
    series = check_series(values, series)
    names = list(series)
    lines = [" | ".join([label] + names)]
    for k, v in enumerate(values):
        cells = [f"{v:g}"] + ["-" if not math.isfinite(series[n][k]) else f"{series[n][k]:.4f}" for n in names]
        lines.append(" | ".join(cells))
    return "\n".join(lines)
