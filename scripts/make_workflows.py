"""Build the shared workflows (workflows/*.json, ComfyUI UI format 0.4) from the specs in workflow_specs.py.

    python scripts/make_workflows.py                  # start a ComfyUI with the pack, rewrite workflows/
    python scripts/make_workflows.py --check          # exit 1 if a file is stale (see below)
    python scripts/make_workflows.py --object-info f.json [--comfyui-version V]   # a saved /object_info instead

The files are written on ComfyUI 0.3.75 (WRITTEN_ON, the floor of pyproject.toml's requires-comfyui), so they open on
every supported version; rewriting on another version is refused. `--check` on 0.3.75 compares each file exactly with
what it would write (widgets_values are positional: a node that gained or lost an input makes a file stale); on
every version it checks that each file is compatible with that version's nodes
(workflow_builder.compatibility_problems: node types installed, widget values on widgets that accept them, inputs
and links of existing names and matching types, the spec's nodes and links).

Also writes the template cards: web/templates.json (each workflow's title and one-line description, which
web/storydiffusion.js shows in the template browser) and workflows/<name>.jpg (what the workflow makes, drawn
by story/comic.py from flat numbered placeholder panels).
`--check` (used by tests/test_workflows.py) fails when a shipped file is stale.

Workflows that need another pack's nodes (`Workflow.requires`, e.g. story_to_video_animatediff needs
AnimateDiff-Evolved, story_distributed ComfyUI-Distributed): the live server loads the unmodified snapshots from
../shared/thirdparty when they are there (tests/animatediff_fixtures.server_args, a private copy of
ComfyUI-Distributed by tests/distributed_fixtures; that server only). Without one such a workflow cannot be built:
rewriting fails (exit 1, the reason on stderr; the other workflows are still written, its own JSON and
thumbnail are left as they are), while `--check` checks every other file and reports it as
"not checked: <reason>" without failing, so CI without the snapshot stays green.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workflow_builder as builder  # tests also read its errors through this module
import workflow_specs as specs  # tests also read its constants through this module
from workflow_builder import WorkflowBuilder, render
from workflow_specs import WORKFLOWS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(REPO, "workflows")
WRITTEN_ON = "0.3.75"  # the ComfyUI the shipped files are written on: requires-comfyui's floor (test_workflows.py)


def make_builder(name: str, object_info: dict) -> WorkflowBuilder:
    """The filled builder: `.build()` is the workflow, `.models` the model files it references."""
    filled = WorkflowBuilder(object_info, name)
    WORKFLOWS[name].build(filled)
    return filled


def build_workflow(name: str, object_info: dict) -> dict:
    return make_builder(name, object_info).build()


def _tests_module(name: str):
    """A helper module of tests/ (harness, animatediff_fixtures): scripts share the tests' server set-up."""
    tests = os.path.join(REPO, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import importlib

    return importlib.import_module(name)


def ade_missing_reason() -> str | None:
    """Why the live server cannot load AnimateDiff-Evolved (None: the snapshot is there)."""
    return _tests_module("animatediff_fixtures").snapshot_missing_reason()


def distributed_missing_reason() -> str | None:
    """Why the live server cannot load ComfyUI-Distributed (None: the snapshot is there)."""
    fixtures = _tests_module("distributed_fixtures")
    return fixtures.thirdparty_fixtures.snapshot_missing_reason(fixtures.PACK)


def live_object_info() -> tuple[dict, str]:
    """Start the harness ComfyUI (with this pack, and ADE when its snapshot is there) on an empty models folder
    and read /object_info; (object_info, the ComfyUI version)."""
    import tempfile

    harness = _tests_module("harness")
    with tempfile.TemporaryDirectory() as tmp:
        models = os.path.join(tmp, "models")
        for name in harness.MODEL_FOLDERS:
            os.makedirs(os.path.join(models, name))
        extra = ()
        if ade_missing_reason() is None:
            extra = _tests_module("animatediff_fixtures").server_args(os.path.join(tmp, "ade"))
        if distributed_missing_reason() is None:  # a private copy: the pack writes its config file into its folder
            fixtures = _tests_module("distributed_fixtures")
            copy = fixtures.install_copy(os.path.join(tmp, "distributed", "custom_nodes"))
            extra += fixtures.server_args(os.path.join(tmp, "distributed"), copy)
        server = harness.ComfyServer(os.path.join(tmp, "server"), models, extra_args=extra)
        server.start()
        try:
            info = server.get("/object_info")
            version = server.get("/system_stats")["system"]["comfyui_version"]
        finally:
            server.stop()
        for title, reason, needed in (("AnimateDiff-Evolved", ade_missing_reason(), specs.ANIMATEDIFF_NODES),
                                      ("ComfyUI-Distributed", distributed_missing_reason(), specs.DISTRIBUTED_NODES)):
            if reason is None and not all(node in info for node in needed):
                print(f"{title} did not load; the server's log ends:\n{server.read_log()[-3000:]}", file=sys.stderr)
        return info, version


def shipped_problems(name: str, object_info: dict, comfyui_version: str) -> list[str]:
    """Why workflows/<name>.json does not fit the ComfyUI that gave `object_info` ([] when it does): on WRITTEN_ON it
    must be exactly what the spec builds; on every version it must be compatible with the installed nodes."""
    path = Path(WORKFLOWS_DIR, f"{name}.json")
    if not path.exists():
        return [f"workflows/{name}.json is missing"]
    shipped = path.read_text()
    filled = make_builder(name, object_info)
    problems = [f"workflows/{name}.json on ComfyUI {comfyui_version}: {problem}"
                for problem in builder.compatibility_problems(json.loads(shipped), object_info, filled)]
    if comfyui_version == WRITTEN_ON and shipped != render(filled.build()):
        problems.insert(0, f"workflows/{name}.json differs from what make_workflows.py writes on ComfyUI {WRITTEN_ON}")
    return problems


def missing_requirements(name: str, object_info: dict) -> str | None:
    """Why workflow `name` cannot be built from this /object_info (another pack's nodes are missing), or None."""
    missing = [node for node in WORKFLOWS[name].requires if node not in object_info]
    if not missing:
        return None
    reason = f"{name} needs nodes that are not installed ({', '.join(missing)})"
    for title, needed, why in (("ComfyUI-AnimateDiff-Evolved", specs.ANIMATEDIFF_NODES, ade_missing_reason),
                               ("ComfyUI-Distributed", specs.DISTRIBUTED_NODES, distributed_missing_reason)):
        if any(node in needed for node in missing):
            because = why() or ("the snapshot is there, so the /object_info used came from a server that did not "
                                "load it (--object-info file, or the pack failed to import)")
            reason += f": {title} is missing: {because}"
    return reason


# ---------------------------------------------------------------------------------------------------
# template cards: web/templates.json (title + one-line description, read by web/storydiffusion.js) and
# workflows/<name>.jpg, what the workflow makes drawn by the pack's own comic code from placeholder panels

TEMPLATE_INDEX = os.path.join(REPO, "web", "templates.json")
TEMPLATE_CATEGORY = "StoryDiffusion"
THUMBNAIL_SIZE = 512  # longest side, pixels
VIDEO_STRIP_FRAMES = 4  # frames per strip of a video thumbnail
# Frames per transition a video card draws (the colours of the two panels, blended): a fixed picture per workflow,
# not the shipped frame count (16 or 33 frames per transition would make the card a column of tiny strips). These
# are the counts the cards were first drawn with, so the cards stay as they are; a new video workflow gets the
# default.
CARD_FRAMES_PER_TRANSITION = {"story_to_video": 4, "story_to_video_animatediff": 6, "story_to_video_wan": 9}
DEFAULT_CARD_FRAMES_PER_TRANSITION = 6


def pack_module(dotted: str):
    """A plain module of the pack (e.g. story.comic) without importing ComfyUI or the nodes."""
    import importlib
    import types

    package = "storydiffusion_plain"
    if package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [REPO]
        sys.modules[package] = stub
    return importlib.import_module(f"{package}.{dotted}")


def template_index() -> dict:
    return {"title": TEMPLATE_CATEGORY,
            "templates": [{"name": name, "title": spec.title or name, "description": spec.description}
                          for name, spec in WORKFLOWS.items() if spec.shipped]}


def widget_value(filled: WorkflowBuilder, node_id: int, name: str):
    """A node's widget value in the built workflow: the spec's, else the node's default."""
    node = filled.nodes[node_id - 1]
    if name in node.widgets:
        return node.widgets[name]
    for input_name, kind, options in builder.node_inputs(filled.info[node.type]):
        if input_name == name:
            return builder.default_value(kind, options)
    raise KeyError(f"{node.type} has no widget {name!r}")


def _nodes_of(filled: WorkflowBuilder, node_type: str) -> list[int]:
    return [n.id for n in filled.nodes if n.type == node_type]


def placeholder_colour(index: int, count: int) -> tuple[int, int, int]:
    """Panel `index` of `count`: evenly spaced hues, bright and saturated (far from page white and black)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index / max(count, 1) + 0.02) % 1.0, 0.7, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def placeholder_panel(colour: tuple, label: str, size: int, fonts):
    """A flat panel with its number in the middle (white on the colour)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), colour)
    text_size = size // 3
    width = fonts.width(label, text_size)
    ascent, line_h = fonts.line_metrics(text_size)
    fonts.draw(ImageDraw.Draw(image), ((size - width) / 2, (size - line_h) / 2 + ascent), label, text_size,
               (255, 255, 255))
    return image


