"""Other node packs next to this one, for interop tests: unmodified snapshots loaded in-process.

The ADE loader of tests/animatediff_fixtures.py, generalised to any snapshot in `../shared/thirdparty/`
(see its README: third-party code for tests only, never copied into this pack):

- `PACKS` names each snapshot (archive, the folder it unpacks to, one node id it registers). A snapshot is
  unpacked once into `.harness/thirdparty/<key>/<folder>` (atomic rename, safe against a parallel run).
- `load_in_process(comfy_nodes, pack)` imports it with ComfyUI's own custom-node loader
  (`nodes.load_custom_node`), as ComfyUI does at start-up, and returns the node ids it registered. A pack
  that fails to import raises with ComfyUI's own log lines about it.
- `pack_fixture(key)` makes a module-scoped pytest fixture: it skips with the reason when the snapshot is
  absent (a user's fresh clone), loads the pack, and removes its nodes from ComfyUI's mappings again after
  the module, so later test modules see the node set they saw before; module attributes the pack replaces at
  import (`hooks`, e.g. VideoHelperSuite's latent previewer) and folder_paths' model folders are put back
  too. A pack loaded once is not imported a second time: later modules get the same classes registered again.
- VideoHelperSuite registers HTTP routes on `server.PromptServer.instance` at import time; in-process there
  is no server, so `prompt_server_stub()` stands in while it imports (and stays while its nodes run: they
  read `.prompt_queue` and `.number`).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import types
from dataclasses import dataclass

import pytest

import comfy_env

REPO = comfy_env.REPO
SNAPSHOTS = os.path.join(os.path.dirname(REPO), "shared", "thirdparty")
INSTALL_ROOT = os.path.join(REPO, ".harness", "thirdparty")


@dataclass(frozen=True)
class ThirdPartyPack:
    key: str  # also the custom_nodes folder under .harness/thirdparty/
    archive: str  # file name in ../shared/thirdparty/
    folder: str  # top-level folder inside the archive
    marker_node: str  # a node id the pack registers (tells that it is loaded)
    title: str
    needs_prompt_server: bool = False  # registers routes on PromptServer.instance at import
    hooks: tuple = ()  # "module:attr" it replaces at import, restored after the tests that load it
    import_env: tuple = ()  # (name, value) environment variables set while it is imported in-process

    @property
    def snapshot(self) -> str:
        return os.path.join(SNAPSHOTS, self.archive)

    @property
    def custom_nodes(self) -> str:
        return os.path.join(INSTALL_ROOT, self.key)

    @property
    def path(self) -> str:
        return os.path.join(self.custom_nodes, self.folder)

    def submodule(self, name: str):
        """An imported module of the pack, e.g. "videohelpersuite.utils" (ComfyUI names it by its path)."""
        return sys.modules[f"{self.path.replace('.', '_x_')}.{name}"]


PACKS = {
    "ipadapter_plus": ThirdPartyPack("ipadapter_plus", "ComfyUI_IPAdapter_plus.tar.gz", "ComfyUI_IPAdapter_plus",
                                     "IPAdapterModelLoader", "ComfyUI_IPAdapter_plus"),
    "vhs": ThirdPartyPack("vhs", "ComfyUI-VideoHelperSuite.tar.gz", "ComfyUI-VideoHelperSuite",
                          "VHS_VideoCombine", "ComfyUI-VideoHelperSuite", needs_prompt_server=True,
                          hooks=("latent_preview:get_previewer",)),
    "ade": ThirdPartyPack("ade", "ComfyUI-AnimateDiff-Evolved.tar.gz", "ComfyUI-AnimateDiff-Evolved",
                          "ADE_UseEvolvedSampling", "AnimateDiff-Evolved"),
    # registers routes at import; in-process it is imported as a worker (COMFYUI_IS_WORKER: no worker auto-launch,
    # no signal or exit handlers), see `pack_fixture`. Servers get a private copy (tests/distributed_fixtures.py).
    "distributed": ThirdPartyPack("distributed", "ComfyUI-Distributed.tar.gz", "ComfyUI-Distributed",
                                  "DistributedCollector", "ComfyUI-Distributed", needs_prompt_server=True,
                                  import_env=(("COMFYUI_IS_WORKER", "1"),)),
}


def _pack(pack) -> ThirdPartyPack:
    return PACKS[pack] if isinstance(pack, str) else pack


def snapshot_missing_reason(pack) -> str | None:
    pack = _pack(pack)
    if os.path.isfile(os.path.join(pack.path, "__init__.py")) or os.path.isfile(pack.snapshot):
        return None
    return (f"{pack.title} snapshot not found at {pack.snapshot} (third-party code for interop tests only; "
            f"see ../shared/thirdparty/README.md)")


def install(pack) -> str:
    """Unpack the snapshot once into .harness/thirdparty/<key>/ (atomic rename); returns the pack's folder."""
    pack = _pack(pack)
    if os.path.isfile(os.path.join(pack.path, "__init__.py")):
        return pack.path
    reason = snapshot_missing_reason(pack)
    if reason:
        raise FileNotFoundError(reason)
    os.makedirs(pack.custom_nodes, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=pack.custom_nodes)
    try:
        with tarfile.open(pack.snapshot) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(os.path.join(tmp, pack.folder), pack.path)
        except OSError:
            if not os.path.isfile(os.path.join(pack.path, "__init__.py")):  # lost a race: fine if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pack.path


