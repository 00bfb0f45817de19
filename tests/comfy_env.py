"""Locate the harness ComfyUI and make it importable in-process (CPU, no argv parsing).

Used by conftest.py, the benchmarks and scripts. Never imported by the pack itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_MODULE = "comfyui_storydiffusion"


def comfy_path() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".harness", "ComfyUI")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"No ComfyUI at {path}: run `bash scripts/setup.sh` (or set COMFYUI_PATH).")
    return path


def import_comfy():
    """Put ComfyUI on sys.path and force CPU before comfy.model_management is imported."""
    path = comfy_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    # ComfyUI's nodes.py puts ComfyUI/comfy first on sys.path, where comfy/utils.py would then shadow
    # the top-level `utils` package; main.py imports that package first, so do the same (and so must isort).
    import utils.install_util  # noqa: F401  (imported for its side effect on sys.modules)

    # isort: split
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_all_custom_nodes = True  # in-process tests register the pack themselves
    import comfy.model_management  # imported now: it decides the device from args
    return path


def import_pack():
    """Import this repository as a package under one fixed name (ComfyUI itself uses the folder path)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def cached_file(folder: str, name: str, write) -> str:
    """`write(path)` once per machine into .harness/cache/<folder>/<name> and return that path (bump the name
    when the writer changes). Written under a temporary name, then renamed: never a half-written cache file."""
    import tempfile

    cache = os.path.join(REPO, ".harness", "cache", folder)
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, name)
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(name)[1], dir=cache)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path
