"""Every node of the pack explains itself in the UI: /object_info of a real server shows a description,
a category under the pack's name and a tooltip on every input (what the frontend displays on hover)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def pack_nodes(server, pack):
    info = server.get("/object_info")
    assert pack.NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    missing = sorted(set(pack.NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"registered in the pack but not served by ComfyUI: {missing}"
    return {node_id: info[node_id] for node_id in pack.NODE_CLASS_MAPPINGS}


def test_every_node_has_a_description_and_a_pack_category(pack_nodes):
    problems = [f"{node_id}: empty description" for node_id, d in pack_nodes.items() if not d["description"].strip()]
    problems += [f"{node_id}: category {d['category']!r} is not under StoryDiffusion"
                 for node_id, d in pack_nodes.items()
                 if not (d["category"] == "StoryDiffusion" or d["category"].startswith("StoryDiffusion/"))]
    assert not problems, "\n".join(problems)


def test_every_input_has_a_tooltip(pack_nodes):
    missing = []
    for node_id, d in pack_nodes.items():
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{node_id}.{name}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_display_names_are_set(pack_nodes):
    unnamed = [node_id for node_id, d in pack_nodes.items() if not d["display_name"] or d["display_name"] == node_id]
    assert not unnamed, f"nodes without a display name: {unnamed}"
