"""The pack keeps its node contract (tests/node_contract.json, see tests/node_contract.py): no node id, input or
output of the last release is gone or changed, and new inputs are optional. The checker itself is tested on
contracts and node classes changed in memory, one kind of break at a time."""
from __future__ import annotations

import copy

import pytest

import node_contract

FILE_COMBOS = {("StoryDiffusionPhotoMakerLoader", "photomaker_name"), ("StoryDiffusionIPAdapterLoader", "ipadapter_file"),
               ("StoryDiffusionLoadIdentityBank", "bank_name"), ("StoryDiffusionMotionPredictorLoader", "predictor_name")}


@pytest.fixture(scope="module")
def current(pack):
    return node_contract.snapshot(pack.NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def contract():
    return node_contract.load()


def test_the_nodes_keep_the_contract(contract, current):
    problems = node_contract.breaks(contract, current)
    assert not problems, "the nodes break the contract of the last release:\n" + "\n".join(
        problems + [node_contract.UPDATE_HINT])


def test_the_contract_file_is_what_write_renders(contract):
    """The file is the checker's own rendering (so --write after a release gives a one-line-per-change diff)."""
    with open(node_contract.CONTRACT, encoding="utf-8") as f:
        assert f.read() == node_contract.render(contract)


def test_file_lists_compare_as_combo_whatever_the_folders_hold(pack, contract, monkeypatch):
    """Loader combos are recorded without the files of the machine that wrote the contract, and read the same when
    the model folders are full."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_filename_list", lambda name: ["mine.safetensors", "other.bin"])
    listed = {(node_id, e["name"]) for node_id, entry in contract.items() for e in entry["inputs"] if e.get("files")}
    assert listed == FILE_COMBOS
    for node_id, name in FILE_COMBOS:
        (entry,) = [e for e in contract[node_id]["inputs"] if e["name"] == name]
        assert entry["type"] == "COMBO" and not any(o.endswith((".safetensors", ".bin")) for o in entry["options"])
        assert node_contract.node_entry(pack.NODE_CLASS_MAPPINGS[node_id]) == contract[node_id]
    assert folder_paths.get_filename_list("checkpoints") == ["mine.safetensors", "other.bin"]  # restored


# ---------------------------------------------------------------------------------------------------
# the checker, on changed copies of the real contract


def changed(contract, edit):
    current = copy.deepcopy(contract)
    edit(current)
    return node_contract.breaks(contract, current)


def inputs(nodes, node_id):
    return nodes[node_id]["inputs"]


def find(items, name):
    return next(e for e in items if e["name"] == name)


STORY, COMIC = "StoryDiffusionStory", "StoryDiffusionComicPage"


@pytest.mark.parametrize(("what", "edit", "expected"), [
    ("node removed", lambda c: c.pop(COMIC), "the node is gone"),
    ("input removed", lambda c: inputs(c, COMIC).remove(find(inputs(c, COMIC), "gutter")), "input 'gutter' is gone"),
    ("input type changed", lambda c: find(inputs(c, COMIC), "margin").update(type="FLOAT"),
     "input 'margin' changed type from INT to FLOAT"),
    ("combo turned into a number", lambda c: find(inputs(c, COMIC), "layout").update(type="INT"),
     "input 'layout' changed type from COMBO to INT"),
    ("inputs swapped", lambda c: inputs(c, COMIC).reverse(), "moved from position"),
    ("optional input inserted before others",
     lambda c: inputs(c, COMIC).insert(3, {"name": "bleed", "type": "INT", "required": False}),
     "input 'rows' moved from position 3 to 4"),
    ("new required input", lambda c: inputs(c, COMIC).append({"name": "dpi", "type": "INT", "required": True}),
     "new input 'dpi' is required"),
    ("optional input became required",
     lambda c: find(inputs(c, "StoryDiffusionIdentityBankWrite"), "keep").update(required=True),
     "input 'keep' became required"),
    ("choice removed", lambda c: find(inputs(c, COMIC), "layout")["options"].remove("grid"),
     "lost the options ['grid']"),
    ("loader lost its 'none'", lambda c: find(inputs(c, "StoryDiffusionMotionPredictorLoader"),
                                              "predictor_name")["options"].clear(), "lost the options ['none']"),
    ("output removed", lambda c: c[STORY]["outputs"].pop(), "output 4 (panel_count, INT) is gone"),
    ("output type changed", lambda c: c[STORY]["outputs"][2].update(type="CAPTIONS"),
     "output 2 (captions) changed its type from 'STRING' to 'CAPTIONS'"),
    ("output renamed", lambda c: c[STORY]["outputs"][0].update(name="cond"),
     "output 0 (positive) changed its name from 'positive' to 'cond'"),
    ("outputs swapped", lambda c: c[STORY]["outputs"].reverse(), "output 0 (positive) changed its type"),
    ("output no longer a list", lambda c: c["StoryDiffusionPanelPairs"]["outputs"][0].update(list=False),
     "changed its list output flag from True to False"),
])
def test_each_kind_of_break_is_caught(contract, what, edit, expected):
    problems = changed(contract, edit)
    assert any(expected in p for p in problems), (what, problems)


@pytest.mark.parametrize(("what", "edit"), [
    ("new node", lambda c: c.update(StoryDiffusionNew={"inputs": [{"name": "x", "type": "INT", "required": True}],
                                                       "outputs": []})),
    ("optional input appended", lambda c: inputs(c, COMIC).append({"name": "dpi", "type": "INT", "required": False})),
    ("output appended", lambda c: c[STORY]["outputs"].append({"name": "pages", "type": "INT", "list": False})),
    ("choice appended", lambda c: find(inputs(c, COMIC), "layout")["options"].append("manga")),
    ("last required input made optional", lambda c: inputs(c, COMIC)[-1].update(required=False)),
])
def test_additions_are_not_breaks(contract, what, edit):
    assert changed(contract, edit) == [], what


# ---------------------------------------------------------------------------------------------------
# the whole path, from node classes changed in memory


def subclass(cls, extra_required=None, extra_optional=None, return_names=None):
    def input_types(_):
        spec = copy.deepcopy(cls.INPUT_TYPES())
        spec.setdefault("required", {}).update(extra_required or {})
        spec.setdefault("optional", {}).update(extra_optional or {})
        return spec

    attrs = {"INPUT_TYPES": classmethod(input_types)}
    if return_names is not None:
        attrs["RETURN_NAMES"] = return_names
    return type(cls.__name__, (cls,), attrs)


def test_node_classes_changed_in_memory(pack, contract):
    mappings = dict(pack.NODE_CLASS_MAPPINGS)
    comic = mappings[COMIC]

    mappings[COMIC] = subclass(comic, extra_optional={"dpi": ("INT", {"default": 300})})
    mappings["StoryDiffusionNewNode"] = subclass(comic)
    current = node_contract.snapshot(mappings)
    assert node_contract.breaks(contract, current) == []
    assert node_contract.additions(contract, current) == [
        "StoryDiffusionNewNode: new node", f"{COMIC}: new optional input 'dpi'"]

    mappings[COMIC] = subclass(comic, extra_required={"dpi": ("INT", {"default": 300})})
    assert node_contract.breaks(contract, node_contract.snapshot(mappings)) == [
        f"{COMIC}: new input 'dpi' is required (a new input must be optional: saved workflows do not set it)"]

    del mappings[COMIC]
    mappings[STORY] = subclass(mappings[STORY], return_names=("positive", "negative", "captions", "story", "count"))
    assert node_contract.breaks(contract, node_contract.snapshot(mappings)) == [
        f"{COMIC}: the node is gone (saved workflows refer to it by this id)",
        f"{STORY}: output 4 (panel_count) changed its name from 'panel_count' to 'count'"]
