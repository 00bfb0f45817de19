"""A UI-format (0.4) workflow builder over a live `/object_info`: the generic half of make_workflows.

Why: the frontend restores widget values by *position* (`widgets_values`), in the order of the
node's inputs in `/object_info` (`input_order`), with an extra "control after generate" value after
every seed. Hand-edited JSON silently shifts when a node gains an input; building from the live
`/object_info` keeps every value on its widget. Specs (workflow_specs.py) only say which nodes,
widgets and links a workflow has.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these even without the flag
# Layout (LiteGraph units): nodes stand in columns, stacked top to bottom. A node's title bar is drawn
# TITLE_HEIGHT above its `pos`, so the gaps below are between one node's bottom and the next one's title.
TITLE_HEIGHT = 30
COLUMN_GAP = 60  # between the widest node of a column and the next column
ROW_GAP = 40  # between a node's bottom and the title bar of the node below it
LEFT, TOP = 60, 80
# Sizes the frontend (1.32) gives at least: slot rows and widget rows, multiline boxes, image previews.
SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT = 26, 28, 140
IMAGE_PREVIEW_HEIGHT = 240  # LoadImage draws the chosen image under its widgets


class ModelFile(str):
    """A widget value that names a file in a ComfyUI models folder (not checked against the combo:
    the list depends on the user's disk). `kind` tells the tests which tiny random file to write."""

    def __new__(cls, folder: str, name: str, kind: str):
        value = super().__new__(cls, name)
        value.folder, value.kind = folder, kind
        return value


class SpecError(ValueError):
    """A workflow spec does not match the nodes that are installed (rerun after fixing the spec)."""


# ---------------------------------------------------------------------------------------------------
# one node's inputs as the frontend sees them


def node_inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) for the required then optional inputs, in the frontend's order."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, []):
            spec = specs[name]
            out.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def combo_options(kind, options: dict) -> list:
    return kind if isinstance(kind, list) else list(options.get("options", []))


def default_value(kind, options: dict):
    if "default" in options:
        return options["default"]
    if isinstance(kind, list) or kind == "COMBO":
        choices = combo_options(kind, options)
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def widget_roles(name: str, kind, options: dict) -> list[str]:
    """What each widgets_values entry of one widget input is: "value", then the widgets the frontend adds after
    it: "control" (control after generate, after a seed) and "upload" (LoadImage's upload button)."""
    roles = ["value"]
    if options.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES):
        roles.append("control")
    if options.get("image_upload"):
        roles.append("upload")
    return roles


def widget_slots(name: str, kind, options: dict, value) -> list:
    """The widgets_values entries one input contributes (value, then the widgets the frontend adds)."""
    # "control after generate" is "fixed": never change a shipped seed on queue; the upload widget stores its kind
    return [{"value": value, "control": "fixed", "upload": "image"}[role] for role in widget_roles(name, kind, options)]


# ---------------------------------------------------------------------------------------------------
# the builder


@dataclass
class _Node:
    id: int
    type: str
    pos: list
    size: list
    title: str | None
    widgets: dict
    inputs: list = field(default_factory=list)  # dicts as saved
    outputs: list = field(default_factory=list)
    widgets_values: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    column: int = 0


def node_height(inputs: int, outputs: int, widget_rows: int, boxes: float) -> float:
    """A node's body height (title bar excluded), at least what the frontend computes for it: the slot
    rows (inputs and outputs side by side), one row per widget, a tall box per multiline text or image."""
    return round(40 + SLOT_HEIGHT * max(inputs, outputs) + WIDGET_HEIGHT * widget_rows + MULTILINE_HEIGHT * boxes)