def thumbnail_plan(name: str, object_info: dict) -> dict:
    """What the thumbnail of a shipped workflow shows: {"kind": "page"|"video", "colours": [...], ...}."""
    filled = make_builder(name, object_info)
    plots = _nodes_of(filled, "StoryDiffusionConsistencyPlot")
    if plots:  # a sweep: the plot, over an illustrative curve, with placeholder panels for every run
        values = pack_module("consistency.sweep").parse_values(
            widget_value(filled, _nodes_of(filled, "StoryDiffusionValueList")[0], "values"))
        story_node = _nodes_of(filled, "StoryDiffusionStory")[0]
        count = len(widget_value(filled, story_node, "panels").splitlines())
        return {"kind": "plot", "values": values, "label": widget_value(filled, plots[0], "label"),
                "labels": [str(i + 1) for i in range(count)],
                "colours": [placeholder_colour(i, count) for i in range(count)]}
    pages = _nodes_of(filled, "StoryDiffusionComicPage")
    if pages:
        parse = pack_module("story.parse")
        story_node = _nodes_of(filled, "StoryDiffusionStory")[0]
        story = parse.parse_story(widget_value(filled, story_node, "characters"), widget_value(filled, story_node, "panels"),
                                  widget_value(filled, story_node, "identity_panels"))
        count = len(story.panels)
        page = {key: widget_value(filled, pages[0], key) for key in
                ("layout", "rows", "columns", "page_width", "margin", "gutter", "caption_height", "border", "layout_seed",
                 "caption_position")}
        return {"kind": "page", "page": page, "captions": [p.caption for p in story.panels],
                "labels": [str(i + 1) for i in range(count)],
                "colours": [placeholder_colour(i, count) for i in range(count)]}
    if _nodes_of(filled, "StoryDiffusionVideoCombine"):
        panels = len(_nodes_of(filled, "LoadImage"))
        per_transition = CARD_FRAMES_PER_TRANSITION.get(name, DEFAULT_CARD_FRAMES_PER_TRANSITION)
        overlap = widget_value(filled, _nodes_of(filled, "StoryDiffusionStoryVideo")[0], "overlap")
        ends = [placeholder_colour(i, panels) for i in range(panels)]
        colours, captions = [], []
        for t in range(panels - 1):
            for j in range(overlap if t else 0, per_transition):
                f = j / (per_transition - 1)
                colours.append(tuple(round(a + (b - a) * f) for a, b in zip(ends[t], ends[t + 1])))
                captions.append(f"panel {t + 1}" if j == 0 else f"panel {t + 2}" if j == per_transition - 1 else "")
        return {"kind": "video", "colours": colours, "captions": captions,
                "labels": [str(i + 1) for i in range(len(colours))], "panel_colours": ends}
    raise ValueError(f"{name}: no Comic Page or Video Combine node to draw a thumbnail of")


