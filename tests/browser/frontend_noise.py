"""Console errors the ComfyUI frontend logs by itself, per frontend version: what the browser tests may ignore.

The browser tests (tests/test_workflows.py) fail on any console error of the page, except the ones recorded in
frontend_noise.json for the installed comfyui-frontend-package version: the errors an *empty* page logs on a server
that loads no custom node at all (`--disable-all-custom-nodes`), with the same prepared user folder as the tests.
So nothing this pack (or its web extension) makes the page log can ever be on the list.

    .harness/venv/bin/python tests/browser/frontend_noise.py            # print what an empty page logs here
    .harness/venv/bin/python tests/browser/frontend_noise.py --record   # store it for this frontend version

(with $COMFYUI_PATH and that ComfyUI's venv for another version, e.g. .harness/venv-0.29.0). The test
test_frontend_noise_is_what_an_empty_page_logs checks the stored list against a fresh empty page.
Messages are compared exactly, with the server's origin (its random port) cut out of the text and the url.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
KNOWN_FILE = os.path.join(HERE, "frontend_noise.json")
PROBE = os.path.join(HERE, "ui_probe.mjs")
OFFLINE = "Failed to load resource: net::ERR_INTERNET_DISCONNECTED"  # the tests block every other host
SETTLE_MS = 3000  # how long the empty page may keep logging after the app is up


def frontend_version() -> str:
    """The comfyui-frontend-package this Python (the server's venv) serves."""
    from importlib.metadata import version

    return version("comfyui-frontend-package")


def normalize(error: dict, origin: str) -> dict:
    """{text, url} of a console error, the server's origin cut out (the port differs from run to run)."""
    return {"text": error["text"].replace(origin, ""), "url": (error.get("url") or "").replace(origin, "")}


def is_offline_block(error: dict, blocked: list) -> bool:
    """A request to another host, aborted on purpose by the drivers (tests run offline)."""
    return error.get("url") in set(blocked) and error["text"] == OFFLINE


def load_known() -> dict:
    with open(KNOWN_FILE) as f:
        return json.load(f)


def known(version: str | None = None) -> list[dict] | None:
    """The recorded errors of an empty page for this frontend version; None when none are recorded."""
    return load_known().get(version or frontend_version())


def prepare_user_dir(user_dir: str) -> None:
    """What a used ComfyUI install already has, so the first page load opens no dialogs and 404s.

    - settings: the tutorial is done (else the templates browser opens over the canvas);
    - user.css, workflows/, subgraphs/, comfy.templates.json: the frontend reads them at start-up
      and logs a 404 console error for each one that does not exist.
    """
    default = os.path.join(user_dir, "default")
    for folder in ("workflows", "subgraphs"):
        os.makedirs(os.path.join(default, folder), exist_ok=True)
    files = {"comfy.settings.json": json.dumps({"Comfy.TutorialCompleted": True}),
             "user.css": "", "comfy.templates.json": "[]"}
    for name, text in files.items():
        with open(os.path.join(default, name), "w") as f:
            f.write(text)


def empty_page_errors(workdir: str, chromium: str) -> list[dict]:
    """Start a ComfyUI without any custom node (no pack, no web extension), open its page with no workflow, and
    return the console errors it logged (normalized, offline blocks left out)."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import harness

    models = os.path.join(workdir, "models")
    for name in harness.MODEL_FOLDERS:
        os.makedirs(os.path.join(models, name), exist_ok=True)
    server = harness.ComfyServer(os.path.join(workdir, "server"), models, extra_args=("--disable-all-custom-nodes",))
    prepare_user_dir(os.path.join(server.workdir, "user"))
    probe = os.path.join(workdir, "empty_page_probe.js")
    with open(probe, "w") as f:
        f.write(f"await new Promise((r) => setTimeout(r, {SETTLE_MS})); return null;")
    server.start()
    try:
        done = subprocess.run(["node", PROBE, "--url", server.url, "--probe", probe, "--chromium", chromium],
                              capture_output=True, text=True, timeout=300, cwd=TESTS, check=False)
    finally:
        server.stop()
    if done.returncode != 0:
        raise RuntimeError(f"browser probe failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return [normalize(e, server.url) for e in report["console_errors"]
            if not is_offline_block(e, report["blocked_requests"])]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help=f"store the list for this frontend in {KNOWN_FILE}")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
    args = parser.parse_args(argv)
    version = frontend_version()
    with tempfile.TemporaryDirectory() as tmp:
        errors = empty_page_errors(tmp, args.chromium)
    print(json.dumps({version: errors}, indent=1))
    if args.record:
        data = load_known()
        data[version] = errors
        with open(KNOWN_FILE, "w") as f:
            f.write(json.dumps(dict(sorted(data.items())), indent=1, ensure_ascii=False) + "\n")
        print(f"recorded {len(errors)} console errors of frontend {version} in {KNOWN_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
