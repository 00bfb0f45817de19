"""Consistent Self-Attention inside ComfyUI: real KSampler runs on tiny SD1.5/SDXL UNets, chunk
layouts, per-run state, composition with other patches, the identity bank and the nodes in a prompt."""
from __future__ import annotations

import os
import re

import pytest
import torch

import tiny_models

STEPS = 2


def make_sd15(seed: int = 1, **kw):
    """tiny_models' SD1.5 layout: transformers at input 1,2,4,5,7,8, middle, output 3-11."""
    return tiny_models.make_model("sd15", seed=seed, **kw)


@pytest.fixture(scope="module")
def sd15():
    return make_sd15()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_models.make_model("sdxl", seed=2)


def conds(family: str, panels: int, seed: int = 0):
    """Per-panel random prompts (a CONDITIONING batch of N) and a negative, matching the tiny models."""
    g = torch.Generator().manual_seed(seed)
    width = 64 if family == "sd15" else 112

    def one():
        extra = {} if family == "sd15" else {"pooled_output": torch.randn(panels, 48, generator=g),
                                            "width": 128, "height": 128}
        return [[torch.randn(panels, 77, width, generator=g), extra]]

    return one(), one()


def ksampler(model, family="sd15", panels=3, seed=5, steps=STEPS, size=8, cfg=4.0, cond_seed=0, first_rows=None):
    """A real nodes.KSampler run; returns the latent samples. first_rows=n: only the first n panels of the
    `panels` prompts (same prompts, and the same noise: KSampler draws it row by row from the seed)."""
    import nodes

    positive, negative = conds(family, panels, cond_seed)
    if first_rows is not None:
        positive, negative = ([[c[:first_rows], extra] for c, extra in cond] for cond in (positive, negative))
        panels = first_rows
    latent = {"samples": torch.zeros(panels, 4, size, size)}
    return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def patch(csa, model, **kw):
    args = dict(rate=0.5, rate_high_res=0.5, window=0, layer_choice="output blocks (official)", custom_layers="",
                start_percent=0.0, end_percent=1.0, official_schedule=False, seed=3, story=None)
    args.update(kw)
    return csa.patch_model(model, **args)


def make_story(panel_chars, identity=None):
    from comfyui_storydiffusion.story.model import Character, Panel, Story

    names = sorted({c for chars in panel_chars for c in chars})
    return Story(characters=tuple(Character(n, f"{n} description") for n in names),
                 panels=tuple(Panel(f"panel {i}", "", tuple(c)) for i, c in enumerate(panel_chars)),
                 identity_panels=identity or {})


# ---------------------------------------------------------------------------------------------------