def render_thumbnail(name: str, object_info: dict):
    """The card image: the comic page (or the video's frames, in strips) drawn by story/comic.py."""
    from PIL import Image

    comic = pack_module("story.comic")
    plan = thumbnail_plan(name, object_info)
    fonts = comic.FontSet()
    panel = 256
    images = [placeholder_panel(c, label, panel, fonts) for c, label in zip(plan["colours"], plan["labels"])]
    if plan["kind"] == "plot":
        import numpy as np

        sweep = pack_module("consistency.sweep")
        values = plan["values"]
        low, high = min(values), max(values)
        curve = [0.72 + 0.18 * (1.0 - np.exp(-4.0 * (v - low) / ((high - low) or 1.0))) for v in values]
        batch = np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])
        picture = sweep.render_sweep_plot(values, {"self (mean)": curve}, plan["label"], panels=[batch] * len(values),
                                          title=f"Story consistency against {plan['label']} (illustration)")
        image = Image.fromarray(picture)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        return image
    if plan["kind"] == "page":
        p = plan["page"]
        fraction = p["caption_height"] if any(plan["captions"]) and p["caption_position"] == comic.CAPTION_BELOW else 0.0
        height = comic.auto_page_height(p["page_width"], p["margin"], p["gutter"], p["rows"], p["columns"], p["layout"],
                                        1.0, fraction)
        style = comic.PageStyle(page_w=p["page_width"], page_h=height, border=p["border"],
                                caption_position=p["caption_position"], caption_fraction=p["caption_height"])
        rects = comic.layout_pages(len(images), p["layout"], p["page_width"], height, p["margin"], p["gutter"],
                                   p["rows"], p["columns"], seed=p["layout_seed"])
        image = comic.render_pages(images, plan["captions"], rects[:1], style, fonts)[0]
    else:
        width, margin, gutter, fraction = 1024, 16, 12, 0.18
        height = comic.auto_page_height(width, margin, gutter, 1, VIDEO_STRIP_FRAMES, comic.LAYOUT_STRIP, 1.0, fraction)
        style = comic.PageStyle(page_w=width, page_h=height, background=(24, 24, 24), border=2,
                                border_colour=(240, 240, 240), caption_fraction=fraction)
        rects = comic.layout_pages(len(images), comic.LAYOUT_STRIP, width, height, margin, gutter, 1,
                                   VIDEO_STRIP_FRAMES)
        strips = comic.render_pages(images, plan["captions"], rects, style, fonts)
        image = Image.new("RGB", (width, height * len(strips)), style.background)
        for i, strip in enumerate(strips):
            image.paste(strip, (0, i * height))
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    return image