class WorkflowBuilder:
    """Adds nodes and links by name; checks every name and value against /object_info."""

    def __init__(self, object_info: dict, name: str):
        self.info = object_info
        self.name = name
        self.nodes: list[_Node] = []
        self.links: list[list] = []
        self.column_y: dict[int, float] = {}
        self.models: dict[str, dict[str, str]] = {}  # models folder -> {file name: kind}

    def _place(self, node: _Node, column: int) -> None:
        """Stack `node` under the last node of `column`; x is set in build(), once every column's width is known."""
        y = self.column_y.get(column, float(TOP))
        self.column_y[column] = y + node.size[1] + ROW_GAP + TITLE_HEIGHT
        node.column = column
        node.pos = [0, y]

    def _column_x(self) -> dict[int, float]:
        x, out = float(LEFT), {}
        for column in sorted({n.column for n in self.nodes}):
            out[column] = x
            x += max(n.size[0] for n in self.nodes if n.column == column) + COLUMN_GAP
        return out

    def add(self, node_type: str, column: int = 0, widgets: dict | None = None, title: str | None = None,
            width: float = 340) -> int:
        """A node of `node_type` in layout column `column`; unnamed widgets keep their defaults."""
        if node_type not in self.info:
            raise SpecError(f"{self.name}: node type {node_type!r} is not installed")
        info = self.info[node_type]
        widgets = dict(widgets or {})
        inputs = node_inputs(info)
        known = {n for n, k, o in inputs if is_widget(k, o)}
        unknown = set(widgets) - known
        if unknown:
            raise SpecError(f"{self.name}: {node_type} has no widget {sorted(unknown)} (widgets: {sorted(known)})")
        values, sockets, rows, boxes = [], [], 0, 0
        for name, kind, options in inputs:
            if not is_widget(kind, options):
                sockets.append({"name": name, "type": kind, "link": None})
                continue
            value = widgets.get(name, default_value(kind, options))
            choices = combo_options(kind, options) if (isinstance(kind, list) or kind == "COMBO") else []
            if isinstance(value, ModelFile):
                self.models.setdefault(value.folder, {})[str(value)] = value.kind
                value = str(value)
            elif choices and value not in choices:
                raise SpecError(f"{self.name}: {node_type}.{name} = {value!r} is not one of {choices}")
            slots = widget_slots(name, kind, options, value)
            values += slots
            if kind == "STRING" and options.get("multiline"):
                boxes += 1
            else:
                rows += len(slots)  # the value, then a seed's control or the upload button
            if options.get("image_upload"):
                boxes += IMAGE_PREVIEW_HEIGHT / MULTILINE_HEIGHT
        outputs = [{"name": out_name, "type": "COMBO" if isinstance(kind, list) else kind, "links": [], "slot_index": i}
                   for i, (out_name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        # the frontend widens a node to fit its title (about 7.5 px per character at the default font)
        width = max(width, round(40 + 7.5 * len(title or info.get("display_name") or node_type)))
        node = _Node(len(self.nodes) + 1, node_type, [0, 0], [width, node_height(len(sockets), len(outputs), rows, boxes)],
                     title, widgets, sockets, outputs, values)
        self._place(node, column)
        self.nodes.append(node)
        return node.id

    def note(self, text: str, column: int = 0, title: str = "Note", width: float = 340, height: float = 160) -> int:
        """A MarkdownNote (frontend-only: never part of the API prompt)."""
        node = _Node(len(self.nodes) + 1, "MarkdownNote", [0, 0], [width, height], title, {}, [], [], [text])
        self._place(node, column)
        node.extra = {"color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node.id

    def connect(self, src: int, output: str | int, dst: int, input_name: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        if isinstance(output, str):
            matches = [o for o in source.outputs if o["name"] == output]
            if not matches:
                raise SpecError(f"{self.name}: {source.type} has no output {output!r} "
                                f"(outputs: {[o['name'] for o in source.outputs]})")
            out = matches[0]
        else:
            out = source.outputs[output]
        slot = next((i for i, s in enumerate(target.inputs) if s["name"] == input_name), None)
        if slot is None:
            slot = self._widget_to_socket(target, input_name)
        socket = target.inputs[slot]
        if socket["link"] is not None:
            raise SpecError(f"{self.name}: {target.type}.{input_name} is linked twice")
        if not _types_match(out["type"], socket["type"]):
            raise SpecError(f"{self.name}: cannot link {source.type}.{out['name']} ({out['type']}) "
                            f"to {target.type}.{input_name} ({socket['type']})")
        link_id = len(self.links) + 1
        socket["link"] = link_id
        out["links"].append(link_id)
        self.links.append([link_id, source.id, out["slot_index"], target.id, slot, out["type"]])

    def _widget_to_socket(self, node: _Node, input_name: str) -> int:
        """Linking into a widget: the frontend saves such inputs after the sockets, with `widget`."""
        for name, kind, options in node_inputs(self.info[node.type]):
            if name == input_name and is_widget(kind, options):
                node.inputs.append({"name": name, "type": "COMBO" if isinstance(kind, list) else kind,
                                    "widget": {"name": name}, "link": None})
                return len(node.inputs) - 1
        raise SpecError(f"{self.name}: {node.type} has no input {input_name!r}")

    def build(self) -> dict:
        nodes, column_x = [], self._column_x()
        for order, node in enumerate(self._execution_order()):
            entry = {"id": node.id, "type": node.type, "pos": [column_x[node.column], node.pos[1]], "size": node.size, "flags": {},
                     "order": order, "mode": 0, "inputs": node.inputs, "outputs": node.outputs,
                     "properties": {} if node.type == "MarkdownNote" else {"Node name for S&R": node.type},
                     "widgets_values": node.widgets_values}
            if node.title:
                entry["title"] = node.title
            entry.update(node.extra)
            nodes.append(entry)
        nodes.sort(key=lambda n: n["id"])
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-storydiffusion/workflows/{self.name}")),
            "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4,
        }

    def _execution_order(self) -> list[_Node]:
        done, order = set(), []
        parents = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        while len(order) < len(self.nodes):
            ready = [n for n in self.nodes if n.id not in done and parents[n.id] <= done]
            if not ready:
                raise SpecError(f"{self.name}: the links form a cycle")
            order.append(ready[0])
            done.add(ready[0].id)
        return order


def _types_match(out_type: str, in_type) -> bool:
    if out_type == "*" or in_type == "*":
        return True
    return bool(set(str(out_type).split(",")) & set(str(in_type).split(",")))


# ---------------------------------------------------------------------------------------------------
# a shipped workflow on another ComfyUI version

FRONTEND_ONLY_NODES = ("MarkdownNote", "Note")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def _socket_type(kind) -> str:
    return "COMBO" if isinstance(kind, list) else kind


def _widget_layout(info: dict) -> list[tuple[str, object, dict, str]]:
    """(input name, type, options, role) of each widgets_values entry, in the frontend's order; role "value", or
    "control" / "upload" for the widgets the frontend adds after a seed / an image combo (see widget_slots)."""
    return [(name, kind, options, role) for name, kind, options in node_inputs(info) if is_widget(kind, options)
            for role in widget_roles(name, kind, options)]


def _value_problem(kind, options: dict, value, model_files: set) -> str | None:
    """Why this widget cannot hold `value` (None: it can). A file name the spec loads from a models folder need not
    be among the choices: those list the user's disk."""
    if isinstance(kind, list) or kind == "COMBO":
        choices = combo_options(kind, options)
        return None if value in choices or value in model_files else f"{value!r} is not one of {choices[:12]}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return f"{value!r} is not {kind}"
        if ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
            return f"{value!r} is outside [{options.get('min')}, {options.get('max')}]"
        return None
    expected = {"STRING": str, "BOOLEAN": bool}.get(kind)
    return None if expected is None or isinstance(value, expected) else f"{value!r} is not {kind}"


def compatibility_problems(workflow: dict, object_info: dict, expected: WorkflowBuilder) -> list[str]:
    """What keeps `workflow` (UI JSON written on another ComfyUI version) from opening as its spec on the nodes of
    `object_info`; [] when compatible. `expected` is the spec built on these nodes. Checked: every node type is
    installed; each widgets_values entry lands (by position, as the frontend restores them) on a widget of this
    version that accepts it, and a value the spec sets lands on the widget the spec names; every input socket is an
    input of that name and a matching type here; every link joins an existing output to that input with a matching
    type; and the nodes and links are the spec's. Values the spec leaves at a default may differ (a newer default,
    a new trailing widget: the frontend fills those in)."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    spec_nodes = {n.id: n for n in expected.nodes}
    shipped_types, spec_types = {i: n["type"] for i, n in nodes.items()}, {n.id: n.type for n in expected.nodes}
    if shipped_types != spec_types:
        return [f"the nodes are not the spec's: {sorted(shipped_types.items())} vs {sorted(spec_types.items())}"]
    model_files = {name for files in expected.models.values() for name in files}
    for node_id, node in sorted(nodes.items()):
        label = f"node {node_id} ({node['type']})"
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{label}: node type is not installed")
            continue
        layout, values = _widget_layout(info), node.get("widgets_values", [])
        if len(values) > len(layout):
            problems.append(f"{label}: {len(values)} widget values for {len(layout)} widgets "
                            f"({[f'{n}:{r}' for n, _, _, r in layout]})")
        placed = {}
        for (name, kind, options, role), value in zip(layout, values):
            if role == "control":
                why = None if value in CONTROL_VALUES else f"{value!r} is not a control-after-generate mode"
            elif role == "upload":
                why = None if value == "image" else f"{value!r} is not the image upload widget"
            else:
                placed[name] = value
                why = _value_problem(kind, options, value, model_files)
            if why:
                problems.append(f"{label}: widget {name} ({role}): {why}")
        for name, value in spec_nodes[node_id].widgets.items():
            if placed.get(name, object()) != (str(value) if isinstance(value, ModelFile) else value):
                problems.append(f"{label}: widget {name} = {placed.get(name)!r}, the spec sets {value!r}")
        current = {name: (kind, options) for name, kind, options in node_inputs(info)}
        for socket in node.get("inputs", []):
            if socket["name"] not in current:
                problems.append(f"{label}: input {socket['name']!r} does not exist (inputs: {sorted(current)})")
                continue
            kind, options = current[socket["name"]]
            if "widget" in socket and not is_widget(kind, options):
                problems.append(f"{label}: input {socket['name']!r} is saved as a widget input but is a socket here")
            if not _types_match(socket["type"], _socket_type(kind)):
                problems.append(f"{label}: input {socket['name']!r} is {socket['type']} in the file, "
                                f"{_socket_type(kind)} here")
    spec_links = sorted((link[1], link[2], link[3], expected.nodes[link[3] - 1].inputs[link[4]]["name"])
                        for link in expected.links)
    links = []
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        label = f"link {link_id} ({nodes[src]['type']}[{src_slot}] -> {nodes[dst]['type']})"
        inputs = nodes[dst].get("inputs", [])
        if dst_slot >= len(inputs) or inputs[dst_slot].get("link") != link_id:
            problems.append(f"{label}: target slot {dst_slot} does not hold this link")
            continue
        input_name = inputs[dst_slot]["name"]
        links.append((src, src_slot, dst, input_name))
        outputs = object_info.get(nodes[src]["type"], {}).get("output", [])
        current = {name: kind for name, kind, _ in node_inputs(object_info.get(nodes[dst]["type"], {"input": {}}))}
        if src_slot >= len(outputs):
            problems.append(f"{label}: {nodes[src]['type']} has {len(outputs)} outputs here")
        elif input_name in current:
            out_type, in_type = _socket_type(outputs[src_slot]), _socket_type(current[input_name])
            if not _types_match(out_type, in_type):
                problems.append(f"{label}: output {out_type} cannot feed {input_name} ({in_type})")
            if not _types_match(link_type, out_type):
                problems.append(f"{label}: the file says the link carries {link_type}, the output is {out_type}")
    if sorted(links) != spec_links:
        problems.append(f"the links are not the spec's: {sorted(set(links) ^ set(spec_links))}")
    return problems


# ---------------------------------------------------------------------------------------------------
# a workflow spec


@dataclass(frozen=True)
class Workflow:
    build: Callable[[WorkflowBuilder], None]
    description: str
    outputs: tuple  # file extensions the run must write, e.g. (".png",)
    shipped: bool = True  # False: test-only (not written to workflows/)
    video_frames: int | None = None  # frames the written video must decode to (video workflows)
    title: str = ""  # the template card's title (default: the file name)
    # node ids of other packs it needs (e.g. AnimateDiff-Evolved's): without them make_workflows.py cannot build
    # it (`--check` reports it "not checked") and the tests that build or run it skip
    requires: tuple = ()



def sample_and_decode(b: WorkflowBuilder, sampler: int, decode: int, *, model: tuple, positive: tuple,
                      negative: tuple, latent: tuple, vae: tuple) -> None:
    """Wire a KSampler and its VAE Decode; each input is a (node, output) pair. Every spec does this."""
    b.connect(*model, sampler, "model")
    b.connect(*positive, sampler, "positive")
    b.connect(*negative, sampler, "negative")
    b.connect(*latent, sampler, "latent_image")
    b.connect(sampler, 0, decode, "samples")
    b.connect(*vae, decode, "vae")


def render(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"