def test_finds_every_transformer_block(csa, sd15, sdxl):
    layers, high, _ = csa.unet_layers(sd15)
    expected = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]
    assert layers == expected
    assert high == {("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0), ("output", 11, 0)}
    layers, high, _ = csa.unet_layers(sdxl)
    assert ("output", 0, 1) in layers and ("middle", 0, 1) in layers and len(layers) == 2 + 2 * 2 + 2 + 3 * 2 + 3
    assert high == {("input", 4, 0), ("input", 5, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)}


def test_sd15_patched_differs_repeats_and_leaves_the_input_alone(csa, sd15):
    before = ksampler(sd15)
    zero = patch(csa, sd15, rate=0.0, rate_high_res=0.0)
    assert torch.equal(ksampler(zero), before)  # rate 0 == unpatched, bit for bit
    patched = patch(csa, sd15)
    first = ksampler(patched)
    assert (first - before).abs().max() > 1e-3
    assert torch.equal(ksampler(patched), first)  # deterministic
    assert torch.equal(ksampler(sd15), before)  # the input model is untouched
    assert torch.equal(ksampler(patched.clone()), first)  # the patch survives clone()
    other_seed = ksampler(patch(csa, sd15, seed=4))
    assert not torch.equal(other_seed, first)
    late = patch(csa, sd15, start_percent=1.0, end_percent=1.0)  # range that no step falls in
    assert torch.equal(ksampler(late), before)


def test_sdxl_patched_differs_and_repeats(csa, sdxl):
    before = ksampler(sdxl, "sdxl", panels=2)
    patched = patch(csa, sdxl, layer_choice="all blocks", rate_high_res=0.25)
    first = ksampler(patched, "sdxl", panels=2)
    assert (first - before).abs().max() > 1e-3
    assert torch.equal(ksampler(patched, "sdxl", panels=2), first)
    assert torch.equal(ksampler(sdxl, "sdxl", panels=2), before)


def test_window_mode_and_official_schedule_run_deterministically(csa, sd15):
    batch = ksampler(patch(csa, sd15), panels=4)
    window = patch(csa, sd15, window=2)
    w1 = ksampler(window, panels=4)
    assert not torch.equal(w1, batch) and torch.equal(ksampler(window, panels=4), w1)
    official = patch(csa, sd15, official_schedule=True)
    o1 = ksampler(official, panels=4)
    assert not torch.equal(o1, batch) and torch.equal(ksampler(official, panels=4), o1)


def _call_replace(csa, model, rows_q, kinds, sigma=5.0):
    """Call the installed attn1 replace directly, as ComfyUI does, for one layer."""
    layer = ("output", 9, 0)
    replace = model.model_options["transformer_options"]["patches_replace"]["attn1"][layer]
    config = model.model_options["transformer_options"][csa.CONFIG_KEY]
    run = csa.start_run(config, 3, [14.6, 5.0, 0.0])
    q, k, v = rows_q
    extra = {csa.CONFIG_KEY: config, csa.RUN_KEY: run, "cond_or_uncond": kinds, "n_heads": 2,
             "sigmas": torch.full((q.shape[0],), sigma), "attn_precision": None}
    return replace(q, k, v, extra)


def test_chunk_layouts_share_only_inside_a_chunk(csa, sd15):
    """Each chunk of a call gives what it gives alone, whatever cond_or_uncond holds."""
    from comfyui_storydiffusion.common import comfy_adapter as glue

    patched = patch(csa, sd15)
    g = torch.Generator().manual_seed(0)
    data = [[torch.randn(3, 20, 16, generator=g) for _ in range(3)] for _ in range(3)]  # chunk position -> q, k, v
    alone = [_call_replace(csa, patched, data[c], [0]) for c in range(3)]
    for layout in ([1, 0], [0], [1, 0, 0], [0, 1]):
        rows = [torch.cat([data[c][i] for c in range(len(layout))]) for i in range(3)]
        out = _call_replace(csa, patched, rows, layout)
        for c in range(len(layout)):
            torch.testing.assert_close(out[3 * c:3 * c + 3], alone[c], atol=1e-6, rtol=0)
    # and sharing really happens inside a chunk
    plain = glue.comfy_attention({})(*data[0], 2)
    assert (alone[0] - plain).abs().max() > 1e-4


def test_interrupted_run_then_new_run_reproduces(csa, sd15):
    import comfy.model_management
    import comfy.sample

    from comfyui_storydiffusion.attention.bank import IdentityBank

    patched = patch(csa, sd15)
    bank = IdentityBank()
    writer = csa.with_bank(patched, csa.MODE_WRITE, bank)
    positive, negative = conds("sd15", 3)
    latent = torch.zeros(3, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 5)

    def run(model, callback=None):
        return comfy.sample.sample(model, noise, STEPS, 4.0, "euler", "normal", positive, negative, latent,
                                   callback=callback, disable_pbar=True, seed=5)

    clean = run(writer)
    clean_entries = {key: stored.clone() for key, (stored, _) in bank.entries.items()}
    assert len({key[0] for key in clean_entries}) == STEPS
    assert {key[2] for key in clean_entries} == {"positive", "negative"}

    def interrupt(step, *args):
        if step == 1:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(writer, interrupt)
    # no half-written bank: the interrupted rewrite left the bank the first write committed
    assert bank.entries.keys() == clean_entries.keys()
    assert all(torch.equal(bank.entries[key][0], clean_entries[key]) for key in clean_entries)
    assert torch.equal(run(writer), clean)
    assert bank.entries.keys() == clean_entries.keys()
    assert all(torch.equal(bank.entries[key][0], clean_entries[key]) for key in clean_entries)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(patched, interrupt)
    assert torch.equal(run(patched), clean)  # the write mode does not change the images


def test_an_interrupted_write_to_disk_leaves_no_files_and_the_rerun_matches(csa, sd15, monkeypatch, tmp_path):
    import comfy.model_management

    from comfyui_storydiffusion.attention.bank import IdentityBank
    from comfyui_storydiffusion.attention.comfy import lifecycle

    spill = tmp_path / "spill"
    monkeypatch.setattr(lifecycle, "bank_spill_parent", lambda: str(spill))
    patched = patch(csa, sd15)
    in_memory = IdentityBank(keep="memory")
    ksampler(csa.with_bank(patched, csa.MODE_WRITE, in_memory), panels=2, steps=3)
    bank = IdentityBank(keep="disk")
    writer = csa.with_bank(patched, csa.MODE_WRITE, bank)

    def interrupt(step, *args):
        if step == 1:  # step 0 is on disk by then
            raise comfy.model_management.InterruptProcessingException()

    import latent_preview

    monkeypatch.setattr(latent_preview, "prepare_callback", lambda *a, **k: interrupt)  # KSampler's step callback
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        ksampler(writer, panels=2, steps=3)
    assert bank.empty and os.listdir(spill) == []  # no half bank, no step files
    monkeypatch.undo()
    monkeypatch.setattr(lifecycle, "bank_spill_parent", lambda: str(spill))
    ksampler(writer, panels=2, steps=3)
    assert len(bank.files()) == 3 and bank.keys() == in_memory.keys()
    assert all(torch.equal(bank.stored_tokens(s, layer, [role], bank.layer_tokens[layer]),
                           in_memory.stored_tokens(s, layer, [role], in_memory.layer_tokens[layer]))
               for s, layer, role in bank.keys())


def test_story_groups_and_batch_mismatch(csa, sd15):
    plain = ksampler(sd15, panels=4)
    story = make_story([("Ann",), ("Ann",), ("Bob",), ()])
    grouped = ksampler(patch(csa, sd15, story=story), panels=4)
    torch.testing.assert_close(grouped[3], plain[3], atol=1e-5, rtol=0)  # [NC] shares nothing
    torch.testing.assert_close(grouped[2], plain[2], atol=1e-5, rtol=0)  # Bob is alone in his group
    assert (grouped[0] - plain[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="the story has 4 panels but the latent batch has 3"):
        ksampler(patch(csa, sd15, story=story), panels=3)


def test_composes_with_an_attn2_patch_and_an_existing_attn1_replace(csa, sd15):
    calls = []

    def attn2_patch(n, context, value, extra_options):
        calls.append(extra_options["block"])
        return n, context * 1.5, value

    with_attn2 = sd15.clone()
    with_attn2.set_model_attn2_patch(attn2_patch)
    only_attn2 = ksampler(with_attn2)
    only_csa = ksampler(patch(csa, sd15))
    both = ksampler(patch(csa, with_attn2))
    assert calls and not torch.equal(both, only_attn2) and not torch.equal(both, only_csa)

    from comfy.ldm.modules import attention

    seen = []

    def foreign_replace(q, k, v, extra_options):
        seen.append(extra_options["block"])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    foreign = sd15.clone()
    foreign.set_model_attn1_replace(foreign_replace, "output", 9, 0)
    ksampler(patch(csa, foreign, rate=0.0, rate_high_res=0.0))
    assert seen  # our plain path hands over to the replace that was there before


def test_non_unet_models_are_refused(csa, sd15):
    class FakeDiT:
        model = type("M", (), {"diffusion_model": torch.nn.Linear(2, 2)})()

    with pytest.raises(ValueError, match="works on UNet models.*Linear"):
        patch(csa, FakeDiT())
    with pytest.raises(ValueError, match="matches no transformer block"):
        patch(csa, sd15, layer_choice="custom list", custom_layers="output 0")


def test_identity_bank_write_then_read(csa, sd15, tmp_path):
    from comfyui_storydiffusion.attention.bank import IdentityBank

    story = make_story([("Ann",), ("Ann",), ("Ann",), ()], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, story=story)
    bank = IdentityBank()
    ksampler(csa.with_bank(patched, csa.MODE_WRITE, bank), panels=2, cond_seed=1)
    assert bank.panels == (0, 1) and bank.characters == (("Ann",), ("Ann",))
    reader = csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2)
    plain_two = ksampler(sd15, panels=2, cond_seed=2)
    read_two = ksampler(reader, panels=2, cond_seed=2)  # panels 2 (Ann) and 3 ([NC]) at once
    assert (read_two[0] - plain_two[0]).abs().max() > 1e-3
    torch.testing.assert_close(read_two[1], plain_two[1], atol=1e-5, rtol=0)
    assert torch.equal(ksampler(reader, panels=2, cond_seed=2), read_two)
    # one panel at a time gives the same panel (read panels attend to the bank and themselves only)
    # up to the batch-size noise of the CPU kernels, measured on the plain model
    alone = ksampler(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2), panels=2, cond_seed=2, first_rows=1)
    plain_alone = ksampler(sd15, panels=2, cond_seed=2, first_rows=1)
    batch_noise = float((plain_alone[0] - plain_two[0]).abs().max())
    assert alone.shape[0] == 1
    assert float((alone[0] - read_two[0]).abs().max()) <= 2 * batch_noise + 1e-6
    assert float((alone[0] - plain_alone[0]).abs().max()) > 4 * batch_noise  # the bank itself matters far more
    # saved and loaded: same result
    path = tmp_path / "ann.safetensors"
    bank.save(str(path))
    loaded = csa.with_bank(patched, csa.MODE_READ, IdentityBank.load(str(path)), first_panel=2)
    assert torch.equal(ksampler(loaded, panels=2, cond_seed=2), read_two)
    with pytest.raises(ValueError, match="written with 2 sampling steps, this run has 3"):
        ksampler(reader, panels=2, steps=3)
    with pytest.raises(ValueError, match="another resolution"):
        ksampler(reader, panels=2, size=16)
    with pytest.raises(ValueError, match="story panels 3-4 .* the story has 4 panels"):
        ksampler(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=3), panels=2)
    with pytest.raises(ValueError, match="names 2 identity panels"):
        ksampler(csa.with_bank(patched, csa.MODE_WRITE, IdentityBank()), panels=3)