def server_args(pack, workdir: str) -> tuple:
    """Extra `main.py` arguments that load the pack into that server only (a `custom_nodes:` search path)."""
    pack = _pack(pack)
    install(pack)
    path = os.path.join(workdir, f"{pack.key}_custom_nodes.yaml")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{pack.key}:\n    custom_nodes: {pack.custom_nodes}/\n")
    return ("--extra-model-paths-config", path)


class _Routes:
    """Accepts route registrations (decorators) and keeps them."""

    def __init__(self):
        self.routes = []

    def __getattr__(self, method):
        def register(path, **kw):
            def decorator(handler):
                self.routes.append((method, path, handler))
                return handler
            return decorator
        return register


def prompt_server_stub():
    """What packs touch on PromptServer.instance at import and run time, without a server."""
    return types.SimpleNamespace(routes=_Routes(), prompt_queue=types.SimpleNamespace(currently_running={}),
                                 number=0, client_id=None, last_node_id=None, last_prompt_id=None,
                                 send_sync=lambda *a, **k: None, send_progress_text=lambda *a, **k: None,
                                 supports=set(), app=None)


@contextlib.contextmanager
def installed_prompt_server():
    """PromptServer.instance = a stub while the block runs (left alone when a real one exists)."""
    import server

    had = hasattr(server.PromptServer, "instance")
    if not had:
        server.PromptServer.instance = prompt_server_stub()
    try:
        yield server.PromptServer.instance
    finally:
        if not had:
            del server.PromptServer.instance


_LOADED: dict = {}  # key -> ({node id: class}, {node id: display name}) of a pack imported in this process


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


def load_in_process(comfy_nodes, pack) -> dict:
    """Import the pack with ComfyUI's own custom-node loader; returns {node id: class} of its nodes (registered)."""
    pack = _pack(pack)
    if pack.key in _LOADED:
        classes, names = _LOADED[pack.key]
        comfy_nodes.NODE_CLASS_MAPPINGS.update(classes)
        comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.update(names)
        return dict(classes)
    path = install(pack)
    before, before_names = set(comfy_nodes.NODE_CLASS_MAPPINGS), set(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    saved_env = {name: os.environ.get(name) for name, _ in pack.import_env}
    os.environ.update(dict(pack.import_env))
    try:
        ok = asyncio.run(comfy_nodes.load_custom_node(path, module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(collect)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if not ok or pack.marker_node not in comfy_nodes.NODE_CLASS_MAPPINGS:
        log = "\n".join(collect.lines[-40:])
        raise RuntimeError(f"ComfyUI could not import {pack.title} from {path}:\n{log}")
    classes = {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if k not in before}
    names = {k: v for k, v in comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.items() if k not in before_names}
    _LOADED[pack.key] = (classes, names)
    return dict(classes)


@contextlib.contextmanager
def registry_restored(comfy_nodes):
    """Whatever is added to ComfyUI's node mappings inside the block is removed after it."""
    saved = [(m, set(m)) for m in (comfy_nodes.NODE_CLASS_MAPPINGS, comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)]
    try:
        yield
    finally:
        for mapping, keys in saved:
            for key in set(mapping) - keys:
                del mapping[key]


@contextlib.contextmanager
def process_state_restored(pack):
    """Module attributes the pack replaces at import (pack.hooks, "module:attr") and folder_paths' model folders
    are put back after the block."""
    import folder_paths

    pack = _pack(pack)
    hooks = []
    for spec in pack.hooks:
        module_name, attr = spec.split(":")
        module = importlib.import_module(module_name)
        hooks.append((module, attr, getattr(module, attr)))
    folders = dict(folder_paths.folder_names_and_paths)
    try:
        yield
    finally:
        for module, attr, value in hooks:
            setattr(module, attr, value)
        for key in set(folder_paths.folder_names_and_paths) - set(folders):
            del folder_paths.folder_names_and_paths[key]
        folder_paths.folder_names_and_paths.update(folders)


def pack_fixture(key: str):
    """A module-scoped fixture named `key` loading PACKS[key] in-process; yields a namespace
    (nodes: {node id: class}, path, pack, submodule(name), prompt_server: the stub or None)."""
    pack = PACKS[key]

    def fixture(comfy_nodes):
        reason = snapshot_missing_reason(pack)
        if reason:
            pytest.skip(reason)
        with contextlib.ExitStack() as stack:
            stack.enter_context(registry_restored(comfy_nodes))
            stack.enter_context(process_state_restored(pack))
            prompt_server = stack.enter_context(installed_prompt_server()) if pack.needs_prompt_server else None
            loaded = load_in_process(comfy_nodes, pack)
            yield types.SimpleNamespace(nodes=loaded, path=pack.path, pack=pack, submodule=pack.submodule,
                                        prompt_server=prompt_server)

    return pytest.fixture(scope="module", name=key)(fixture)


# pytest fixtures (tests/conftest.py registers this module as a plugin: a test asks for them by name)
ipadapter_plus = pack_fixture("ipadapter_plus")
vhs = pack_fixture("vhs")
distributed = pack_fixture("distributed")


if __name__ == "__main__":  # `python tests/thirdparty_fixtures.py`: unpack every snapshot that is present
    for p in PACKS.values():
        print(snapshot_missing_reason(p) or install(p))
