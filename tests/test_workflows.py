"""The shared workflows open in the real ComfyUI frontend (headless Chromium) and run end to end.

For every workflow the test starts nothing new: one ComfyUI server for the module, on a temporary
models folder holding tiny random files with exactly the names the workflows reference. The Node
driver (tests/browser/run_workflow.mjs) loads the UI JSON with `app.loadGraphData`, screenshots it
into test-artifacts/workflows/, and queues it with `app.queuePrompt` (the frontend's own
graph-to-prompt conversion); the test then waits for the prompt and checks the files it wrote.

Browser set-up: `bash scripts/setup_browser.sh` (Debian chromium + playwright-core in .harness/node).

The server also loads AnimateDiff-Evolved (the unmodified snapshot in ../shared/thirdparty, see
tests/animatediff_fixtures.py) when the snapshot is there: story_to_video_animatediff needs its nodes. Without
the snapshot every test that builds, loads or runs that workflow skips with the reason; the tests that only read
the shipped files (templates, thumbnails' presence, JSON layout) still count it, since its file ships either way.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import animatediff_fixtures
import comfy_env
import distributed_fixtures
import dit_workflow_fixtures
import harness
import tiny_models
import wan_fixtures
import workflow_fixtures
import workflow_sizes

REPO = comfy_env.REPO
DRIVER = os.path.join(REPO, "tests", "browser", "run_workflow.mjs")
CHROMIUM = harness.CHROMIUM
ARTIFACTS = os.path.join(REPO, "test-artifacts", "workflows")
PACK_FOLDER = "comfyui-storydiffusion"  # the name scripts/setup.sh links into custom_nodes/


def _load_script(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


# console errors the installed frontend logs on an empty page without any custom node (tests/browser/frontend_noise.py)
frontend_noise = _load_script("frontend_noise", os.path.join(REPO, "tests", "browser", "frontend_noise.py"))
make_workflows = _load_script("make_workflows", os.path.join(REPO, "scripts", "make_workflows.py"))
SHIPPED = sorted(name for name, wf in make_workflows.WORKFLOWS.items() if wf.shipped)


def skip_unless_buildable(name: str, object_info: dict) -> None:
    """Skip (with make_workflows' reason, e.g. the ADE snapshot is missing) when the server lacks a node the
    workflow needs from another pack (`Workflow.requires`)."""
    reason = make_workflows.missing_requirements(name, object_info)
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------
# fixtures


# On CPU ComfyUI keeps text encoders in fp16, which CPU matmuls run ~3x slower than fp32; the tiny
# checkpoints keep the *full-size* CLIP-L/CLIP-G text encoders, so encoding would dominate the run.
FAST_CPU_ARGS = ("--fp32-text-enc",)


def ade_server_args(root, models) -> tuple:
    """main.py arguments that load AnimateDiff-Evolved into this server only, with the test models folder's
    animatediff_models next to the others; () when the snapshot is missing."""
    if animatediff_fixtures.snapshot_missing_reason():
        return ()
    (models / animatediff_fixtures.MOTION_FOLDER).mkdir(parents=True, exist_ok=True)
    motion_paths = root / "ade_model_paths.yaml"
    motion_paths.write_text(f"animatediff_tests:\n    base_path: {models}\n"
                            f"    {animatediff_fixtures.MOTION_FOLDER}: {animatediff_fixtures.MOTION_FOLDER}/\n")
    return (*animatediff_fixtures.server_args(str(root / "ade")), "--extra-model-paths-config", str(motion_paths))


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """A `main.py --cpu` ComfyUI with the pack (and ADE when its snapshot is there), its own models folder and a
    prepared user folder."""
    root = tmp_path_factory.mktemp("workflow_server")
    models = root / "models"
    for name in harness.MODEL_FOLDERS:
        (models / name).mkdir(parents=True)
    server = harness.ComfyServer(str(root / "server"), str(models),
                                 extra_args=FAST_CPU_ARGS + ade_server_args(root, models)
                                 + wan_fixtures.server_args(str(root / "wan"))
                                 + dit_workflow_fixtures.server_args(str(root / "dit_nodes"))
                                 + distributed_fixtures.ui_server_args(str(root / "distributed")))
    frontend_noise.prepare_user_dir(os.path.join(server.workdir, "user"))
    server.start()
    yield server
    server.stop()
    os.makedirs(ARTIFACTS, exist_ok=True)
    shutil.copy(server.log_path, os.path.join(ARTIFACTS, "server.log"))


@pytest.fixture(scope="module")
def object_info(ui_server):
    return ui_server.get("/object_info")


@pytest.fixture(scope="module")
def comfyui_version(ui_server):
    return ui_server.get("/system_stats")["system"]["comfyui_version"]


@pytest.fixture(scope="module")
def model_files(ui_server):
    """`ensure(models)` writes each {folder: {name: kind}} file once for the whole module.

    Checkpoints come from the per-machine cache (tiny_models.cached_checkpoint; the SDXL one is 2 GB) and are
    linked under every name; the other writers get `checkpoint(family)` because their layer widths must match it.
    """
    def checkpoint(family: str) -> str:
        return tiny_models.cached_checkpoint(family)

    def write(kind: str, path: str) -> None:
        if kind in ("sd15", "sdxl"):
            os.symlink(checkpoint(kind), path)  # same file, no second copy
            return
        if kind in CACHED_FILES:
            os.symlink(CACHED_FILES[kind](), path)  # cached across runs in .harness/cache
            return
        writer = MODEL_WRITERS.get(kind)
        if writer is None:
            pytest.skip(f"no tiny-file writer for model kind {kind!r} (needed for {os.path.basename(path)})")
        writer(path, checkpoint)

    kinds: dict[tuple, str] = {}  # (folder, name) -> the kind written under that name

    def ensure(models: dict) -> None:
        for folder, files in models.items():
            root = ui_server.input_dir if folder == "input" else os.path.join(ui_server.models_dir, folder)
            os.makedirs(root, exist_ok=True)
            for name, kind in files.items():
                # one models folder serves every workflow: a name must mean one kind of file
                assert kinds.setdefault((folder, name), kind) == kind, \
                    f"{folder}/{name} is referenced as {kinds[(folder, name)]!r} and as {kind!r}: give one a new name"
                path = os.path.join(root, name)
                if not os.path.exists(path):
                    write(kind, path)

    return ensure


def _write_photomaker(path: str, checkpoint) -> None:
    """PhotoMaker v1 sized to the SDXL checkpoint *file* (2048-wide text embeddings, its UNet's LoRA layers)."""
    workflow_fixtures.write_sdxl_photomaker(path, checkpoint("sdxl"))


def _write_ipadapter_sd15(path: str, checkpoint) -> None:
    """A plain IP-Adapter reading ViT-L image embeddings, one to_k_ip/to_v_ip per attn2 of the SD1.5 file."""
    workflow_fixtures.write_sd15_ipadapter(path, checkpoint("sd15"))


def _write_ipadapter_sd15_real_width(path: str, checkpoint) -> None:
    """The same plain IP-Adapter for the real-width SD1.5 checkpoint of the AnimateDiff workflow (its cross-attention
    widths 320 x 5 + 1280 at context 768), as a .bin (torch pickle) like the public ip-adapter_sd15.bin."""
    workflow_fixtures.write_sd15_ipadapter(path, animatediff_fixtures.cached_real_width_checkpoint())


def _cached_motion_module_ckpt() -> str:
    """The random full-width mm_sd_v15_v2 as a `.ckpt` (torch pickle: ComfyUI reads a file by its extension, and the
    public file is mm_sd_v15_v2.ckpt), converted once from animatediff_fixtures.cached_motion_module()."""
    import torch
    from safetensors.torch import load_file

    return animatediff_fixtures._cached("mm_sd_v15_v2_random_seed0_v1.ckpt", lambda p: torch.save(
        load_file(animatediff_fixtures.cached_motion_module()), p))


def _write_reference_photo(path: str, checkpoint=None) -> None:
    """A reference photo in ComfyUI's input folder (LoadImage)."""
    rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))
    Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(path)


