"""StoryDiffusion for ComfyUI: consistent characters across comic panels and long videos.

ComfyUI imports this file at start-up. It only registers node classes; the node modules import
their heavy dependencies (transformers, PyAV, OpenCV) lazily, when a node first runs.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # frontend extension: hides/disables ignored widgets, template card descriptions

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
