"""Consistent Self-Attention at the edges: second-order samplers, DualCFGGuider, identity panels that
are not first in the story, and what the identity bank stores."""
from __future__ import annotations

import pytest
import torch

import tiny_models
from test_attention_comfy import STEPS, conds, ksampler, make_story, patch


@pytest.fixture(scope="module")
def sd15():
    return tiny_models.make_model("sd15", seed=1)


def record_steps(csa, monkeypatch):
    """(sigma, step) of every model call, as the patch maps it (one entry per call, not per layer)."""
    seen = []
    real = csa.RunState.step_of

    def step_of(self, sigma):
        step = real(self, sigma)
        if not seen or seen[-1][2] is not self or seen[-1][:2] != (sigma, step):
            seen.append((sigma, step, self))
        return step

    monkeypatch.setattr(csa.RunState, "step_of", step_of)
    return seen


def test_second_order_calls_at_the_next_sigma_belong_to_their_step(csa, sd15, monkeypatch):
    """Heun evaluates the model at sigmas[i] and again at exactly sigmas[i+1] for step i; by sigma
    alone the second call looks like step i+1. Write and read runs must both call it step i."""
    from comfyui_storydiffusion.attention.bank import IdentityBank

    seen = record_steps(csa, monkeypatch)
    story = make_story([("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, story=story)
    bank = IdentityBank(dtype="fp32")
    import nodes

    def heun(model, panels, cond_seed):
        positive, negative = conds("sd15", panels, cond_seed)
        latent = {"samples": torch.zeros(panels, 4, 8, 8)}
        return nodes.KSampler().sample(model, 5, STEPS, 4.0, "heun", "normal", positive, negative, latent)[0]["samples"]

    heun(csa.with_bank(patched, csa.MODE_WRITE, bank), 2, 1)
    write_steps = [step for _, step, _ in seen]
    # STEPS=2: step 0 at s0 and s1, step 1 at s1 (Heun's last step, to sigma 0, is a single evaluation)
    assert write_steps == [0, 0, 1], seen
    assert sorted({key[0] for key in bank.keys()}) == [0, 1]
    seen.clear()
    heun(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2), 1, 2)
    assert [step for _, step, _ in seen] == [0, 0, 1]
    # the same sigma twice in a row: first the correction of step 0, then step 1
    assert seen[1][0] == seen[2][0]


def test_evaluations_map_to_steps_for_first_and_second_order_samplers(csa):
    sigmas = (10.0, 5.0, 2.0, 0.0)

    def steps(sampler, evaluations):
        """evaluations: sigma, or "cb" for the sampler's callback (fired after a step's first evaluation)."""
        run = csa.RunState(sigmas, (0,), torch.zeros(1, 1, dtype=torch.bool), sampler=sampler)
        out = []
        for item in evaluations:
            if item == "cb":
                run.report(out[-1])
            else:
                run.start_evaluation(item)
                out.append(run.step_of(item))
        return out

    assert steps("sample_euler", [10.0, "cb", 5.0, "cb", 2.0, "cb"]) == [0, 1, 2]
    assert steps("sample_heun", [10.0, "cb", 5.0, 5.0, "cb", 2.0, 2.0, "cb"]) == [0, 0, 1, 1, 2]
    assert steps("sample_heunpp2", [10.0, "cb", 5.0, 2.0, 5.0, "cb", 2.0, 2.0, "cb"]) == [0, 0, 0, 1, 1, 2]
    assert steps("sample_dpm_2", [10.0, "cb", 7.0, 5.0, "cb", 3.0, 2.0, "cb"]) == [0, 0, 1, 1, 2]
    run = csa.RunState(sigmas, (0,), torch.zeros(1, 1, dtype=torch.bool))
    assert run.step_of(5.0) == 1  # no evaluation reported (a call outside the sampler loop): by sigma


def dual_cfg_sample(model, panels=2, cond_seed=0, seed=5):
    """Sample with core DualCFGGuider, whose model calls carry chunks (negative, middle, positive)."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    positive, negative = conds("sd15", panels, cond_seed)
    middle, _ = conds("sd15", panels, cond_seed + 100)
    guider = Guider_DualCFG(model)
    guider.set_conds(positive, middle, negative)
    guider.set_cfg(3.0, 2.0)
    latent = torch.zeros(panels, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=seed)


def test_dual_cfg_guider_batch_and_bank(csa, sd15):
    from comfyui_storydiffusion.attention.bank import BankError, IdentityBank

    plain = dual_cfg_sample(sd15)
    assert torch.equal(dual_cfg_sample(patch(csa, sd15, rate=0.0, rate_high_res=0.0)), plain)
    shared = dual_cfg_sample(patch(csa, sd15))
    assert (shared - plain).abs().max() > 1e-4 and torch.equal(dual_cfg_sample(patch(csa, sd15)), shared)

    story = make_story([("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, story=story)
    bank = IdentityBank()
    dual_cfg_sample(csa.with_bank(patched, csa.MODE_WRITE, bank))
    assert {key[2] for key in bank.keys()} == {"negative", "middle", "positive"}
    reader = csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2)
    read = dual_cfg_sample(reader, panels=1, cond_seed=3)
    assert torch.equal(dual_cfg_sample(reader, panels=1, cond_seed=3), read)
    alone = dual_cfg_sample(sd15, panels=1, cond_seed=3)
    assert (read - alone).abs().max() > 1e-4  # the bank is read

    cfg_bank = IdentityBank()
    ksampler(csa.with_bank(patched, csa.MODE_WRITE, cfg_bank), panels=2)
    with pytest.raises(BankError, match="no middle pass"):
        dual_cfg_sample(csa.with_bank(patched, csa.MODE_READ, cfg_bank, first_panel=2), panels=1)


def test_dual_cfg_guider_with_per_frame_conditioning(pack, sd15, comfy_nodes):
    """Per-frame IP-Adapter conditioning under DualCFGGuider: chunk 0 is the negative pass there."""
    import ipadapter_fixtures as fx
    from comfyui_storydiffusion.ipadapter import comfy_adapter as ipa

    groups = fx.tiny_ipadapter("sd15")
    embeds = fx.frame_embeddings(2, 32, seed=1)
    seen = []
    model = ipa.apply_per_frame_ipadapter(sd15, groups, embeds, None, 1.0, 0.0, 1.0)
    real = ipa.route_frames
    try:
        ipa.route_frames = lambda cond, uncond, roles, *a, **k: seen.append(list(roles)) or real(cond, uncond, roles, *a, **k)
        out = dual_cfg_sample(model)
    finally:
        ipa.route_frames = real
    assert seen and all(sorted(roles) == ["middle", "negative", "positive"] for roles in seen)
    assert (out - dual_cfg_sample(sd15)).abs().max() > 1e-4
    assert torch.equal(dual_cfg_sample(ipa.apply_per_frame_ipadapter(sd15, groups, embeds, None, 0.0, 0.0, 1.0)),
                       dual_cfg_sample(sd15))


def test_the_bank_stores_the_hidden_states_the_batch_attended_to(csa, sd15):
    """fp32 bank: each entry is exactly the sampled rows of the hidden states entering attn1 at that
    step, layer and chunk (seen by another pack's attn1 patch in the same run)."""
    from comfyui_storydiffusion.attention import core
    from comfyui_storydiffusion.attention.bank import IdentityBank
    from comfyui_storydiffusion.attention.schedule import layer_ordinal

    layer = ("output", 9, 0)
    captured = {}

    def spy(n, context, value, extra_options):
        block = extra_options["block"]
        if (block[0], block[1], extra_options["block_index"]) == layer:
            captured.setdefault(float(extra_options["sigmas"][0]), (context.clone(), list(extra_options["cond_or_uncond"])))
        return n, context, value

    story = make_story([("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, story=story)
    spied = patched.clone()
    spied.set_model_attn1_patch(spy)
    bank = IdentityBank(dtype="fp32")
    ksampler(csa.with_bank(spied, csa.MODE_WRITE, bank), panels=2, cond_seed=1)
    config = csa.config_of(patched)
    for step, sigma in enumerate(bank.sample_sigmas[:-1]):
        hidden, kinds = captured[min(captured, key=lambda s: abs(s - sigma))]  # chunks in cond_or_uncond order
        tokens = hidden.shape[1]
        sampled = core.sample_panel_tokens(tokens, config.rate_high_res, config.seed, step, layer_ordinal(layer), (0, 1))
        roles = [("positive", "negative")[k] for k in kinds]
        stored = bank.stored_tokens(step, layer, roles, tokens)
        for chunk in range(len(kinds)):
            for panel in range(2):
                assert torch.equal(stored[chunk, panel], hidden[chunk * 2 + panel, sampled[panel]])


def test_identity_panels_anywhere_in_one_read_chain(comfy, checkpoint_files):
    """`Mia, Leo, [NC], Mia, Leo, Mia` with identity panels 0,1,3,4: one graph writes the bank from the
    identity panels, reads it for panels 2 and 5, and puts all six back in story order."""
    characters = "[Mia] a girl with red hair\n[Leo] an old man with a beard"
    panels = ("[Mia] at a bus stop\n[Leo] reads a paper\n[NC] rain on the street\n"
              "[Mia] runs for the bus\n[Leo] waves\n[Mia] smiles")

    def select(choice):
        return {"class_type": "StoryDiffusionSelectPanels", "inputs": {
            "positive": ["story", 0], "negative": ["story", 1], "story": ["story", 3], "select": choice,
            "first_panel": 0, "count": 0}}

    def sampler(model, selection, seed):
        return {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [selection, 0], "negative": [selection, 1], "seed": seed, "steps": 2, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "normal", "latent_image": [f"empty_{selection}", 0], "denoise": 1.0}}

    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_files("sd15")}},
        "story": {"class_type": "StoryDiffusionStory", "inputs": {
            "clip": ["ckpt", 1], "characters": characters, "panels": panels, "style": "(No style)", "negative": "",
            "identity_panels": 2}},
        "csa": {"class_type": "StoryDiffusionConsistentSelfAttention", "inputs": {
            "model": ["ckpt", 0], "rate": 0.5, "rate_high_res": 0.5, "window_size": 0, "layers": "all blocks",
            "custom_layers": "", "start_percent": 0.0, "end_percent": 1.0, "schedule": "every step", "seed": 1,
            "story": ["story", 3]}},
        "ids": select("identity panels"),
        "rest": select("panels that are not identity panels"),
        "empty_ids": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "empty_rest": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "write": {"class_type": "StoryDiffusionIdentityBankWrite", "inputs": {"model": ["csa", 0], "storage": "cpu",
                                                                             "dtype": "fp8"}},
        "sample_ids": sampler(["write", 0], "ids", 1),
        "read": {"class_type": "StoryDiffusionIdentityBankRead", "inputs": {
            "model": ["csa", 0], "bank": ["write", 1], "first_panel": 0, "after": ["sample_ids", 0],
            "panels": ["rest", 4]}},
        "sample_rest": sampler(["read", 0], "rest", 2),
        "decode_ids": {"class_type": "VAEDecode", "inputs": {"samples": ["sample_ids", 0], "vae": ["ckpt", 2]}},
        "decode_rest": {"class_type": "VAEDecode", "inputs": {"samples": ["sample_rest", 0], "vae": ["ckpt", 2]}},
        "order": {"class_type": "StoryDiffusionStoryOrder", "inputs": {
            "images_a": ["decode_ids", 0], "panels_a": ["ids", 4], "images_b": ["decode_rest", 0],
            "panels_b": ["rest", 4], "allow_gaps": False}},
        "count": {"class_type": "PreviewAny", "inputs": {"source": ["order", 1]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["order", 0], "filename_prefix": "anywhere"}},
    }
    outputs = comfy.run(prompt)
    assert list(outputs["count"]["text"]) == ["6"] and len(outputs["save"]["images"]) == 6
    # the read rows are story panels 2 ([NC]: reads nothing) and 5 (Mia: reads Mia's identity panels)
    prompt["read"]["inputs"].pop("panels")
    prompt["read"]["inputs"]["first_panel"] = 5
    import harness

    with pytest.raises(harness.PromptFailed, match="read run covers story panels 5-6"):
        comfy.run(prompt)