def _write_panel(path: str, checkpoint=None) -> None:
    """A 64x64 story panel for LoadImage: a bright disc on a dark ground, placed by the file name."""
    rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))
    yy, xx = np.mgrid[0:64, 0:64]
    cy, cx = rng.integers(16, 48, 2)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 14 ** 2)[..., None] * rng.integers(128, 255, 3)
    ground = rng.integers(0, 60, (64, 64, 3))
    Image.fromarray(np.maximum(disc, ground).astype(np.uint8)).save(path)


def _text_encoder_writer(kind: str):
    """A tiny text encoder of `kind` (tests/tiny_text_encoders.py: real tokenizers and key names, tiny widths)."""
    def write(path: str, checkpoint=None) -> None:
        import tiny_text_encoders

        tiny_text_encoders.write(kind, path)
    return write


MODEL_WRITERS = {"photomaker": _write_photomaker, "ipadapter_sd15": _write_ipadapter_sd15,
                 "ipadapter_sd15_real_width": _write_ipadapter_sd15_real_width,
                 "photo": _write_reference_photo, "panel": _write_panel,
                 **{kind: _text_encoder_writer(kind) for kind in ("clip_l", "t5xxl", "qwen3_4b")}}
# big files written once per machine (.harness/cache) and linked in: what AnimateDiff needs (tests/animatediff_fixtures.py)
CACHED_FILES = {"sd15_real_width": animatediff_fixtures.cached_real_width_checkpoint,
                "clip_vision_vit_l": workflow_fixtures.cached_clip_vision_vit_l,  # full size, 0.6 GB
                "motion_module_sd15_v2": _cached_motion_module_ckpt,
                # the DiT workflows' diffusion models and VAE: full width (detection fixes it), 1-2 GB each
                **dit_workflow_fixtures.CACHED_FILES}
# Wan 2.1 (story_to_video_wan): tiny diffusion model and VAE; CLIP vision H (full size) and the tiny umt5 cached
MODEL_WRITERS.update(wan_fixtures.WRITERS)
CACHED_FILES.update(wan_fixtures.CACHED)


# ---------------------------------------------------------------------------------------------------
# helpers


def run_in_browser(server, workflow_path: str, name: str, queue: bool = True, settings: dict | None = None) -> dict:
    """`settings`: {node id: {widget: value}} the driver sets after loading and before queueing."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    cmd = ["node", DRIVER, "--url", server.url, "--workflow", workflow_path, "--chromium", CHROMIUM,
           "--screenshot", os.path.join(ARTIFACTS, f"{name}.png")]
    if not queue:
        cmd.append("--no-queue")
    if settings:
        cmd += ["--set", json.dumps(settings)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, f"browser driver failed:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(ARTIFACTS, f"{name}.report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def unexpected_console_errors(report: dict, origin: str) -> list:
    """Console errors other than the offline block of other hosts and the ones the installed frontend logs on an
    empty page without any custom node (exactly as recorded: same text, same source). How often the frontend logs
    one of its own varies from load to load (frontend 1.47 retries user.css once or twice), so a recorded message
    is excused however often it comes; any other message, the pack's above all, fails the test."""
    version = frontend_noise.frontend_version()
    noise = frontend_noise.known(version)
    assert noise is not None, f"no console errors recorded for frontend {version}: run " \
        "`<venv>/bin/python tests/browser/frontend_noise.py --record` with this ComfyUI's venv and check what it stores"
    excused = {(e["text"], e["url"]) for e in noise}
    left = []
    for error in report["console_errors"]:
        if frontend_noise.is_offline_block(error, report["blocked_requests"]):
            continue  # tests are offline on purpose: the frontend's api.comfy.org lookups are aborted
        if tuple(frontend_noise.normalize(error, origin).values()) not in excused:
            left.append(error)
    return left


def check_loaded_cleanly(report: dict, workflow: dict, origin: str) -> None:
    assert report["missing_node_types"] == [], f"missing node types: {report['missing_node_types']}"
    assert report["dialogs"] == [], f"the app opened dialogs: {report['dialogs']}"
    assert report["page_errors"] == [], report["page_errors"]
    unexpected = unexpected_console_errors(report, origin)
    assert unexpected == [], json.dumps(unexpected, indent=1)
    assert report["node_count"] == len(workflow["nodes"])
    assert os.path.getsize(report["screenshot"]) > 10_000  # a rendered canvas, not a blank page


def check_queued_prompt(report: dict, workflow: dict) -> dict:
    assert report["queue_status"] == 200, f"the server refused the frontend's prompt: {report['queue_response']}"
    assert report["queue_response"]["node_errors"] == {}
    prompt = report["api_prompt"]
    # every executable node of the UI graph made it into the API prompt, with its type
    executable = {str(n["id"]): n["type"] for n in workflow["nodes"] if n["type"] not in ("MarkdownNote", "Note")}
    assert {k: v["class_type"] for k, v in prompt.items()} == executable
    return prompt