def write_thumbnails(object_info: dict) -> list[str]:
    """workflows/<name>.jpg (the name the template browser shows as the card image) for every shipped workflow."""
    written = []
    for name, spec in WORKFLOWS.items():
        if spec.shipped and missing_requirements(name, object_info) is None:
            dest = os.path.join(WORKFLOWS_DIR, f"{name}.jpg")
            render_thumbnail(name, object_info).save(dest, quality=90)
            written.append(dest)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--object-info", help="a saved /object_info JSON (default: start ComfyUI and ask it)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    parser.add_argument("--comfyui-version", default=WRITTEN_ON,
                        help=f"the ComfyUI version of --object-info (default {WRITTEN_ON})")
    args = parser.parse_args(argv)
    if args.object_info:
        with open(args.object_info) as f:
            info = json.load(f)
        version = args.comfyui_version
    else:
        info, version = live_object_info()
    if version != WRITTEN_ON and not args.check:
        print(f"error: the shipped workflows are written on ComfyUI {WRITTEN_ON}, this is {version}: run "
              "`.harness/venv/bin/python scripts/make_workflows.py` there (--check tests this version)",
              file=sys.stderr)
        return 1
    stale = []
    unavailable = {name: reason for name, spec in WORKFLOWS.items()
                   if spec.shipped and (reason := missing_requirements(name, info))}
    os.makedirs(WORKFLOWS_DIR, exist_ok=True)
    for name, spec in WORKFLOWS.items():
        if not spec.shipped or name in unavailable:
            continue
        if args.check:
            problems = shipped_problems(name, info, version)
            if problems:
                stale.append(name)
                print("\n".join(problems), file=sys.stderr)
            continue
        text = render(build_workflow(name, info))
        path = os.path.join(WORKFLOWS_DIR, f"{name}.json")
        current = Path(path).read_text() if os.path.exists(path) else None
        if current != text:
            with open(path, "w") as f:
                f.write(text)
            print("wrote", os.path.relpath(path, REPO))
    index = json.dumps(template_index(), indent=1, ensure_ascii=False) + "\n"
    current = Path(TEMPLATE_INDEX).read_text() if os.path.exists(TEMPLATE_INDEX) else None
    if current != index:
        if args.check:
            stale.append("web/templates.json")
        else:
            with open(TEMPLATE_INDEX, "w") as f:
                f.write(index)
            print("wrote", os.path.relpath(TEMPLATE_INDEX, REPO))
    for name, spec in WORKFLOWS.items():
        thumbnail = os.path.join(WORKFLOWS_DIR, f"{name}.jpg")
        if spec.shipped and args.check and not os.path.exists(thumbnail):
            stale.append(f"{name}.jpg")
    if not args.check:
        for path in write_thumbnails(info):
            print("wrote", os.path.relpath(path, REPO))
    for name, reason in unavailable.items():
        if args.check:
            print(f"not checked: workflows/{name}.json: {reason}", file=sys.stderr)
        else:
            print(f"error: cannot build workflows/{name}.json (left as it is, with its thumbnail): {reason}",
                  file=sys.stderr)
    if stale:
        print(f"stale workflows (rerun `python scripts/make_workflows.py`): {stale}", file=sys.stderr)
        return 1
    return 1 if unavailable and not args.check else 0


if __name__ == "__main__":
    sys.exit(main())
