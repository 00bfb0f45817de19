"""Build the shared workflows (workflows/*.json, ComfyUI UI format 0.4) from the specs in workflow_specs.py.

    python scripts/make_workflows.py                  # start a ComfyUI with the pack, rewrite workflows/
    python scripts/make_workflows.py --check          # exit 1 if a file differs from what it would write
    python scripts/make_workflows.py --object-info f.json   # use a saved /object_info instead
    python scripts/make_workflows.py --thumbnails test-artifacts/workflows   # screenshots -> <name>.jpg

`--check` (used by tests/test_workflows.py) fails when a shipped file is stale.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workflow_specs as specs  # noqa: E402,F401  (tests read its constants)
import workflow_builder as builder  # noqa: E402,F401  (tests read its errors)
from workflow_builder import WorkflowBuilder, render  # noqa: E402
from workflow_specs import WORKFLOWS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(REPO, "workflows")


def make_builder(name: str, object_info: dict) -> WorkflowBuilder:
    """The filled builder: `.build()` is the workflow, `.models` the model files it references."""
    filled = WorkflowBuilder(object_info, name)
    WORKFLOWS[name].build(filled)
    return filled


def build_workflow(name: str, object_info: dict) -> dict:
    return make_builder(name, object_info).build()


def live_object_info() -> dict:
    """Start the harness ComfyUI (with this pack) on an empty models folder and read /object_info."""
    import tempfile

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import harness

    with tempfile.TemporaryDirectory() as tmp:
        models = os.path.join(tmp, "models")
        for name in harness.MODEL_FOLDERS:
            os.makedirs(os.path.join(models, name))
        server = harness.ComfyServer(os.path.join(tmp, "server"), models)
        server.start()
        try:
            return server.get("/object_info")
        finally:
            server.stop()


def write_thumbnails(screenshot_dir: str) -> list[str]:
    """workflows/<name>.jpg (the frontend's template thumbnail name) from <screenshot_dir>/<name>.png."""
    from PIL import Image

    written = []
    for name, spec in WORKFLOWS.items():
        src = os.path.join(screenshot_dir, f"{name}.png")
        if spec.shipped and os.path.exists(src):
            image = Image.open(src).convert("RGB")
            image.thumbnail((768, 480))
            dest = os.path.join(WORKFLOWS_DIR, f"{name}.jpg")
            image.save(dest, quality=85)
            written.append(dest)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--object-info", help="a saved /object_info JSON (default: start ComfyUI and ask it)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    parser.add_argument("--thumbnails", metavar="DIR", help="make <name>.jpg from DIR/<name>.png screenshots")
    args = parser.parse_args(argv)
    if args.thumbnails:
        for path in write_thumbnails(args.thumbnails):
            print("wrote", os.path.relpath(path, REPO))
        return 0
    if args.object_info:
        with open(args.object_info) as f:
            info = json.load(f)
    else:
        info = live_object_info()
    stale = []
    os.makedirs(WORKFLOWS_DIR, exist_ok=True)
    for name, spec in WORKFLOWS.items():
        if not spec.shipped:
            continue
        text = render(build_workflow(name, info))
        path = os.path.join(WORKFLOWS_DIR, f"{name}.json")
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        if args.check:
            stale.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
            print("wrote", os.path.relpath(path, REPO))
    if stale:
        print(f"stale workflows (rerun `python scripts/make_workflows.py`): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