def check_outputs(server, outputs: dict, extensions: tuple) -> list[str]:
    files = server.output_files(outputs, "images") + server.output_files(outputs, "gifs")
    for ext in extensions:
        written = [f for f in files if f.endswith(ext)]
        assert written, f"no {ext} output among {files}"
        for path in written:
            assert os.path.getsize(path) > 0, path
            if ext == ".png":
                pixels = np.asarray(Image.open(path))
                assert pixels.std() > 0, f"{path} is blank"
    return files


def run_workflow(ui_server, model_files, object_info, name: str, workflow_path: str | None,
                 tmp_path) -> tuple[dict, dict, list[str]]:
    """(the browser report, the prompt's outputs, the files they name)."""
    skip_unless_buildable(name, object_info)
    builder = make_workflows.make_builder(name, object_info)
    model_files(builder.models)
    if workflow_path is None:  # test-only workflow: built on the fly
        workflow_path = str(tmp_path / f"{name}.json")
        with open(workflow_path, "w") as f:
            f.write(make_workflows.render(builder.build()))
    with open(workflow_path) as f:
        workflow = json.load(f)
    # the file as saved, then the sizes, steps and frame counts the tests run it with (tests/workflow_sizes.py)
    settings = workflow_sizes.browser_settings(workflow)
    report = run_in_browser(ui_server, workflow_path, name, settings=settings)
    check_loaded_cleanly(report, workflow, ui_server.url)
    check_queued_prompt(report, workflow)
    check_test_settings(report, workflow, object_info, settings)
    outputs = ui_server.wait(report["prompt_id"], timeout=600)
    spec = make_workflows.WORKFLOWS[name]
    files = check_outputs(ui_server, outputs, spec.outputs)
    videos = [f for f in files if f.endswith((".mp4", ".webm"))]
    if videos:  # one transition per adjacent panel pair, of the test's frame count, joined with overlap 1
        expected = make_workflows.specs.joined_frames(workflow_sizes.TEST_FRAMES)
        assert [decoded_frame_count(v) for v in videos] == [expected] * len(videos), videos
    return report, outputs, files


def check_test_settings(report: dict, workflow: dict, object_info: dict, settings: dict) -> None:
    """The driver found every widget the test sets, each held the file's saved value when the workflow had loaded,
    and the prompt the frontend queued carries the test values."""
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    changes = report["widget_changes"]
    assert sorted((c["node"], c["widget"]) for c in changes) == \
        sorted((node, widget) for node, values in settings.items() for widget in values), changes
    for change in changes:
        node = nodes[change["node"]]
        assert change["found"], f"node {change['node']} ({node['type']}) has no widget {change['widget']!r} in the page"
        saved = workflow_sizes.widget_values(node, object_info[node["type"]])[change["widget"]]
        assert change["before"] == saved, f"{change}: the file saves {saved!r}"
        assert report["api_prompt"][change["node"]]["inputs"][change["widget"]] == change["after"], change


def _linked(prompt: dict, node: dict, input_name: str, class_type: str | None = None) -> tuple[str, int]:
    """(source node id, output slot) of a linked input of an API-prompt node; checks the source's type."""
    link = node["inputs"].get(input_name)
    assert isinstance(link, list), f"{node['class_type']}.{input_name} is not linked: {link!r}"
    if class_type is not None:
        assert prompt[link[0]]["class_type"] == class_type, (input_name, prompt[link[0]]["class_type"])
    return link[0], link[1]


def _run_select_panels(select_inputs: dict, story_inputs: dict) -> tuple[list[int], int, int]:
    """What a Select Story Panels node with these widget values outputs for the Story node's text: (the
    story panels its positive rows are, panel_count, first_panel). Conditioning row i holds the value i."""
    import torch

    import comfyui_storydiffusion.nodes.story as story_nodes
    from comfyui_storydiffusion.story import parse

    story = parse.parse_story(story_inputs["characters"], story_inputs["panels"], story_inputs["identity_panels"])
    rows = torch.arange(len(story), dtype=torch.float32).reshape(-1, 1, 1)
    conditioning = [[rows, {"pooled_output": rows[:, 0]}]]
    positive, _, count, first, *_ = story_nodes.StoryDiffusionSelectPanels().select(
        conditioning, conditioning, story, select_inputs["select"], select_inputs["first_panel"], select_inputs["count"])
    return [int(v) for v in positive[0][0].flatten()], count, first


def check_story_characters(server, prompt: dict, outputs: dict, files: list[str]) -> None:
    """Identity run = the identity panels, story run = every other panel from its first_panel on, the page
    joins both in story order, and the bank is saved: all read from the API prompt the frontend queued."""
    samplers = {prompt[_linked(prompt, node, "model")[0]]["class_type"]: node
                for node in prompt.values() if node["class_type"] == "KSampler"}
    identity_sampler = samplers["StoryDiffusionIdentityBankWrite"]
    story_sampler = samplers["StoryDiffusionIdentityBankRead"]
    story_id, _ = _linked(prompt, identity_sampler, "positive", "StoryDiffusionSelectPanels")
    story_inputs = prompt[_linked(prompt, prompt[story_id], "story", "StoryDiffusionStory")[0]]["inputs"]
    runs = {}
    for run, sampler in (("identity", identity_sampler), ("story", story_sampler)):
        select_id, slot = _linked(prompt, sampler, "positive", "StoryDiffusionSelectPanels")
        assert slot == 0 and sampler["inputs"]["negative"] == [select_id, 1]
        latent = prompt[_linked(prompt, sampler, "latent_image", "EmptyLatentImage")[0]]
        assert latent["inputs"]["batch_size"] == [select_id, 2], f"the {run} latent's batch is not the panel count"
        runs[run] = (select_id, *_run_select_panels(prompt[select_id]["inputs"], story_inputs))
    _, identity_rows, identity_count, _ = runs["identity"]
    story_select, story_rows, story_count, story_first = runs["story"]
    panels = len(story_inputs["panels"].splitlines())
    assert (identity_rows, identity_count) == (list(range(make_workflows.specs.STORY_IDENTITY_BATCH)),
                                               make_workflows.specs.STORY_IDENTITY_BATCH)
    assert (story_rows, story_count, story_first) == (list(range(4, panels)), panels - 4, 4) and story_count == 8
    # the bank read knows which story panel its first latent is, and runs after the identity run
    read = prompt[_linked(prompt, story_sampler, "model")[0]]
    assert read["inputs"]["first_panel"] == [story_select, 3]
    assert prompt[_linked(prompt, read, "after")[0]] is identity_sampler
    # page = identity images then story images; ComicPage fails unless captions (one per story panel) and images agree
    page = next(n for n in prompt.values() if n["class_type"] == "StoryDiffusionComicPage")
    batch = prompt[_linked(prompt, page, "images", "StoryDiffusionBatchImages")[0]]
    assert _linked(prompt, page, "captions", "StoryDiffusionStory")[1] == 2
    for image, sampler in (("image1", identity_sampler), ("image2", story_sampler)):
        decode = prompt[_linked(prompt, batch, image, "VAEDecode")[0]]
        assert prompt[_linked(prompt, decode, "samples", "KSampler")[0]] is sampler
    pngs = [f for f in files if f.endswith(".png")]
    assert len(pngs) == 1, pngs  # 12 panels on one 3 x 4 grid page
    bank_files = [text for node in outputs.values() for text in node.get("text", []) if text.endswith(".safetensors")]
    # Save Identity Bank writes into models/storydiffusion, where Load Identity Bank lists it
    assert len(bank_files) == 1, outputs
    assert os.path.getsize(os.path.join(server.models_dir, "storydiffusion", bank_files[0])) > 0, outputs


