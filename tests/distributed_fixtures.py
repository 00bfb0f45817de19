"""The distributed comic as an API prompt, and ComfyUI-Distributed (the unmodified snapshot) on localhost servers.

`comic_prompt` is the graph of workflows/story_distributed.json in API form, small: every participant writes the
identity bank itself (identity panels, same seed), then samples its share of the other panels reading it; the
Distributed Collector gathers the shares on the master, Panels In Story Order joins them with the identity panels.
`distributed=False` leaves ComfyUI-Distributed's nodes out and sets `participant` by hand (in-process tests).

`cluster_config` is the file ComfyUI-Distributed reads the workers from: `gpu_config.json` in its own folder (so
every server here gets its own copy of the pack, see `install_copy`).
"""
from __future__ import annotations

import json
import os
import shutil

import thirdparty_fixtures

PACK = thirdparty_fixtures.PACKS["distributed"]
CONFIG_FILE = "gpu_config.json"  # ComfyUI-Distributed's utils/config.py: CONFIG_FILE next to the pack's __init__.py

CHARACTERS = "[Mia] a girl with red hair\n[Leo] an old man with a beard"
# identity panels (1 per character): 0 (Mia) and 1 (Leo); the other panels 2-8 are read, split among participants
PANELS = ("[Mia] at a bus stop # Monday.\n[Leo] reads a paper\n[NC] rain on the street\n[Mia] runs for the bus\n"
          "[Leo] waves\n[Mia] and [Leo] on the bus\n[Mia] smiles\n[Leo] walks his dog\n[NC] the sun # The end.")
STORY_PANELS = 9
IDENTITY_ROWS = (0, 1)
SIZE, STEPS = 64, 2


def csa_defaults(comfy_nodes) -> dict:
    """Every required widget of Consistent Self-Attention at its default (the API prompt must name them all)."""
    spec = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionConsistentSelfAttention"].INPUT_TYPES()["required"]
    return {name: opts[1]["default"] for name, opts in spec.items() if len(opts) > 1 and "default" in opts[1]}


def comic_prompt(ckpt: str, csa_widgets: dict, participants: int = 1, *, distributed: bool = True,
                 participant: int = 0, prefix: str = "distributed") -> dict:
    """API prompt of the distributed comic (see the module docstring); node "17" saves the panels in story order,
    "18" the read run's latents of this machine's share (in-process tests compare them exactly)."""
    select = {"positive": ["2", 0], "negative": ["2", 1], "story": ["2", 3], "first_panel": 0, "count": 0}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "StoryDiffusionStory", "inputs": {
            "clip": ["1", 1], "characters": CHARACTERS, "panels": PANELS, "style": "(No style)", "negative": "",
            "identity_panels": 1}},
        "3": {"class_type": "StoryDiffusionConsistentSelfAttention",
              "inputs": dict(csa_widgets, model=["1", 0], story=["2", 3], seed=7)},
        # identity run: every participant samples the identity panels and writes the bank itself
        "4": {"class_type": "StoryDiffusionSelectPanels", "inputs": dict(select, select="identity panels")},
        "5": {"class_type": "StoryDiffusionIdentityBankWrite", "inputs": {"model": ["3", 0], "storage": "cpu",
                                                                          "dtype": "fp16"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": ["4", 2]}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["6", 0], "seed": 42,
            "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        # story run: this participant's share of the other panels, noise by story index
        "10": {"class_type": "StoryDiffusionSelectPanels", "inputs": dict(
            select, select="panels that are not identity panels", participants=participants,
            participant=["9", 0] if distributed else participant, latent=["11", 0])},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "12": {"class_type": "StoryDiffusionIdentityBankRead", "inputs": {
            "model": ["3", 0], "bank": ["5", 1], "first_panel": 0, "after": ["7", 0], "panels": ["10", 4]}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "positive": ["10", 0], "negative": ["10", 1], "latent_image": ["10", 5], "seed": 43,
            "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "16": {"class_type": "StoryDiffusionStoryOrder", "inputs": {
            "images_a": ["15", 0] if distributed else ["14", 0], "panels_a": ["10", 4],
            "images_b": ["8", 0], "panels_b": ["4", 4], "allow_gaps": False}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": f"{prefix}_panels"}},
    }
    if distributed:
        prompt["9"] = {"class_type": "DistributedSeed", "inputs": {"seed": 0}}
        prompt["15"] = {"class_type": "DistributedCollector", "inputs": {"images": ["14", 0], "load_balance": False}}
    else:
        if participants > 1:  # one participant's prompt alone: its share is not the whole story run
            del prompt["16"], prompt["17"]
            prompt["19"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 0],
                                                                  "filename_prefix": f"{prefix}_share"}}
        prompt["18"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0],
                                                               "filename_prefix": f"latents/{prefix}"}}
    return prompt


def install_copy(custom_nodes: str) -> str:
    """A private copy of the pack in `custom_nodes` (its config file lives in its folder); returns its path."""
    source = thirdparty_fixtures.install(PACK)
    target = os.path.join(custom_nodes, PACK.folder)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(CONFIG_FILE, "__pycache__", "tests"))
    return target


def write_config(pack_path: str, workers: list[tuple[str, int]], timeout_s: int = 120) -> None:
    """gpu_config.json of the master: the workers (id, port) on localhost, enabled; no auto-launch."""
    config = {
        "master": {"host": "127.0.0.1"},
        "workers": [{"id": wid, "name": wid, "host": "127.0.0.1", "port": port, "type": "local", "enabled": True}
                    for wid, port in workers],
        "settings": {"auto_launch_workers": False, "stop_workers_on_master_exit": False,
                     "worker_timeout_seconds": timeout_s},
    }
    with open(os.path.join(pack_path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def ui_server_args(workdir: str) -> tuple:
    """main.py arguments loading a private copy of the pack into one server, or () without the snapshot."""
    if thirdparty_fixtures.snapshot_missing_reason(PACK):
        return ()
    return server_args(workdir, install_copy(os.path.join(workdir, "custom_nodes")))


def server_args(workdir: str, pack_path: str) -> tuple:
    """main.py arguments loading the copy at pack_path (a `custom_nodes:` search path of its own)."""
    path = os.path.join(workdir, "distributed_custom_nodes.yaml")
    with open(path, "w") as f:
        f.write(f"distributed:\n    custom_nodes: {os.path.dirname(pack_path)}/\n")
    return ("--extra-model-paths-config", path)


def api_prompt(workflow: dict, object_info: dict, settings: dict | None = None) -> dict:
    """A UI-format workflow as the API prompt the frontend queues: each node's widget values by name (positional
    widgets_values read the frontend's way, tests/workflow_sizes.widget_values), links as [source id, slot], notes
    left out; `settings` {node id: {widget: value}} replace widget values (what the browser tests --set)."""
    import workflow_sizes

    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in workflow_sizes.FRONTEND_ONLY:
            continue
        inputs = dict(workflow_sizes.widget_values(node, object_info[node["type"]]))
        inputs.update((settings or {}).get(str(node["id"]), {}))
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
