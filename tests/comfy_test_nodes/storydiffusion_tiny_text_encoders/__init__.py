"""Test-only ComfyUI custom node (loaded by the workflow test server, tests/dit_workflow_fixtures.server_args; never
shipped): installs tests/tiny_text_encoders.install_loader_hook() in the server process.

ComfyUI builds CLIP-L, T5-XXL and Qwen3-4B from fixed configs whatever the file's shapes; the hook makes
comfy.sd.load_clip (so CLIPLoader / DualCLIPLoader / TripleCLIPLoader) pass a tiny file's own config (stored in its
safetensors metadata) to ComfyUI's model-config override. Any other file loads exactly as before.
"""
import importlib.util
import os

_TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("storydiffusion_tiny_text_encoders_impl",
                                               os.path.join(_TESTS, "tiny_text_encoders.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.install_loader_hook()  # idempotent, so loading this folder twice is harmless

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