def check_story_to_video_animatediff(server, prompt: dict, outputs: dict, files: list[str]) -> None:
    """The KSampler samples through ADE (Evolved Sampling over the per-frame conditioned model, the motion module,
    static context windows shorter than a transition), and ADE did slide its windows over every transition."""
    specs = make_workflows.specs
    sampler = next(node for node in prompt.values() if node["class_type"] == "KSampler")
    evolved = prompt[_linked(prompt, sampler, "model", "ADE_UseEvolvedSampling")[0]]
    _linked(prompt, evolved, "model", "StoryDiffusionPerFrameSemanticConditioning")
    apply = prompt[_linked(prompt, evolved, "m_models", "ADE_ApplyAnimateDiffModelSimple")[0]]
    loader = prompt[_linked(prompt, apply, "motion_model", "ADE_LoadAnimateDiffModel")[0]]
    assert loader["inputs"]["model_name"] == specs.MOTION_MODULE_FILE
    context = prompt[_linked(prompt, evolved, "context_options", "ADE_StandardStaticContextOptions")[0]]["inputs"]
    latent = prompt[_linked(prompt, sampler, "latent_image", "EmptyLatentImage")[0]]
    motion = prompt[_linked(prompt, latent, "batch_size", "StoryDiffusionSemanticMotionPredictor")[0]]
    frames = motion["inputs"]["frames"]
    assert context["context_length"] < frames, "the test workflow should sample in more than one context window"
    log = server.read_log()
    assert f"Sliding context window sampling activated - latents passed in ({frames}) greater than context_length " \
           f"{context['context_length']}" in log, log[-3000:]
    assert f"Using motion module {specs.MOTION_MODULE_FILE}" in log, log[-3000:]


def _video_frames(path: str) -> np.ndarray:
    import av

    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def check_story_to_video_wan(server, prompt: dict, outputs: dict, files: list[str]) -> None:
    """Each pair runs core WanFirstLastFrameToVideo (both panels, their CLIP vision H tokens, the umt5 prompt) and a
    KSampler over the Wan model patched by Wan Per-frame Semantics (strength > 0) with the predictor's tokens; the
    patch ran: the same prompt at strength 0 (plain FLF2V, only the patch and what follows re-run) gives other frames."""
    specs = make_workflows.specs
    sampler = next(node for node in prompt.values() if node["class_type"] == "KSampler")
    per_frame_id, _ = _linked(prompt, sampler, "model", "StoryDiffusionWanPerFrameSemantics")
    per_frame = prompt[per_frame_id]
    assert per_frame["inputs"]["strength"] == specs.WAN_STRENGTH > 0
    motion_id, slot = _linked(prompt, per_frame, "clip_vision_output", "StoryDiffusionSemanticMotionPredictor")
    assert slot == 0 and prompt[motion_id]["inputs"]["embeddings"] == "penultimate"
    shift = prompt[_linked(prompt, per_frame, "model", "ModelSamplingSD3")[0]]
    assert prompt[_linked(prompt, shift, "model", "UNETLoader")[0]]["inputs"]["unet_name"] == specs.WAN_MODEL_FILE
    flf_id, _ = _linked(prompt, sampler, "positive", "WanFirstLastFrameToVideo")
    assert [sampler["inputs"][name] for name in ("positive", "negative", "latent_image")] == \
        [[flf_id, 0], [flf_id, 1], [flf_id, 2]]
    flf = prompt[flf_id]
    assert flf["inputs"]["length"] == [motion_id, 2]  # the predictor's frames = the transition's frames
    pairs = {}
    for side in ("start", "end"):
        encode = prompt[_linked(prompt, flf, f"clip_vision_{side}_image", "CLIPVisionEncode")[0]]
        pairs[side] = list(_linked(prompt, flf, f"{side}_image", "StoryDiffusionPanelPairs"))
        assert encode["inputs"]["image"] == pairs[side] == prompt[motion_id]["inputs"][side]
        loader = prompt[_linked(prompt, encode, "clip_vision", "CLIPVisionLoader")[0]]
        assert loader["inputs"]["clip_name"] == specs.WAN_CLIP_VISION_FILE
    text = prompt[_linked(prompt, flf, "positive", "CLIPTextEncode")[0]]
    assert prompt[_linked(prompt, text, "clip", "CLIPLoader")[0]]["inputs"]["type"] == "wan"
    # the patch changed sampling: strength 0 (bit-identical to plain FLF2V, tests/test_wan.py) gives another video
    plain = json.loads(json.dumps(prompt))
    plain[per_frame_id]["inputs"]["strength"] = 0.0
    combine = next(key for key, node in plain.items() if node["class_type"] == "StoryDiffusionVideoCombine")
    plain[combine]["inputs"]["filename_prefix"] += "_strength0"
    plain_video = [f for f in check_outputs(server, server.run(plain), (".mp4",)) if f.endswith(".mp4")]
    video = [f for f in files if f.endswith(".mp4")]
    assert len(plain_video) == len(video) == 1, (plain_video, video)
    steered, unsteered = _video_frames(video[0]).astype(float), _video_frames(plain_video[0]).astype(float)
    assert steered.shape == unsteered.shape and steered.shape[0] == specs.joined_frames(workflow_sizes.TEST_FRAMES)
    assert np.abs(steered - unsteered).mean() > 0.5, "Wan Per-frame Semantics did not change the sampled frames"


