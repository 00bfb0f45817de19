"""The node contract: what saved workflows and other packs rely on, kept in tests/node_contract.json.

For every node id of the pack: its inputs in order (required, then optional; hidden inputs are not part of it) with
their types, and its outputs in order (type, name, whether it is a list). Saved workflows store node ids, widget
values by position and links by output slot, so a release may add nodes, optional inputs after the last input,
outputs after the last output and options to a choice, and nothing else: `breaks()` lists every other change.

A combo whose options are files in a model folder (a loader's file list) is recorded as "COMBO" with `"files": true`
and only the options it has with no file at all (e.g. "none"), never the files of this machine.

    python tests/node_contract.py           # check the current nodes against the contract (exit 1 on a break)
    python tests/node_contract.py --write   # rewrite the contract from the current nodes

Run both with the harness python (.harness/venv/bin/python). Write the contract when a release is made; a change
that `breaks()` refuses needs a new major version, said in the release notes, before the contract is rewritten.
tests/test_node_contract.py runs the check.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

CONTRACT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_contract.json")
FORMAT = 1
UPDATE_HINT = ("If the change is meant (a release that breaks saved workflows: a new major version, said in the "
               "release notes), rewrite the contract with `.harness/venv/bin/python tests/node_contract.py --write` "
               "and commit tests/node_contract.json.")
# what a model folder lists while the contract is taken: one file of every extension a loader may accept, so a combo
# that lists a folder shows it (the files do not exist; loaders that open files to filter keep unreadable ones)
PROBE_FILES = tuple(f"node-contract-probe{ext}" for ext in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"))


@contextlib.contextmanager
def model_folders_listing(files):
    """ComfyUI's folder_paths lists `files` in every model folder (and resolves none of them) inside the block."""
    import folder_paths

    saved = folder_paths.get_filename_list, folder_paths.get_full_path
    folder_paths.get_filename_list = lambda folder_name: list(files)
    folder_paths.get_full_path = lambda folder_name, filename: os.path.join(os.sep, "node-contract-probe",
                                                                            folder_name, filename)
    try:
        yield
    finally:
        folder_paths.get_filename_list, folder_paths.get_full_path = saved


def _combo_options(spec) -> list | None:
    """The options of a combo input spec (V1 list form, or "COMBO" with an options list), None for other types."""
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return list(kind)
    if kind == "COMBO":
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return list(options.get("options", []))
    return None


def _inputs(input_types: dict) -> list[tuple[str, tuple, bool]]:
    return [(name, spec, section == "required") for section in ("required", "optional")
            for name, spec in (input_types.get(section) or {}).items()]


def node_entry(cls) -> dict:
    """One node's contract entry, from its class (INPUT_TYPES is read with empty and with probe model folders)."""
    with model_folders_listing(()):
        bare = _inputs(cls.INPUT_TYPES())
    with model_folders_listing(PROBE_FILES):
        probed = {name: spec for name, spec, _ in _inputs(cls.INPUT_TYPES())}
    inputs = []
    for name, spec, required in bare:
        entry = {"name": name, "type": spec[0], "required": required}
        options = _combo_options(spec)
        if options is not None:
            entry["type"] = "COMBO"
            entry["options"] = [o for o in options if not isinstance(o, str) or o not in PROBE_FILES]
            if _combo_options(probed.get(name, spec)) != options:
                entry["files"] = True
        inputs.append(entry)
    types = tuple(cls.RETURN_TYPES)
    names = tuple(getattr(cls, "RETURN_NAMES", None) or types)
    lists = tuple(getattr(cls, "OUTPUT_IS_LIST", None) or (False,) * len(types))
    outputs = [{"name": n, "type": t, "list": bool(is_list)} for t, n, is_list in zip(types, names, lists)]
    return {"inputs": inputs, "outputs": outputs}


def snapshot(mappings: dict) -> dict:
    """{node id: entry} of NODE_CLASS_MAPPINGS-like `mappings`."""
    return {node_id: node_entry(cls) for node_id, cls in sorted(mappings.items())}


