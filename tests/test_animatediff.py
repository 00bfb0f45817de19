"""The paper's video stack: SD1.5 + an AnimateDiff motion module through AnimateDiff-Evolved (ADE), with this
pack's per-frame semantic conditioning, run by ComfyUI's own executor.

ADE is the unmodified snapshot in ../shared/thirdparty (skipped when absent), loaded with ComfyUI's custom-node
loader; the motion module is a random full-width file with mm_sd_v15_v2's key layout and the checkpoint a
real-width, shallow SD1.5 (tests/animatediff_fixtures.py). Frames are 64 px (8x8 latents), one step.
"""
from __future__ import annotations

import os

import pytest
import torch

import animatediff_fixtures as adf
import harness
import ipadapter_fixtures as fx

FRAMES = 6
CONTEXT_LENGTH = 4
CONTEXT_OVERLAP = 2
IPADAPTER_FILE = "real-width-ip-adapter_sd15.safetensors"
# the real-width checkpoint's cross-attentions in IP-Adapter file order: input 1, 2, output 9, 10, 11, middle
IPADAPTER_WIDTHS = [320] * 5 + [1280]


def defaults(nodes, class_type: str, **inputs) -> dict:
    """An API node with every required widget at its default, then `inputs`."""
    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    values = {}
    for name, (kind, *opts) in spec.get("required", {}).items():
        options = opts[0] if opts and isinstance(opts[0], dict) else {}
        if "default" in options:
            values[name] = options["default"]
        elif isinstance(kind, list) and kind:
            values[name] = kind[0]
    values.update(inputs)
    return {"class_type": class_type, "inputs": values}


class Graph:
    """An API prompt: checkpoint, prompts, empty latent; `.sample(model_ref, prefix)` adds KSampler + SaveLatent."""

    def __init__(self, nodes, ckpt: str, frames: int = FRAMES):
        self.nodes, self.prompt, self.saves = nodes, {}, {}
        self.ckpt = self.add("CheckpointLoaderSimple", ckpt_name=ckpt)
        self.pos = self.add("CLIPTextEncode", clip=[self.ckpt, 1], text="a fox running through snow")
        self.neg = self.add("CLIPTextEncode", clip=[self.ckpt, 1], text="blurry")
        self.latent = self.add("EmptyLatentImage", width=64, height=64, batch_size=frames)

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = defaults(self.nodes, class_type, **inputs)
        return node_id

    def ade_model(self, model: list, motion_file: str | None, context: bool) -> list:
        """Use Evolved Sampling over `model`, with the motion module (Load + Apply) and context windows or not."""
        inputs = {"model": model}
        if motion_file:
            loaded = self.add("ADE_LoadAnimateDiffModel", model_name=motion_file)
            inputs["m_models"] = [self.add("ADE_ApplyAnimateDiffModelSimple", motion_model=[loaded, 0]), 0]
        if context:
            inputs["context_options"] = [self.add("ADE_StandardStaticContextOptions", context_length=CONTEXT_LENGTH,
                                                  context_overlap=CONTEXT_OVERLAP), 0]
        return [self.add("ADE_UseEvolvedSampling", **inputs), 0]

    def sample(self, model: list, prefix: str) -> None:
        sampler = self.add("KSampler", model=model, seed=3, steps=1, cfg=4.0, sampler_name="euler", scheduler="normal",
                           positive=[self.pos, 0], negative=[self.neg, 0], latent_image=[self.latent, 0], denoise=1.0)
        self.saves[prefix] = self.add("SaveLatent", samples=[sampler, 0], filename_prefix=f"ade_{prefix}")

    def run(self, comfy) -> dict:
        import folder_paths
        from safetensors.torch import load_file

        outputs = comfy.run(self.prompt)
        latents = {}
        for prefix, node_id in self.saves.items():
            saved = outputs[node_id]["latents"][0]
            path = os.path.join(folder_paths.get_output_directory(), saved["subfolder"], saved["filename"])
            latents[prefix] = load_file(path)["latent_tensor"]
        return latents