def _run_saving_panels(server, prompt: dict, decode_id: str, prefix: str) -> list[np.ndarray]:
    """Run `prompt` with one more Save Image on the panels' VAE Decode: the decoded panels, in batch order."""
    prompt = json.loads(json.dumps(prompt))
    prompt["save_panels"] = {"class_type": "SaveImage", "inputs": {"images": [decode_id, 0], "filename_prefix": prefix}}
    outputs = server.run(prompt)
    images = outputs["save_panels"]["images"]
    return [np.asarray(Image.open(os.path.join(server.output_dir, i["subfolder"], i["filename"])).convert("RGB"),
                       dtype=np.int16) for i in images]


def check_comic_from_reference(server, prompt: dict, outputs: dict, files: list[str]) -> None:
    """The panels' KSampler reads the bank Identity Bank From Images wrote from the Load Image reference, bound to the
    story's character, with the reading run's schedule and size; the reference decides the character's panels: with
    another reference image the same prompt draws other panels of the character, and the same [NC] panel."""
    specs = make_workflows.specs
    sampler_id, sampler = next((k, n) for k, n in prompt.items() if n["class_type"] == "KSampler")
    read = prompt[_linked(prompt, sampler, "model", "StoryDiffusionIdentityBankRead")[0]]
    from_images = prompt[_linked(prompt, read, "bank", "StoryDiffusionIdentityBankFromImages")[0]]
    csa = _linked(prompt, read, "model", "StoryDiffusionConsistentSelfAttention")
    assert _linked(prompt, from_images, "model") == csa  # written and read through the same CSA settings
    for name in ("steps", "cfg", "sampler_name", "scheduler", "denoise"):
        assert from_images["inputs"][name] == sampler["inputs"][name], name
    latent = prompt[_linked(prompt, sampler, "latent_image", "EmptyLatentImage")[0]]
    assert [from_images["inputs"][k] for k in ("width", "height")] == [latent["inputs"][k] for k in ("width", "height")]
    reference = prompt[_linked(prompt, from_images, "references", "StoryDiffusionConsistencyReference")[0]]
    assert reference["inputs"]["character"] == specs.REFERENCE_CHARACTER
    load_id, _ = _linked(prompt, reference, "images", "LoadImage")
    assert prompt[load_id]["inputs"]["image"] == specs.REFERENCE_SHEET_FILE
    text = prompt[_linked(prompt, from_images, "positive", "CLIPTextEncode")[0]]["inputs"]["text"]
    assert specs.REFERENCE_DESCRIPTION in text
    # the panels with this reference and with another one: the character's panels change, the [NC] panel does not
    decode_id = next(k for k, n in prompt.items() if n["class_type"] == "VAEDecode"
                     and n["inputs"]["samples"] == [sampler_id, 0])
    other = "storydiffusion_other_reference.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(os.path.join(server.input_dir, other))
    changed = json.loads(json.dumps(prompt))
    changed[load_id]["inputs"]["image"] = other
    panels = _run_saving_panels(server, prompt, decode_id, "reference_panels")
    other_panels = _run_saving_panels(server, changed, decode_id, "other_reference_panels")
    lines = specs.REFERENCE_STORY["panels"].splitlines()
    assert len(panels) == len(other_panels) == len(lines)
    for line, panel, other_panel in zip(lines, panels, other_panels):
        if line.startswith("[NC]"):
            assert np.array_equal(panel, other_panel), f"{line!r} shows no character but changed with the reference"
        else:
            assert np.abs(panel - other_panel).max() > 0, f"{line!r} did not change with the reference image"


def check_tune_consistency(server, prompt: dict, outputs: dict, files: list[str]) -> None:
    """Value List drives both rates of Consistent Self-Attention; the story is sampled and scored once per value (the
    test's two), and the plot's table pairs each value with the score of its own run, in the list's order."""
    import re

    kind = {key: node["class_type"] for key, node in prompt.items()}
    values_id = next(key for key, t in kind.items() if t == "StoryDiffusionValueList")
    assert prompt[values_id]["inputs"]["values"] == workflow_sizes.TEST_SWEEP
    csa = next(node for node in prompt.values() if node["class_type"] == "StoryDiffusionConsistentSelfAttention")
    assert csa["inputs"]["rate"] == csa["inputs"]["rate_high_res"] == [values_id, 0]
    score_id = next(key for key, t in kind.items() if t == "StoryDiffusionStoryConsistency")
    plot_id = next(key for key, t in kind.items() if t == "StoryDiffusionConsistencyPlot")
    assert prompt[plot_id]["inputs"]["values"] == [values_id, 0]
    assert prompt[plot_id]["inputs"]["self_consistency"] == [score_id, 0]
    reports = outputs[score_id]["text"]
    values = [float(v) for v in workflow_sizes.TEST_SWEEP.split(",")]
    assert len(reports) == len(values), reports  # one scored run per value
    means = []
    for report in reports:
        found = re.search(r"self  \(panels of one character\):   mean (\S+), worst pair (\S+)", report)
        assert found, report
        means.append((found.group(1), found.group(2)))
    (table,) = outputs[plot_id]["text"]
    lines = table.splitlines()
    assert lines[0] == "rate | self (mean) | self (worst pair)"
    for line, value, (mean, worst) in zip(lines[1:], values, means, strict=True):
        cells = line.split(" | ")
        assert float(cells[0]) == value
        assert f"{float(cells[1]):.3f}" == mean and f"{float(cells[2]):.3f}" == worst, (line, mean, worst)
    assert len([f for f in files if f.endswith(".png")]) == 1  # one plot for the whole sweep