def breaks(contract: dict, current: dict) -> list[str]:
    """Every change from `contract` to `current` ({node id: entry}) that an older saved workflow or a pack built
    against the contract would trip over. Added nodes, optional inputs after the last input, outputs after the last
    output and new options are not breaks."""
    problems = []
    for node_id, old in contract.items():
        new = current.get(node_id)
        if new is None:
            problems.append(f"{node_id}: the node is gone (saved workflows refer to it by this id)")
            continue
        new_inputs = {entry["name"]: (i, entry) for i, entry in enumerate(new["inputs"])}
        for i, entry in enumerate(old["inputs"]):
            name = entry["name"]
            if name not in new_inputs:
                problems.append(f"{node_id}: input {name!r} is gone")
                continue
            j, now = new_inputs[name]
            if j != i:
                problems.append(f"{node_id}: input {name!r} moved from position {i} to {j} (saved workflows store "
                                "widget values by position)")
            if now["type"] != entry["type"]:
                problems.append(f"{node_id}: input {name!r} changed type from {entry['type']} to {now['type']}")
            if now["required"] and not entry["required"]:
                problems.append(f"{node_id}: input {name!r} became required (workflows that leave it unset fail)")
            lost = [o for o in entry.get("options", []) if o not in now.get("options", [])]
            if lost and now["type"] == entry["type"]:
                problems.append(f"{node_id}: input {name!r} lost the options {lost} (saved workflows store the "
                                "chosen value)")
        known = {entry["name"] for entry in old["inputs"]}
        for entry in new["inputs"]:
            if entry["name"] not in known and entry["required"]:
                problems.append(f"{node_id}: new input {entry['name']!r} is required (a new input must be optional: "
                                "saved workflows do not set it)")
        for i, entry in enumerate(old["outputs"]):
            if i >= len(new["outputs"]):
                problems.append(f"{node_id}: output {i} ({entry['name']}, {entry['type']}) is gone (links are stored "
                                "by output slot)")
                continue
            now = new["outputs"][i]
            for key, what in (("type", "type"), ("name", "name"), ("list", "list output flag")):
                if now[key] != entry[key]:
                    problems.append(f"{node_id}: output {i} ({entry['name']}) changed its {what} from {entry[key]!r} "
                                    f"to {now[key]!r}")
    return problems


def additions(contract: dict, current: dict) -> list[str]:
    """What `current` adds to the contract (allowed; written into the contract at the next release)."""
    found = [f"{node_id}: new node" for node_id in current if node_id not in contract]
    for node_id, old in contract.items():
        new = current.get(node_id)
        if new is None:
            continue
        known = {entry["name"] for entry in old["inputs"]}
        found += [f"{node_id}: new optional input {e['name']!r}" for e in new["inputs"]
                  if e["name"] not in known and not e["required"]]
        found += [f"{node_id}: new output {i} ({e['name']})" for i, e in enumerate(new["outputs"])
                  if i >= len(old["outputs"])]
    return found


def load(path: str = CONTRACT) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: contract format {data.get('format')!r}, this checker reads {FORMAT}")
    return data["nodes"]


def render(nodes: dict) -> str:
    """The contract file: one input or output per line, so a diff shows exactly what changed."""
    lines = ["{", f' "format": {FORMAT},',
             ' "about": "Node ids, inputs and outputs saved workflows rely on; see tests/node_contract.py.",',
             ' "nodes": {']
    for n, (node_id, entry) in enumerate(sorted(nodes.items())):
        lines.append(f"  {json.dumps(node_id)}: {{")
        for key in ("inputs", "outputs"):
            items = entry[key]
            lines.append(f'   "{key}": [' + ("" if items else "]" + ("," if key == "inputs" else "")))
            for i, item in enumerate(items):
                lines.append("    " + json.dumps(item, ensure_ascii=False) + ("," if i < len(items) - 1 else ""))
            if items:
                lines.append("   ]" + ("," if key == "inputs" else ""))
        lines.append("  }" + ("," if n < len(nodes) - 1 else ""))
    lines += [" }", "}", ""]
    return "\n".join(lines)


def current_nodes() -> dict:
    """The pack's nodes, imported the way the tests import them (harness ComfyUI on the CPU)."""
    import comfy_env

    comfy_env.import_comfy()
    return snapshot(comfy_env.import_pack().NODE_CLASS_MAPPINGS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {os.path.relpath(CONTRACT)} from the current nodes")
    args = parser.parse_args(argv)
    nodes = current_nodes()
    if args.write:
        with open(CONTRACT, "w", encoding="utf-8") as f:
            f.write(render(nodes))
        print(f"wrote {CONTRACT}: {len(nodes)} nodes")
        return 0
    contract = load()
    for line in additions(contract, nodes):
        print(f"added (allowed): {line}")
    problems = breaks(contract, nodes)
    for line in problems:
        print(f"BREAK: {line}")
    if problems:
        print(UPDATE_HINT)
        return 1
    print(f"the {len(nodes)} nodes keep the contract of {len(contract)} nodes")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
