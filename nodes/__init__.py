"""Node registry: every module in this package that defines NODE_CLASS_MAPPINGS contributes its nodes.

Node ids are a public contract (saved workflows store them): they all start with `StoryDiffusion`
and are never renamed.
"""
from __future__ import annotations

import importlib
import pkgutil

NODE_ID_PREFIX = "StoryDiffusion"

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _node_id, _cls in getattr(_module, "NODE_CLASS_MAPPINGS", {}).items():
        if not _node_id.startswith(NODE_ID_PREFIX):
            raise RuntimeError(f"node id {_node_id!r} in {_info.name} must start with {NODE_ID_PREFIX!r}")
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node id {_node_id!r} is defined twice (second time in {_info.name})")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