def check_story_distributed(server, prompt: dict, outputs: dict, files: list[str]) -> None:
    """The graph the frontend queued: Distributed Seed (0) gives Select Story Panels its participant, the share's
    latents come from Select Story Panels (noise by story index), the read takes its panels, and Panels In Story
    Order joins the Distributed Collector's batch with the identity run. (On one server the test runs every panel
    there: tests/test_distributed.py runs master and workers.)"""
    select_id = next(i for i, n in prompt.items() if n["class_type"] == "StoryDiffusionSelectPanels"
                     and n["inputs"]["select"] == "panels that are not identity panels")
    select = prompt[select_id]
    seed_id, _ = _linked(prompt, select, "participant", "DistributedSeed")
    assert prompt[seed_id]["inputs"]["seed"] == 0 and select["inputs"]["participants"] == 1  # the test's value
    assert prompt[_linked(prompt, select, "latent", "EmptyLatentImage")[0]]["inputs"]["batch_size"] == 1
    sampler_id = next(i for i, n in prompt.items() if n["class_type"] == "KSampler"
                      and n["inputs"]["latent_image"] == [select_id, 5])
    sampler = prompt[sampler_id]
    read = prompt[_linked(prompt, sampler, "model", "StoryDiffusionIdentityBankRead")[0]]
    assert read["inputs"]["panels"] == [select_id, 4]
    order = next(n for n in prompt.values() if n["class_type"] == "StoryDiffusionStoryOrder")
    collector = prompt[_linked(prompt, order, "images_a", "DistributedCollector")[0]]
    assert prompt[_linked(prompt, collector, "images", "VAEDecode")[0]]["inputs"]["samples"] == [sampler_id, 0]
    assert order["inputs"]["panels_a"] == [select_id, 4]
    assert len([f for f in files if f.endswith(".png")]) == 1  # the page


WORKFLOW_CHECKS = {"story_characters": check_story_characters,
                   "tune_consistency": check_tune_consistency,
                   "story_distributed": check_story_distributed,
                   "comic_from_reference": check_comic_from_reference,
                   "story_to_video_animatediff": check_story_to_video_animatediff,
                   "story_to_video_wan": check_story_to_video_wan}


def decoded_frame_count(path: str) -> int:
    """Frames PyAV decodes from the file (a truncated or empty video decodes fewer)."""
    import av

    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


# ---------------------------------------------------------------------------------------------------
# tests


def test_frontend_noise_is_what_an_empty_page_logs(browser, tmp_path):
    """The console errors the browser tests excuse for this frontend (tests/browser/frontend_noise.json) are exactly
    what its page logs on a server without any custom node, before any workflow: never a message of this pack."""
    version = frontend_noise.frontend_version()
    recorded = frontend_noise.known(version)
    observed = frontend_noise.empty_page_errors(str(tmp_path), browser)
    fix = "run `<venv>/bin/python tests/browser/frontend_noise.py --record` with this ComfyUI's venv"
    assert recorded is not None, f"no console errors recorded for frontend {version}; this page logs {observed}: {fix}"
    assert {(e["text"], e["url"]) for e in observed} == {(e["text"], e["url"]) for e in recorded}, fix


def test_core_nodes_workflow_runs_through_the_browser(browser, ui_server, model_files, object_info, tmp_path):
    """The harness itself, on ComfyUI core nodes only: load, screenshot, queue, a PNG comes out."""
    report, _, _ = run_workflow(ui_server, model_files, object_info, "core_sd15", None, tmp_path)
    sampler = next(v for v in report["api_prompt"].values() if v["class_type"] == "KSampler")
    # widgets_values line up with the widgets: the seed's control value did not shift steps/cfg
    assert (sampler["inputs"]["seed"], sampler["inputs"]["steps"], sampler["inputs"]["cfg"]) == (42, 2, 5)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_loads_and_runs_in_browser(browser, ui_server, model_files, object_info, name, tmp_path,
                                                    pack):
    path = os.path.join(REPO, "workflows", f"{name}.json")
    assert os.path.exists(path), f"{path} missing: run `python scripts/make_workflows.py`"
    report, outputs, files = run_workflow(ui_server, model_files, object_info, name, path, tmp_path)
    if name in WORKFLOW_CHECKS:
        WORKFLOW_CHECKS[name](ui_server, report["api_prompt"], outputs, files)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_matches_installed_nodes(object_info, comfyui_version, name):
    """widgets_values are positional: on the version the files are written on (0.3.75) a node that gained or lost an
    input makes the file stale (exact comparison); on every version the file must be compatible with the nodes."""
    skip_unless_buildable(name, object_info)
    problems = make_workflows.shipped_problems(name, object_info, comfyui_version)
    assert problems == [], "run `.harness/venv/bin/python scripts/make_workflows.py` (ComfyUI " \
        f"{make_workflows.WRITTEN_ON}):\n" + "\n".join(problems)


def test_workflows_are_written_on_the_oldest_supported_comfyui():
    """The files must open on every supported version, so they are written on the floor that pyproject declares."""
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["tool"]["comfy"]["requires-comfyui"]
    assert requires == f">={make_workflows.WRITTEN_ON}"


def test_compatibility_check_finds_what_a_version_change_breaks(object_info):
    """make_workflows' check on versions other than 0.3.75 passes the shipped file and fails each change the frontend
    would load wrongly: a shifted widget value, a value the spec sets on another widget, an input or node type this
    version lacks, a link into an input of another type."""
    name = "comic_sd15"
    with open(os.path.join(REPO, "workflows", f"{name}.json")) as f:
        shipped = json.load(f)
    spec = make_workflows.make_builder(name, object_info)
    check = make_workflows.builder.compatibility_problems
    assert check(shipped, object_info, spec) == []

    def changed(edit, info=None) -> list[str]:
        workflow = json.loads(json.dumps(shipped))
        edit({n["type"]: n for n in workflow["nodes"]}, workflow)
        return check(workflow, info or object_info, spec)

    shifted = changed(lambda nodes, _: nodes["KSampler"]["widgets_values"].insert(0, 7))
    assert any("KSampler" in p and "widget" in p for p in shifted), shifted
    steps = make_workflows.specs.SD15_SAMPLER["steps"]
    spec_value = changed(lambda nodes, _: nodes["KSampler"]["widgets_values"].__setitem__(2, steps + 1))  # 2: steps
    assert any(f"widget steps = {steps + 1}, the spec sets {steps}" in p for p in spec_value), spec_value
    renamed = changed(lambda nodes, _: nodes["VAEDecode"]["inputs"][0].__setitem__("name", "latent"))
    assert any("input 'latent' does not exist" in p for p in renamed), renamed
    without = {k: v for k, v in object_info.items() if k != "VAEDecode"}
    assert any("(VAEDecode): node type is not installed" in p for p in changed(lambda *_: None, without))
    decode = next(n for n in shipped["nodes"] if n["type"] == "VAEDecode")
    vae_link = next(i["link"] for i in decode["inputs"] if i["name"] == "vae")
    model_link = next(link for link in shipped["links"] if link[5] == "MODEL")

    def miswire(_, workflow):  # the VAE input fed by the MODEL output
        link = next(link for link in workflow["links"] if link[0] == vae_link)
        link[1:3] = model_link[1:3]
    assert any("output MODEL cannot feed vae (VAE)" in p for p in changed(miswire))