def _same_tokens(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a.stored_tokens(step, layer, [role], a.layer_tokens[layer]),
                    b.stored_tokens(step, layer, [role], b.layer_tokens[layer])) for step, layer, role in a.keys())


def test_bank_write_keeps_the_bank_in_memory_or_on_disk_by_its_projected_size(csa, sd15, monkeypatch, tmp_path):
    """After the first step the projection is the bank's real size. keep 'memory': a limit one byte below it
    refuses the run (nothing written), a limit at it lets the run finish; 'auto' moves the bank to disk instead;
    'disk' always writes one file per step. Banks on disk read, save and load bit-identically; a refused or
    rewritten disk bank leaves no files behind. The limits are shares of the free memory and disk."""
    import psutil

    from comfyui_storydiffusion.attention.bank import IdentityBank
    from comfyui_storydiffusion.attention.comfy import lifecycle

    assert 0 < lifecycle.bank_memory_limit() <= psutil.virtual_memory().total * lifecycle.BANK_MEMORY_SHARE
    assert lifecycle.bank_disk_limit(str(tmp_path / "not" / "yet")) > 0
    spill = tmp_path / "spill"
    monkeypatch.setattr(lifecycle, "bank_spill_parent", lambda: str(spill))
    story = make_story([("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, end_percent=0.7, story=story)

    def write(bank, steps=4):
        ksampler(csa.with_bank(patched, csa.MODE_WRITE, bank), panels=2, steps=steps)
        return bank

    def read(bank):
        return ksampler(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2), panels=1, steps=4, cond_seed=2)

    memory = write(IdentityBank(keep="memory"))
    size = memory.nbytes()
    assert 1 < len({step for step, _, _ in memory.keys()}) < 4  # end_percent leaves steps out; the projection knows

    monkeypatch.setattr(lifecycle, "bank_memory_limit", lambda: size - 1)
    refused = IdentityBank(keep="memory")
    with pytest.raises(ValueError, match=r"would store about .* GiB \(2 identity panels, 4 steps.*nothing was written"
                                         r".*keep to 'disk' or 'auto'"):
        write(refused)
    assert refused.empty
    auto = write(IdentityBank())  # default keep "auto": the same run goes to disk
    assert not auto.entries and len(auto.files()) == len({step for step, _, _ in memory.keys()})
    assert all(path.startswith(str(spill)) for path in auto.files()) and _same_tokens(memory, auto)
    monkeypatch.setattr(lifecycle, "bank_memory_limit", lambda: size)
    assert write(IdentityBank(keep="memory")).nbytes() == size and write(IdentityBank()).files() == []

    disk = write(IdentityBank(keep="disk"))
    assert not disk.entries and _same_tokens(memory, disk)
    assert torch.equal(read(disk), read(memory))
    disk.save(str(tmp_path / "merged.safetensors"))
    assert _same_tokens(memory, IdentityBank.load(str(tmp_path / "merged.safetensors")))
    old_files = disk.files()
    write(disk)  # rewriting a bank on disk replaces its step files
    assert not any(os.path.exists(path) for path in old_files) and _same_tokens(memory, disk)

    monkeypatch.setattr(lifecycle, "bank_disk_limit", lambda folder: size - 1)
    full_disk = IdentityBank(keep="disk")
    with pytest.raises(ValueError, match=r"would store about .* more than the .* GiB of free disk space"):
        write(full_disk)
    assert full_disk.empty
    kept = {os.path.basename(os.path.dirname(path)) for path in auto.files() + disk.files()}
    assert set(os.listdir(spill)) == kept  # the refused run left no folder


# ---------------------------------------------------------------------------------------------------
# the nodes in a ComfyUI prompt


def _prompt(ckpt, extra):
    base = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a girl with red hair"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "csa": {"class_type": "StoryDiffusionConsistentSelfAttention",
                "inputs": {"model": ["ckpt", 0], "rate": 0.5, "rate_high_res": 0.5, "window_size": 0,
                           "layers": "all blocks", "custom_layers": "", "start_percent": 0.0, "end_percent": 1.0,
                           "schedule": "every step", "seed": 1}},
    }
    base.update(extra)
    return base


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sampler(model, batch, latent_id):
    return {
        f"empty_{latent_id}": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        latent_id: {"class_type": "KSampler", "inputs": {"model": model, "positive": ["pos", 0], "negative": ["neg", 0],
                                                         "latent_image": [f"empty_{latent_id}", 0], "seed": 3, "steps": 2,
                                                         "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                                                         "denoise": 1.0}},
        f"save_{latent_id}": {"class_type": "SaveLatent", "inputs": {"samples": [latent_id, 0],
                                                                     "filename_prefix": f"csa/{latent_id}"}},
    }


def _latent(output_dir, outputs, node):
    import safetensors.torch

    item = outputs[node]["latents"][0]
    return safetensors.torch.load_file(os.path.join(output_dir, item["subfolder"], item["filename"]))["latent_tensor"]


def test_nodes_in_a_prompt_write_save_load_read(comfy, comfy_nodes, checkpoint_files, models_dir, output_dir, pack):
    ckpt = checkpoint_files("sd15")
    ids = pack.NODE_CLASS_MAPPINGS
    for node_id in ("StoryDiffusionConsistentSelfAttention", "StoryDiffusionIdentityBankWrite",
                    "StoryDiffusionIdentityBankRead", "StoryDiffusionSaveIdentityBank", "StoryDiffusionLoadIdentityBank"):
        cls = ids[node_id]
        assert cls.CATEGORY.startswith("StoryDiffusion/") and cls.DESCRIPTION
        inputs = cls.INPUT_TYPES()
        for group in inputs.values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"

    write = {"write": {"class_type": "StoryDiffusionIdentityBankWrite",
                       "inputs": {"model": ["csa", 0], "storage": "cpu", "dtype": "fp16"}},
             "read": {"class_type": "StoryDiffusionIdentityBankRead",
                      "inputs": {"model": ["csa", 0], "bank": ["write", 1], "first_panel": 2, "after": ["ident", 0]}},
             "savebank": {"class_type": "StoryDiffusionSaveIdentityBank",
                          "inputs": {"bank": ["write", 1], "filename_prefix": "banks/hero", "after": ["ident", 0]}}}
    write.update(_sampler(["write", 0], 2, "ident"))
    write.update(_sampler(["read", 0], 1, "panel"))
    write.update(_sampler(["ckpt", 0], 1, "plain"))
    outputs = comfy.run(_prompt(ckpt, write))
    panel, plain = _latent(output_dir, outputs, "save_panel"), _latent(output_dir, outputs, "save_plain")
    assert (panel - plain).abs().max() > 1e-3

    (saved,) = outputs["savebank"]["text"]  # saved where the loader looks: no file to move by hand
    assert saved == "banks/hero_00001_.safetensors"
    assert saved in pack.NODE_CLASS_MAPPINGS["StoryDiffusionLoadIdentityBank"].INPUT_TYPES()["required"]["bank_name"][0]
    assert oct((models_dir / "storydiffusion" / saved).stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    load = {"load": {"class_type": "StoryDiffusionLoadIdentityBank", "inputs": {"bank_name": saved,
                                                                               "storage": "cpu"}},
            "read": {"class_type": "StoryDiffusionIdentityBankRead",
                     "inputs": {"model": ["csa", 0], "bank": ["load", 0], "first_panel": 2}}}
    load.update(_sampler(["read", 0], 1, "panel"))
    again = _latent(output_dir, comfy.run(_prompt(ckpt, load)), "save_panel")
    assert torch.equal(again, panel)

    # keep "disk": the bank goes to step files in ComfyUI's temp folder and reads the same
    import folder_paths

    on_disk = {key: dict(value, inputs=dict(value["inputs"])) for key, value in write.items() if key != "savebank"}
    on_disk["write"]["inputs"]["keep"] = "disk"
    spill = os.path.join(folder_paths.get_temp_directory(), "storydiffusion_banks")
    before = set(os.listdir(spill)) if os.path.isdir(spill) else set()
    from_disk = _latent(output_dir, comfy.run(_prompt(ckpt, on_disk)), "save_panel")
    assert torch.equal(from_disk, panel)
    (folder,) = set(os.listdir(spill)) - before
    assert min(os.listdir(os.path.join(spill, folder))) == "step0000.safetensors"

    import harness

    bad = _prompt(ckpt, {"write": {"class_type": "StoryDiffusionIdentityBankWrite",
                                   "inputs": {"model": ["ckpt", 0], "storage": "cpu", "dtype": "fp16"}}})
    bad.update(_sampler(["write", 0], 1, "ident"))
    with pytest.raises(harness.PromptFailed, match=re.escape("connect the MODEL output of 'Consistent Self-Attention (StoryDiffusion)'")):
        comfy.run(bad)
