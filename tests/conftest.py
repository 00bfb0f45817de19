"""Shared fixtures: an in-process ComfyUI (CPU) with this pack registered, a real server, tiny models.

ComfyUI comes from scripts/setup.sh (.harness/ComfyUI) or $COMFYUI_PATH; run tests through
`bash scripts/test.sh` so the harness exists.
"""
from __future__ import annotations

import asyncio
import os

import pytest

import comfy_env

comfy_env.import_comfy()

import harness
import tiny_models

# fixtures some test modules ask for by name: AnimateDiff-Evolved (ade, ...), IPAdapter_plus and VHS snapshots
pytest_plugins = ["animatediff_fixtures", "thirdparty_fixtures"]


@pytest.fixture(scope="session")
def browser():
    """Chromium's path for the browser tests; skips (with what to install) when Chromium or playwright-core is missing."""
    reason = harness.browser_missing()
    if reason:
        pytest.skip(reason)
    return harness.CHROMIUM


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A temporary models folder registered with folder_paths (and used by the server fixture)."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    for name in harness.MODEL_FOLDERS:
        (root / name).mkdir()
        folder_paths.add_model_folder_path(name, str(root / name), is_default=True)
    return root


@pytest.fixture(scope="session")
def output_dir(tmp_path_factory):
    import folder_paths

    out = tmp_path_factory.mktemp("output")
    folder_paths.set_output_directory(str(out))
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))
    folder_paths.set_input_directory(str(tmp_path_factory.mktemp("input")))
    return out


@pytest.fixture(scope="session")
def pack():
    """This repository imported as a package (comfyui_storydiffusion)."""
    return comfy_env.import_pack()


@pytest.fixture(scope="session")
def comfy_nodes(pack, models_dir, output_dir):
    """ComfyUI's `nodes` module with the built-in extra nodes and this pack's nodes registered."""
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    nodes.NODE_CLASS_MAPPINGS.update(pack.NODE_CLASS_MAPPINGS)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(pack.NODE_DISPLAY_NAME_MAPPINGS)
    return nodes


@pytest.fixture(scope="session")
def comfy(comfy_nodes):
    """In-process prompt runner: `comfy.run(api_prompt) -> outputs`."""
    return harness.InProcessComfy()


@pytest.fixture(scope="session")
def checkpoint_files(models_dir):
    """Tiny checkpoints in models/checkpoints that CheckpointLoaderSimple detects; name -> path.

    Linked lazily from the per-machine cache: `checkpoint_files("sd15")` returns the file name for family sd15
    or sdxl.
    """
    made = {}

    def get(family: str) -> str:
        if family not in made:
            name = f"tiny_{family}.safetensors"
            os.symlink(tiny_models.cached_checkpoint(family), models_dir / "checkpoints" / name)
            made[family] = name
        return made[family]

    return get


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir):
    """A real `main.py --cpu` ComfyUI with this pack loaded from custom_nodes/."""
    srv = harness.ComfyServer(str(tmp_path_factory.mktemp("server")), str(models_dir))
    srv.start()
    yield srv
    srv.stop()
    artifacts = os.path.join(comfy_env.REPO, "test-artifacts")
    os.makedirs(artifacts, exist_ok=True)
    with open(os.path.join(artifacts, "server.log"), "w") as f:
        f.write(srv.read_log())


@pytest.fixture(scope="session")
def csa(pack, comfy_nodes):
    """attention/comfy (the CSA glue) of the pack, imported once ComfyUI's nodes are loaded."""
    import comfyui_storydiffusion.attention.comfy as csa_glue

    return csa_glue