def test_workflows_are_served_as_templates_with_thumbnails(ui_server):
    listed = ui_server.get("/workflow_templates")
    # every shipped file, ADE or not: ComfyUI serves workflows/ whatever is installed (without ADE the
    # AnimateDiff template still opens, with its nodes shown as missing)
    assert sorted(listed.get(PACK_FOLDER, [])) == SHIPPED
    for name in SHIPPED:
        served = ui_server.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
        assert served["version"] == 0.4 and served["nodes"]
        # the template browser shows /api/workflow_templates/<pack>/<name>.jpg as the card image
        thumbnail = os.path.join(REPO, "workflows", f"{name}.jpg")
        assert os.path.exists(thumbnail), f"{thumbnail} missing: run make_workflows.py --thumbnails test-artifacts/workflows"
        assert Image.open(thumbnail).format == "JPEG"


def test_builder_rejects_specs_that_do_not_match_the_nodes(object_info):
    builder = make_workflows.WorkflowBuilder(object_info, "bad")
    with pytest.raises(make_workflows.builder.SpecError, match="no widget"):
        builder.add("KSampler", widgets={"sed": 1})
    with pytest.raises(make_workflows.builder.SpecError, match="not one of"):
        builder.add("KSampler", widgets={"sampler_name": "no-such-sampler"})
    with pytest.raises(make_workflows.builder.SpecError, match="not installed"):
        builder.add("StoryDiffusionNoSuchNode")
    latent = builder.add("EmptyLatentImage")
    decode = builder.add("VAEDecode")
    with pytest.raises(make_workflows.builder.SpecError, match="cannot link"):
        builder.connect(latent, 0, decode, "vae")


def test_story_characters_runs_cover_every_panel_once_in_order(pack):
    """The page joins the identity run's images, then the story run's: that is story order only when the
    identity panels are exactly panels 0..batch-1 and the story run starts right after them."""
    from comfyui_storydiffusion.story import parse

    story = parse.parse_story(make_workflows.specs.STORY_CHARACTERS, make_workflows.specs.STORY_PANELS,
                              make_workflows.specs.STORY_IDENTITY_PANELS)
    identity = sorted({i for panels in story.identity_panels.values() for i in panels})
    assert identity == list(range(make_workflows.specs.STORY_IDENTITY_BATCH))
    assert make_workflows.specs.STORY_RUN_FIRST_PANEL == len(identity)
    assert len(story.panels) == 12 and len(story.identity_panels) == 2
    assert any(not panel.characters for panel in story.panels)  # [NC] panels


DEPRECATED_CORE_NODES = {"ImageBatch"}  # deprecated in ComfyUI 0.8.0, whose replacement 0.3.75 lacks


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_uses_no_deprecated_node(comfy_nodes, name, request):
    """No [DEPR] badge on either ComfyUI version: no class with DEPRECATED (V1) / is_deprecated (V3) here,
    and none that later versions deprecate (core ImageBatch -> Batch Images (StoryDiffusion)). Other packs'
    nodes (not loaded in-process): the server's /object_info says whether they are deprecated."""
    with open(os.path.join(REPO, "workflows", f"{name}.json")) as f:
        types = {node["type"] for node in json.load(f)["nodes"]}
    deprecated = set()
    third_party = types - {"MarkdownNote", "Note"} - set(comfy_nodes.NODE_CLASS_MAPPINGS)
    if third_party:
        object_info = request.getfixturevalue("object_info")
        skip_unless_buildable(name, object_info)
        deprecated |= {t for t in third_party if object_info[t].get("deprecated")}
    for node_type in types - {"MarkdownNote", "Note"} - third_party:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_type]
        schema = getattr(cls, "GET_SCHEMA", None)
        if getattr(cls, "DEPRECATED", False) or (schema is not None and getattr(schema(), "is_deprecated", False)):
            deprecated.add(node_type)
    assert not deprecated and not types & DEPRECATED_CORE_NODES, sorted(deprecated | (types & DEPRECATED_CORE_NODES))


TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar this far above its pos


def node_rect(pos, size, title_height: float = TITLE_HEIGHT) -> tuple:
    """(left, top, right, bottom) of a node as drawn: the title bar above pos, the body below it."""
    return pos[0], pos[1] - title_height, pos[0] + size[0], pos[1] + size[1]


def overlapping_nodes(rects: dict) -> list:
    """Pairs of node names whose rectangles share any area (edges touching is fine)."""
    items = sorted(rects.items())
    return [(a, b) for i, (a, ra) in enumerate(items) for b, rb in items[i + 1:]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]]


def _node_label(node: dict) -> str:
    return f"{node['id']}:{node.get('title') or node['type']}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_nodes_do_not_overlap(name):
    with open(os.path.join(REPO, "workflows", f"{name}.json")) as f:
        nodes = json.load(f)["nodes"]
    rects = {_node_label(n): node_rect(n["pos"], n["size"]) for n in nodes}
    assert overlapping_nodes(rects) == []


# Loads every shipped workflow in turn and reads each node's bounds as the frontend laid it out (it grows
# a node to its computed minimum, e.g. LoadImage to fit the image preview, once the image has loaded).
BOUNDS_PROBE = """
const out = {};
for (const [name, workflow] of Object.entries(WORKFLOWS)) {
  await app.loadGraphData(workflow, true, true, name);
  await new Promise((r) => setTimeout(r, 1500));
  app.graph.setDirtyCanvas(true, true);
  app.canvas.draw(true, true);
  out[name] = app.graph._nodes.map((n) => {
    const min = n.computeSize ? n.computeSize() : n.size;
    return { id: n.id, label: `${n.id}:${n.title}`, pos: [...n.pos],
             size: [Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])] };
  });
}
return { title: window.LiteGraph.NODE_TITLE_HEIGHT, workflows: out };
"""