@pytest.fixture()
def temporal_calls(ade, monkeypatch):
    """(video_length, rows, sub_idxs) of every temporal self-attention call of the motion module."""
    module = ade.submodule("animatediff.motion_module_ad")
    calls = []
    real = module.VersatileAttention.forward

    def forward(self, hidden_states, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        sub_idxs = (options.get("ad_params") or {}).get("sub_idxs")
        calls.append((kwargs.get("video_length"), hidden_states.shape[0], list(sub_idxs) if sub_idxs is not None else None))
        return real(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(module.VersatileAttention, "forward", forward)
    return calls


def windows(frames=FRAMES, length=CONTEXT_LENGTH, overlap=CONTEXT_OVERLAP) -> list:
    """Static context windows as ADE lays them out (length 4, overlap 2 over 6 frames: 0-3, 2-5)."""
    starts = list(range(0, frames - length + 1, length - overlap))
    if starts[-1] + length < frames:
        starts.append(frames - length)
    return [list(range(s, s + length)) for s in starts]


# ---------------------------------------------------------------------------------------------------
# fixtures and the motion module file


def test_motion_module_file_has_the_keys_ade_builds(ade):
    """The file's keys and shapes are exactly what ADE's AnimateDiffModel (v2, SD1.5) holds: nothing missing,
    nothing unexpected, and ADE reads it as an SD1.5 v2 motion module."""
    module = ade.submodule("animatediff.motion_module_ad")
    shapes = adf.motion_module_shapes()
    stub = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    normalized, info = module.normalize_ad_state_dict(dict(stub), "tiny_mm_sd_v15_v2")
    assert (info.sd_type, info.mm_version) == ("SD1.5", "v2")
    with torch.device("meta"):
        model = module.AnimateDiffModel(normalized, info)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert built == {k: tuple(s) for k, s in shapes.items()}
    assert len([k for k in shapes if k.endswith("proj_in.weight")]) == 8 + 12 + 1  # 21 temporal transformers


# ---------------------------------------------------------------------------------------------------
# (a) the motion module runs and sees every frame of a window


def test_motion_module_changes_the_frames_and_sees_all_frames_of_a_window(comfy, comfy_nodes, ade, motion_model_file,
                                                                          real_width_checkpoint, temporal_calls):
    graph = Graph(comfy_nodes, real_width_checkpoint)
    model = [graph.ckpt, 0]
    graph.sample(graph.ade_model(model, None, context=False), "no_motion")
    graph.sample(graph.ade_model(model, motion_model_file, context=False), "motion")
    latents = graph.run(comfy)
    assert all(torch.isfinite(t).all() for t in latents.values())
    assert (latents["motion"] - latents["no_motion"]).abs().max() > 1e-3
    # without context options every temporal attention sees all FRAMES frames of each cond/uncond chunk
    assert temporal_calls and {length for length, _, _ in temporal_calls} == {FRAMES}
    assert all(rows % FRAMES == 0 and rows // FRAMES in (1, 2) for _, rows, _ in temporal_calls)

    temporal_calls.clear()
    graph = Graph(comfy_nodes, real_width_checkpoint)
    graph.sample(graph.ade_model([graph.ckpt, 0], motion_model_file, context=True), "windows")
    windowed = graph.run(comfy)["windows"]
    assert torch.isfinite(windowed).all()
    # with windows of CONTEXT_LENGTH < FRAMES: every call sees one whole window, and the windows cover the frames
    assert temporal_calls and {length for length, _, _ in temporal_calls} == {CONTEXT_LENGTH}
    assert all(rows % CONTEXT_LENGTH == 0 for _, rows, _ in temporal_calls)
    seen = {tuple(idx) for _, _, idx in temporal_calls}
    assert seen == {tuple(w) for w in windows()}


# ---------------------------------------------------------------------------------------------------
# (b) per-frame conditioning routes by absolute frame index under context windows


def test_per_frame_conditioning_follows_absolute_frames_under_context_windows(comfy, comfy_nodes, ade, motion_model_file,
                                                                             real_width_checkpoint, models_dir, pack,
                                                                             monkeypatch):
    import comfyui_storydiffusion.ipadapter.comfy_adapter as adapter_module
    from comfyui_storydiffusion.ipadapter.weights import IPAdapter, load_ipadapter_file

    comfy_nodes.NODE_CLASS_MAPPINGS["TestFrameEmbeddings"] = fx.TestFrameEmbeddingsNode
    path = fx.write_ipadapter(str(models_dir / "ipadapter" / IPADAPTER_FILE),
                              fx.ipadapter_state_dict(IPADAPTER_WIDTHS, 768, clip_dim=32))
    embeds = fx.frame_embeddings(FRAMES, 32, 0, seed=0)  # what TestFrameEmbeddings(seed 0) gives as image_embeds
    projected = IPAdapter(load_ipadapter_file(path)).project(embeds)

    routed = []
    real_route = adapter_module.route_frames

    def route(cond, uncond, cond_or_uncond, rows, frame_indices=None):
        out = real_route(cond, uncond, cond_or_uncond, rows, frame_indices)
        routed.append((list(cond_or_uncond), None if frame_indices is None else list(frame_indices), out))
        return out

    monkeypatch.setattr(adapter_module, "route_frames", route)
    graph = Graph(comfy_nodes, real_width_checkpoint)
    loader = graph.add("StoryDiffusionIPAdapterLoader", ipadapter_file=IPADAPTER_FILE)
    frames = graph.add("TestFrameEmbeddings", frames=FRAMES, dim=32, tokens=5, seed=0)
    per_frame = graph.add("StoryDiffusionPerFrameSemanticConditioning", model=[graph.ckpt, 0], ipadapter=[loader, 0],
                          clip_vision_output=[frames, 0], weight=1.0, start_percent=0.0, end_percent=1.0)
    graph.sample(graph.ade_model([per_frame, 0], motion_model_file, context=True), "per_frame")
    out = graph.run(comfy)["per_frame"]
    assert torch.isfinite(out).all() and out.shape[0] == FRAMES

    assert routed, "the IP branch never ran"
    assert all(idx is not None and len(idx) == CONTEXT_LENGTH for _, idx, _ in routed), "ADE passed no sub_idxs"
    assert {tuple(idx) for _, idx, _ in routed} == {tuple(w) for w in windows()}
    for roles, idx, tokens in routed:
        for c, role in enumerate(roles):
            if role == "negative":
                continue
            for j, frame in enumerate(idx):
                row = tokens[c * CONTEXT_LENGTH + j].float()
                distances = [(row - projected[k]).abs().max().item() for k in range(FRAMES)]
                assert min(range(FRAMES), key=distances.__getitem__) == frame  # window row j = absolute frame
                assert distances[frame] < 1e-2


# ---------------------------------------------------------------------------------------------------
# (c) Consistent Self-Attention with ADE


def csa_node(graph, model: list) -> list:
    return [graph.add("StoryDiffusionConsistentSelfAttention", model=model, seed=7), 0]


def test_consistent_self_attention_composes_when_all_frames_are_one_window(comfy, comfy_nodes, ade, motion_model_file,
                                                                           real_width_checkpoint, temporal_calls):
    """Without context windows ADE runs every frame in one batch: CSA shares tokens between frames (rows of the
    latent batch) in its spatial self-attention, the motion module mixes them in its temporal attention."""
    graph = Graph(comfy_nodes, real_width_checkpoint, frames=CONTEXT_LENGTH)
    model = [graph.ckpt, 0]
    graph.sample(graph.ade_model(model, motion_model_file, context=False), "ade")
    graph.sample(graph.ade_model(csa_node(graph, model), motion_model_file, context=False), "ade_csa")
    latents = graph.run(comfy)
    assert torch.isfinite(latents["ade_csa"]).all()
    assert (latents["ade_csa"] - latents["ade"]).abs().max() > 1e-3
    assert {length for length, _, _ in temporal_calls} == {CONTEXT_LENGTH}


def test_consistent_self_attention_shares_inside_each_context_window(comfy, comfy_nodes, ade, motion_model_file,
                                                                     real_width_checkpoint, monkeypatch):
    """With context windows ADE calls the model on a window of frames at a time (absolute indices in
    ad_params["sub_idxs"]): CSA maps the call's rows to those frames and shares among them only. An
    identity bank needs every panel in one call and is refused there with a reason."""
    import comfyui_storydiffusion.attention.run as run_module

    seen = []
    real = run_module.context_window
    monkeypatch.setattr(run_module, "context_window", lambda run, batch, extra: seen.append(
        tuple(extra["ad_params"]["sub_idxs"])) or real(run, batch, extra))
    graph = Graph(comfy_nodes, real_width_checkpoint)
    model = [graph.ckpt, 0]
    graph.sample(graph.ade_model(model, motion_model_file, context=True), "ade")
    graph.sample(graph.ade_model(csa_node(graph, model), motion_model_file, context=True), "ade_csa")
    latents = graph.run(comfy)
    assert torch.isfinite(latents["ade_csa"]).all()
    assert (latents["ade_csa"] - latents["ade"]).abs().max() > 1e-3
    assert set(seen) == {tuple(w) for w in windows()}

    bank_graph = Graph(comfy_nodes, real_width_checkpoint)
    write = bank_graph.add("StoryDiffusionIdentityBankWrite", model=csa_node(bank_graph, [bank_graph.ckpt, 0]),
                           storage="cpu", dtype="fp16")
    bank_graph.sample(bank_graph.ade_model([write, 0], motion_model_file, context=True), "bank")
    with pytest.raises(harness.PromptFailed, match="does not work under AnimateDiff context windows"):
        bank_graph.run(comfy)


# ---------------------------------------------------------------------------------------------------
# the workflow (scripts/workflow_specs.py: story_to_video_animatediff)


def _make_workflows():
    import importlib.util
    import sys

    if "make_workflows" not in sys.modules:
        path = os.path.join(adf.REPO, "scripts", "make_workflows.py")
        spec = importlib.util.spec_from_file_location("make_workflows", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_workflows"] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules["make_workflows"]


def test_animatediff_workflow_builds_against_a_server_with_ade(ade, tmp_path, models_dir):
    """A real `main.py --cpu` with this pack and ADE (loaded from a custom_nodes search path, for this server only):
    every node, widget and link of the spec matches /object_info. The built JSON lands in
    test-artifacts/workflows/ (workflows/ once the spec is shipped: then it must be up to date)."""
    make_workflows = _make_workflows()
    name = "story_to_video_animatediff"
    server = harness.ComfyServer(str(tmp_path / "server"), str(models_dir), extra_args=adf.server_args(str(tmp_path)))
    server.start()
    try:
        info = server.get("/object_info")
    finally:
        server.stop()
    assert all(node in info for node in make_workflows.specs.ANIMATEDIFF_NODES), "ADE did not load in the server"
    text = make_workflows.render(make_workflows.build_workflow(name, info))
    workflow = __import__("json").loads(text)
    types = [n["type"] for n in workflow["nodes"]]
    for node in ("StoryDiffusionPerFrameSemanticConditioning", "ADE_UseEvolvedSampling", "KSampler",
                 "StoryDiffusionStoryVideo", "StoryDiffusionVideoCombine"):
        assert node in types
    artifacts = os.path.join(adf.REPO, "test-artifacts", "workflows")
    os.makedirs(artifacts, exist_ok=True)
    with open(os.path.join(artifacts, f"{name}.json"), "w") as f:
        f.write(text)
    shipped = os.path.join(adf.REPO, "workflows", f"{name}.json")
    if make_workflows.WORKFLOWS[name].shipped or os.path.exists(shipped):
        with open(shipped) as f:
            assert f.read() == text, f"workflows/{name}.json is stale: rebuild it from a server with ADE"
