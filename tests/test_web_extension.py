"""The pack's web extension (web/storydiffusion.js) in both node renderers of the installed frontend.

The extension hides the widgets a node ignores (a linked caption box, Consistent Self-Attention's custom_layers unless
layers is "custom list", PhotoMaker Fuse's prompt while a story is linked) and disables PhotoMaker Fuse's trigger_word
unless photos are linked. Every behaviour is checked on the classic canvas and under Nodes 2.0 (Vue-rendered nodes, the
frontend setting Comfy.VueNodes.Enabled: experimental since frontend 1.27, the default of new installs of newer ones),
each time after a workflow loads, after the user changes a combo or a link, and after switching to the other renderer
with the graph open (tests/browser/extension_probe.js, run in headless Chromium by tests/browser/ui_probe.mjs).

What the renderers read: the classic canvas `widget.hidden` / `widget.disabled`; Nodes 2.0 `widget.options.hidden` and
(up to 1.35) `widget.options.disabled`, re-read only when the node's widget list changes. On every ComfyUI version CI
runs (0.3.75: frontend 1.32.9; 0.8.0: 1.35.9; 0.29.0: 1.47.10) the frontend has the setting; a frontend without it
skips the Nodes 2.0 half with that reason.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

import comfy_env
import harness

REPO = comfy_env.REPO
CHROMIUM = harness.CHROMIUM
PROBE = os.path.join(REPO, "tests", "browser", "extension_probe.js")
ARTIFACTS = os.path.join(REPO, "test-artifacts", "workflows")
SETTING = "Comfy.VueNodes.Enabled"
WORKFLOWS = ("comic_sd15", "comic_sdxl_photomaker")

# (shown, editable) each state must have; editable None: not checked (a hidden widget cannot be edited anyway)
EXPECTED = {
    "captions_linked": (False, None),  # Comic Page: the captions come through the link
    "custom_layers_default": (False, None),  # layers = output blocks (official)
    "layers_shown": (True, True),  # a widget nothing hides: proves the state is read from what is drawn
    "custom_layers_custom": (True, True),  # layers = custom list
    "custom_layers_all": (False, None),  # layers = all blocks
    "captions_unlinked": (True, True),
    "fuse_text_story_linked": (False, None),  # the story's panels are the prompts
    "fuse_trigger_without_images": (True, False),
    "character_trigger": (True, True),  # PhotoMaker Character owns the trigger word: always editable
    "fuse_text_no_story": (True, True),
    "fuse_trigger_with_images": (True, True),
}
# after switching to the other renderer with the PhotoMaker graph open (story unlinked, photos linked), then
# unlinking the photos and linking the story again
EXPECTED_SWITCHED = {
    "fuse_text_no_story": (True, True),
    "fuse_trigger_with_images": (True, True),
    "fuse_trigger_unlinked": (True, False),
    "fuse_text_story_relinked": (False, None),
}
# Frontend 1.32 under Nodes 2.0 (experimental there, off by default): a node's Vue component copies the widgets'
# options when the node is created, and the first widget edit or link change of the node replaces that copy with a
# fixed one that nothing refreshes (1.35 re-reads them from the node's widget list). So a workflow shows the right
# widgets when it loads and when Nodes 2.0 is switched on, but a later change of an already edited node shows only
# after a reload: here, layers going back from "custom list" to "all blocks" and the caption box of a Comic Page whose
# links changed at load. Any other difference, or these two working, fails the test.
KNOWN_NODES2_STALE = {"1.32": {"custom_layers_all", "captions_unlinked"}}


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    """A `main.py --cpu` ComfyUI with the pack and an empty models folder (nothing is queued), its user folder
    prepared so the first page load opens no dialog."""
    root = tmp_path_factory.mktemp("web_extension_server")
    models = root / "models"
    for name in harness.MODEL_FOLDERS:
        (models / name).mkdir(parents=True)
    server = harness.ComfyServer(str(root / "server"), str(models))
    default = os.path.join(server.workdir, "user", "default")
    for folder in ("workflows", "subgraphs"):
        os.makedirs(os.path.join(default, folder), exist_ok=True)
    for name, text in {"comfy.settings.json": json.dumps({"Comfy.TutorialCompleted": True}), "user.css": "",
                       "comfy.templates.json": "[]"}.items():
        with open(os.path.join(default, name), "w") as f:
            f.write(text)
    server.start()
    yield server
    server.stop()


def run_extension_probe(server, nodes2: bool, tmp_path) -> dict:
    workflows = {}
    for name in WORKFLOWS:
        with open(os.path.join(REPO, "workflows", f"{name}.json")) as f:
            workflows[name] = json.load(f)
    probe = tmp_path / "probe.js"
    with open(PROBE) as f:
        probe.write_text(f"const WORKFLOWS = {json.dumps(workflows)};\nconst NODES2 = {json.dumps(nodes2)};\n"
                         + f.read())
    os.makedirs(ARTIFACTS, exist_ok=True)
    renderer = "nodes2" if nodes2 else "classic"
    cmd = ["node", os.path.join(REPO, "tests", "browser", "ui_probe.mjs"), "--url", server.url, "--probe", str(probe),
           "--chromium", CHROMIUM, "--screenshot", os.path.join(ARTIFACTS, f"extension_{renderer}.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, f"browser probe failed:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(ARTIFACTS, f"extension_{renderer}.report.json"), "w") as f:
        json.dump(report, f, indent=1)
    assert report["page_errors"] == [], report["page_errors"]
    return report["result"]


def mismatches(states: dict, expected: dict) -> dict:
    """{state: (what the page showed, what was expected)} for every state that differs."""
    wrong = {}
    for name, (shown, editable) in expected.items():
        got = states[name]
        if got["shown"] != shown or (editable is not None and got["editable"] != editable):
            wrong[name] = (got, {"shown": shown, "editable": editable})
    return wrong


@pytest.mark.parametrize("renderer", ["classic", "nodes2"])
def test_extension_hides_and_disables_ignored_widgets(browser, page_server, renderer, tmp_path):
    nodes2 = renderer == "nodes2"
    r = run_extension_probe(page_server, nodes2, tmp_path)
    frontend = r["frontend"] or "?"
    if nodes2 and not r["setting"]:
        pytest.skip(f"frontend {frontend} has no Nodes 2.0 setting ({SETTING}): only the classic canvas renders nodes")
    # the renderer asked for is the one that drew the nodes (Nodes 2.0: one DOM element per node; classic: none)
    assert r["rendered"]["vue_nodes"] == (r["rendered"]["graph_nodes"] if nodes2 else 0), r["rendered"]
    assert r["layers_value"] == "custom list", "picking the combo value did not reach the widget"
    assert r["csa_fits"], "Consistent Self-Attention did not grow to show custom_layers"
    known = KNOWN_NODES2_STALE.get(".".join(frontend.split(".")[:2]), set()) if nodes2 else set()
    wrong = mismatches(r, EXPECTED)
    assert set(wrong) == known, f"frontend {frontend}, {renderer}: {json.dumps(wrong, indent=1)}"
    if not r["setting"]:
        return  # no other renderer to switch to
    switched = r["switched"]
    assert switched["vue_nodes"] == (0 if nodes2 else switched["graph_nodes"]), switched
    wrong = mismatches(switched, EXPECTED_SWITCHED)
    assert wrong == {}, f"frontend {frontend}, switched from {renderer}: {json.dumps(wrong, indent=1)}"