def run_probe(server, body: str, tmp_path, workflow_path: str | None = None, screenshot: str | None = None) -> dict:
    """Run tests/browser/ui_probe.mjs: `body` is an async function body of (app, wf) run in the page."""
    probe = tmp_path / "probe.js"
    probe.write_text(body)
    cmd = ["node", os.path.join(REPO, "tests", "browser", "ui_probe.mjs"), "--url", server.url, "--probe", str(probe),
           "--chromium", CHROMIUM]
    if workflow_path:
        cmd += ["--workflow", workflow_path]
    if screenshot:
        os.makedirs(ARTIFACTS, exist_ok=True)
        cmd += ["--screenshot", os.path.join(ARTIFACTS, screenshot)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, f"browser probe failed:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["page_errors"] == [], report["page_errors"]
    return report["result"]


def test_shipped_workflow_nodes_do_not_overlap_in_the_frontend(browser, ui_server, model_files, object_info, tmp_path):
    workflows = {}
    for name in SHIPPED:
        if make_workflows.missing_requirements(name, object_info):
            continue  # another pack's nodes are missing (ADE snapshot): the frontend would draw placeholders
        model_files(make_workflows.make_builder(name, object_info).models)  # LoadImage previews need the files
        with open(os.path.join(REPO, "workflows", f"{name}.json")) as f:
            workflows[name] = json.load(f)
    result = run_probe(ui_server, f"const WORKFLOWS = {json.dumps(workflows)};\n" + BOUNDS_PROBE, tmp_path)
    assert result["title"] == TITLE_HEIGHT
    overlaps = {}
    for name, nodes in result["workflows"].items():
        assert len(nodes) == len(workflows[name]["nodes"])
        found = overlapping_nodes({n["label"]: node_rect(n["pos"], n["size"], result["title"]) for n in nodes})
        if found:
            overlaps[name] = found
    assert overlaps == {}


# ---------------------------------------------------------------------------------------------------
# the pack's frontend extension (web/storydiffusion.js), hiding and disabling the widgets a node ignores, is tested
# in both node renderers (classic canvas, Nodes 2.0) by tests/test_web_extension.py


# ---------------------------------------------------------------------------------------------------
# template cards: a real description and a thumbnail of what the workflow makes


def _colour_share(pixels: np.ndarray, colour, tolerance: int = 24) -> float:
    return float((np.abs(pixels.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).mean())


@pytest.mark.parametrize("name", SHIPPED)
def test_template_thumbnail_is_the_rendered_page(object_info, name):
    """workflows/<name>.jpg is the page (or video frame strips) story/comic.py draws from the flat numbered
    placeholder panels, not a screenshot: same size as a fresh render, and every panel colour is on it."""
    skip_unless_buildable(name, object_info)
    thumbnail = Image.open(os.path.join(REPO, "workflows", f"{name}.jpg")).convert("RGB")
    expected = make_workflows.render_thumbnail(name, object_info)
    assert thumbnail.size == expected.size and max(thumbnail.size) == make_workflows.THUMBNAIL_SIZE
    pixels = np.asarray(thumbnail)
    assert np.abs(pixels.astype(int) - np.asarray(expected).astype(int)).mean() < 4
    plan = make_workflows.thumbnail_plan(name, object_info)
    colours = plan["colours"] if plan["kind"] == "video" else plan["colours"][:len(plan["colours"])]
    shown = [c for c in colours if _colour_share(pixels, c) > 0.004]
    if plan["kind"] == "page" and plan["page"]["layout"] == "horizontal strip":
        assert len(shown) == plan["page"]["columns"]  # the first page: one strip of `columns` panels
    else:
        assert shown == colours, (colours, shown)
    if plan["kind"] == "page":  # the page's white ground
        assert _colour_share(pixels, (255, 255, 255), 8) > 0.1


def test_template_index_has_real_descriptions(ui_server):
    """web/templates.json, served next to the extension, describes every shipped workflow in one line."""
    served = ui_server.get(f"/extensions/{PACK_FOLDER}/templates.json")
    assert served == make_workflows.template_index()
    assert sorted(t["name"] for t in served["templates"]) == SHIPPED
    for template in served["templates"]:
        text = template["description"]
        assert text and "\n" not in text and template["name"] not in text and len(text) > 40, template
        assert "-" not in text and "_" not in text, f"the frontend turns - and _ into spaces: {text!r}"
        assert template["title"] and template["title"] != template["name"]


TEMPLATES_PROBE = """
const DIALOG = '.p-dialog, [role="dialog"]';  // a PrimeVue dialog up to frontend 1.35, a role=dialog element in 1.47
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
await app.extensionManager.command.execute('Comfy.BrowseTemplates');
let nav = null;
for (let i = 0; i < 150 && !nav; i++) {
  await sleep(200);
  nav = [...document.querySelectorAll(DIALOG + ' *')].find((e) => e.children.length === 0 && (e.textContent || '').trim() === PACK);
}
if (!nav) return { error: 'no category for the pack in the template browser' };
nav.click();
await sleep(1500);
const dialog = document.querySelector(DIALOG);
// cards below the fold load their image when scrolled into view: visit every card, then wait for the images
for (let seen = -1, i = 0; i < 20; i++) {
  const images = [...dialog.querySelectorAll('img')];
  if (images.length === seen) break;
  seen = images.length;
  for (const image of images) { image.scrollIntoView({ block: 'center' }); await sleep(150); }
}
for (let i = 0; i < 100; i++) {
  if ([...dialog.querySelectorAll('img')].every((image) => image.complete && image.naturalWidth > 0)) break;
  await sleep(100);
}
const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
const store = pinia._s.get('workflowTemplates');
return {
  text: dialog.innerText,
  images: [...dialog.querySelectorAll('img')].map((i) => [i.naturalWidth, i.naturalHeight]),
  templates: store.enhancedTemplates.filter((t) => t.sourceModule === PACK)
    .map((t) => ({ name: t.name, title: t.title, description: t.description })),
};
"""


def test_template_browser_shows_titles_descriptions_and_thumbnails(browser, ui_server, tmp_path):
    r = run_probe(ui_server, f"const PACK = {json.dumps(PACK_FOLDER)};\n" + TEMPLATES_PROBE, tmp_path,
                  screenshot="template_browser.png")
    assert "error" not in r, r
    expected = {t["name"]: t for t in make_workflows.template_index()["templates"]}
    assert sorted(t["name"] for t in r["templates"]) == SHIPPED  # listed once each
    for template in r["templates"]:
        assert template == expected[template["name"]]
        assert template["title"] in r["text"] and template["description"] in r["text"].replace("\n", " ")
    sizes = sorted(Image.open(os.path.join(REPO, "workflows", f"{n}.jpg")).size for n in SHIPPED)
    assert sorted(tuple(s) for s in r["images"]) == [tuple(s) for s in sizes]
