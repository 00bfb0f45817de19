"""The shared workflows, one spec each: which nodes, widget values and links (workflow_builder.py lays
them out and checks them against `/object_info`). Adding a workflow = a function here + a WORKFLOWS
entry; `python scripts/make_workflows.py` writes workflows/<name>.json.

Each spec is a function `build(b: WorkflowBuilder)`; `WORKFLOWS` also records the model files a
workflow references (the tests write tiny random files with exactly those names).
"""
from __future__ import annotations

from dataclasses import dataclass

from workflow_builder import ModelFile, Workflow, WorkflowBuilder, sample_and_decode

SD15_CHECKPOINT = ModelFile("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors", "sd15")
SDXL_CHECKPOINT = ModelFile("checkpoints", "sd_xl_base_1.0.safetensors", "sdxl")


def core_sd15(b: WorkflowBuilder) -> None:
    """ComfyUI core nodes only: proves the browser harness independently of the pack."""
    ckpt = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": SD15_CHECKPOINT})
    latent = b.add("EmptyLatentImage", 0, {"width": 64, "height": 64, "batch_size": 1})
    pos = b.add("CLIPTextEncode", 1, {"text": "a red fox reading a comic"})
    neg = b.add("CLIPTextEncode", 1, {"text": "blurry"})
    sampler = b.add("KSampler", 2, {"seed": 42, "steps": 2, "cfg": 5.0})
    decode = b.add("VAEDecode", 3)
    save = b.add("SaveImage", 3, {"filename_prefix": "core_sd15"})
    b.connect(ckpt, "CLIP", pos, "clip")
    b.connect(ckpt, "CLIP", neg, "clip")
    sample_and_decode(b, sampler, decode, model=(ckpt, "MODEL"), positive=(pos, 0),
                      negative=(neg, 0), latent=(latent, 0), vae=(ckpt, "VAE"))
    b.connect(decode, 0, save, "images")


def _story_to_page(b: WorkflowBuilder, model_out: tuple, clip_out: tuple, vae_out: tuple, story_widgets: dict,
                   prefix: str, size: tuple[int, int], page_widgets: dict, sampler_widgets: dict,
                   csa_widgets: dict | None = None, *, latent_node: str = "EmptyLatentImage",
                   guidance: float | None = None) -> int:
    """Story -> consistent attention -> one KSampler over all panels -> comic page (shared by the specs).
    `size` = (width, height) of every panel, `sampler_widgets` the KSampler's steps, cfg, sampler and scheduler.
    DiTs pass their latent node (EmptySD3LatentImage: 16 channels), cfg 1 and, for Flux dev, a Flux Guidance."""
    story = b.add("StoryDiffusionStory", 1, story_widgets, width=420)
    csa = b.add("StoryDiffusionConsistentSelfAttention", 1, dict({"seed": 7}, **(csa_widgets or {})))
    positive = (story, "positive")
    if guidance is not None:
        flux_guidance = b.add("FluxGuidance", 2, {"guidance": guidance})
        b.connect(story, "positive", flux_guidance, "conditioning")
        positive = (flux_guidance, 0)
    latent = b.add(latent_node, 2, {"width": size[0], "height": size[1]})
    sampler = b.add("KSampler", 2, dict({"seed": 42}, **sampler_widgets))
    decode = b.add("VAEDecode", 3)
    page = b.add("StoryDiffusionComicPage", 3, page_widgets)
    save = b.add("SaveImage", 4, {"filename_prefix": prefix})
    b.connect(*clip_out, story, "clip")
    b.connect(*model_out, csa, "model")
    b.connect(story, "story", csa, "story")
    b.connect(story, "panel_count", latent, "batch_size")
    sample_and_decode(b, sampler, decode, model=(csa, "model"), positive=positive,
                      negative=(story, "negative"), latent=(latent, 0), vae=vae_out)
    b.connect(decode, 0, page, "images")
    b.connect(story, "captions", page, "captions")
    b.connect(page, "pages", save, "images")
    return story


# Real settings (issue 21): every shipped workflow carries what a user of its model family would pick for a good
# first result, and a panel or frame count that fits a 24 GB card, said in its note. The tests run the same files on
# tiny random models: they set the sizes, steps and frame counts themselves (tests/workflow_sizes.py) and check
# that no shipped file keeps test values (tests/test_shipped_workflows.py).
# VRAM figures in the notes: the public files' sizes (weights as loaded) plus ComfyUI's own estimate of one sampling
# step's activations (model_base.memory_required: latent rows x latent pixels x 2 bytes x 0.01 x the model's
# memory_usage_factor, in MB; rows = panels or frames x 2 with cfg, x 1 for cfg-distilled models). ComfyUI unloads a
# text encoder when the diffusion model needs its room. Estimates, not measurements: no real weights run in CI.
SD15_SIZE = 512  # SD1.5's training resolution
SD15_SAMPLER = {"steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
SDXL_SIZE = 1024  # SDXL's training resolution (768 for many panels on one batch)
SDXL_SAMPLER = {"steps": 30, "cfg": 5.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}  # cfg 5: StoryDiffusion's
SD15_SIZE_NOTE = (
    "**Settings:** 512×512 (SD1.5's own size), KSampler 25 steps, cfg 7, dpmpp_2m / karras. **VRAM:** the "
    "checkpoint is about 2 GB; one step over four panels (cond + uncond: 8 latent rows at 64×64) about 0.7 GB more: "
    "a 24 GB card takes the four panels at once with a wide margin, and up to 8 in one batch (the Story node warns "
    "above 8: longer stories go through the identity bank, see the *Two characters, twelve panels* template).")


def comic_sd15(b: WorkflowBuilder) -> None:
    """Story -> Consistent Self-Attention -> KSampler -> comic page, on any SD1.5 checkpoint."""
    b.note("## StoryDiffusion comic (SD1.5)\nOne line per panel in **Story**; `[Name]` puts a character in "
           "a panel. Consistent Self-Attention shares tokens between panels so faces and clothes match.\n\n"
           "Checkpoint: any SD1.5 model in `models/checkpoints`.\n\n" + SD15_SIZE_NOTE, 0, height=380)
    ckpt = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": SD15_CHECKPOINT})
    _story_to_page(b, (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE"), {"style": "Comic book"}, "storydiffusion/comic_sd15",
                   (SD15_SIZE, SD15_SIZE), {"layout": "classic comic", "page_width": 512}, SD15_SAMPLER)


STORY_CHARACTERS = ("[Mia] a young woman with short red hair, green raincoat\n"
                    "[Leo] an old man with a white beard, blue sweater")
# Identity panels first: with identity_panels=2 the story's identity panels are 0-3 (Mia, Mia, Leo, Leo), so
# the identity run ("identity panels") and the story run ("panel range" from panel 4 to the end) together
# cover every panel once, and joining their images (identity first) gives the story order.
STORY_PANELS = ("[Mia] wakes up in a small attic room # Monday.\n"
                "[Mia] drinks coffee by the window # Rain again.\n"
                "[Leo] walks his dog in the rain # Same as every day.\n"
                "[Leo] buys a newspaper at the kiosk\n"
                "[NC] a rainy city street at dawn\n"
                "[Mia] waits at a bus stop with an umbrella\n"
                "[Mia] and [Leo] share the umbrella # \"Is this seat taken?\"\n"
                "[NC] a red bus driving through puddles\n"
                "[Mia] and [Leo] laugh on the bus\n"
                "[Leo] shows a photo of his dog # His name is Biscuit.\n"
                "[Mia] waves goodbye at her stop # See you tomorrow!\n"
                "[NC] the sun breaks through the clouds over the city # The End.")
STORY_IDENTITY_PANELS = 2  # per character
STORY_IDENTITY_BATCH = 4  # 2 characters x 2: panels 0-3
STORY_RUN_FIRST_PANEL = STORY_IDENTITY_BATCH  # the story run samples panels 4-11 (count 0 = to the end)


@dataclass
class IdentityRun:
    """The nodes both identity-bank stories start with: checkpoint, Story, Consistent Self-Attention, and the identity
    run (Select Story Panels -> Identity Bank Write -> KSampler -> VAE Decode)."""
    ckpt: int
    story: int
    csa: int
    select: int
    write: int
    latent: int
    sampler: int
    decode: int


def _add_identity_run(b: WorkflowBuilder, select_title: str) -> IdentityRun:
    """The twelve-panel story (STORY_*) and its identity run's nodes; wire them with _wire_identity_run."""
    ckpt = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": SD15_CHECKPOINT})
    story = b.add("StoryDiffusionStory", 1, {"characters": STORY_CHARACTERS, "panels": STORY_PANELS,
                                             "identity_panels": STORY_IDENTITY_PANELS, "style": "Japanese Anime"},
                  width=420)
    csa = b.add("StoryDiffusionConsistentSelfAttention", 1, {"seed": 7, "window_size": 4})
    select = b.add("StoryDiffusionSelectPanels", 2, {"select": "identity panels"}, title=select_title)
    write = b.add("StoryDiffusionIdentityBankWrite", 2)
    latent = b.add("EmptyLatentImage", 2, {"width": SD15_SIZE, "height": SD15_SIZE}, title="Identity panels latent")
    sampler = b.add("KSampler", 2, dict({"seed": 42}, **SD15_SAMPLER), title="KSampler (identity run)")
    decode = b.add("VAEDecode", 2, title="VAE Decode (identity run)")
    return IdentityRun(ckpt, story, csa, select, write, latent, sampler, decode)


def _wire_identity_run(b: WorkflowBuilder, run: IdentityRun, story_select: int) -> None:
    """Story -> CSA; the Story's batches into both Select Story Panels; the identity run sampled through Identity Bank
    Write."""
    b.connect(run.ckpt, "CLIP", run.story, "clip")
    b.connect(run.ckpt, "MODEL", run.csa, "model")
    b.connect(run.story, "story", run.csa, "story")
    for select in (run.select, story_select):
        b.connect(run.story, "positive", select, "positive")
        b.connect(run.story, "negative", select, "negative")
        b.connect(run.story, "story", select, "story")
    b.connect(run.csa, "model", run.write, "model")
    b.connect(run.select, "panel_count", run.latent, "batch_size")
    sample_and_decode(b, run.sampler, run.decode, model=(run.write, "model"), positive=(run.select, "positive"),
                      negative=(run.select, "negative"), latent=(run.latent, 0), vae=(run.ckpt, "VAE"))



def story_characters(b: WorkflowBuilder) -> None:
    """Two characters, [NC] panels, 12 panels: the identity run samples only the identity panels and writes the
    identity bank; the story run samples only the other panels and reads it; the page joins both runs."""
    b.note("## Two characters, twelve panels, identity bank\nEach character is defined once (`[Name] description`); "
           "`[NC]` panels show no character and share nothing. The panels are sampled in two smaller runs instead of "
           "one batch of twelve, so memory grows with the identity panels, not with the story.\n\n"
           "**1. Identity run (panels 1–4):** **Select Story Panels** (`identity panels`) picks the first "
           "**identity_panels** panels of each character (put them first in the story) and their batch size; they are "
           "sampled together with **Identity Bank Write**, which stores the tokens they share.\n\n"
           "**2. Story run (panels 5–12):** **Select Story Panels** (`panel range`, first_panel 4, count 0 = to the "
           "end) picks the other panels; its `first_panel` tells **Identity Bank Read** which story panel each latent "
           "is, so every panel attends to the stored tokens of its characters. Its `after` input (the identity "
           "LATENT) runs the identity run first. Lower `count` and raise `first_panel` to sample a few panels at a "
           "time.\n\n**Page:** Batch Images joins both runs in story order (identity panels first), Comic Page "
           "captions them. **Save Identity Bank** keeps the characters for another session (Load Identity Bank).\n\n"
           "**Settings:** 512×512 (SD1.5's own size), both KSamplers 25 steps, cfg 7, dpmpp_2m / karras. **VRAM:** the "
           "checkpoint is about 2 GB; a step of the story run (8 panels, cond + uncond) about 1.3 GB more, of the "
           "identity run (4 panels) 0.7 GB: far below 24 GB. The bank lives in RAM (storage cpu): 4 identity images × "
           "25 steps in fp16 ≈ 1.3 GB. On a small card lower `count` in the story run's Select Story Panels and raise "
           "`first_panel` to sample a few panels at a time.", 0, height=760, width=380)
    run = _add_identity_run(b, "Select Story Panels (identity run)")  # identity run
    ckpt, story, csa, write = run.ckpt, run.story, run.csa, run.write
    identity_sampler, identity_decode = run.sampler, run.decode
    # story run: another seed, else its first panels would start from the identity panels' noise
    story_select = b.add("StoryDiffusionSelectPanels", 3, {"select": "panel range", "first_panel": STORY_RUN_FIRST_PANEL,
                                                          "count": 0}, title="Select Story Panels (story run)")
    read = b.add("StoryDiffusionIdentityBankRead", 3)
    latent = b.add("EmptyLatentImage", 3, {"width": SD15_SIZE, "height": SD15_SIZE}, title="Story panels latent")
    sampler = b.add("KSampler", 3, dict({"seed": 43}, **SD15_SAMPLER), title="KSampler (story run)")
    decode = b.add("VAEDecode", 3, title="VAE Decode (story run)")
    # page
    panels = b.add("StoryDiffusionBatchImages", 4, title="Batch Images (identity + story panels)")
    page = b.add("StoryDiffusionComicPage", 4, {"layout": "grid", "rows": 3, "columns": 4, "page_width": 768})
    save = b.add("SaveImage", 4, {"filename_prefix": "storydiffusion/story_characters"})
    save_bank = b.add("StoryDiffusionSaveIdentityBank", 4, {"filename_prefix": "storydiffusion/story_characters_bank"})

    _wire_identity_run(b, run, story_select)
    b.connect(csa, "model", read, "model")
    b.connect(write, "bank", read, "bank")
    b.connect(story_select, "first_panel", read, "first_panel")
    b.connect(identity_sampler, 0, read, "after")
    b.connect(story_select, "panel_count", latent, "batch_size")
    sample_and_decode(b, sampler, decode, model=(read, "model"), positive=(story_select, "positive"),
                      negative=(story_select, "negative"), latent=(latent, 0), vae=(ckpt, "VAE"))
    b.connect(identity_decode, 0, panels, "image1")
    b.connect(decode, 0, panels, "image2")
    b.connect(panels, 0, page, "images")
    b.connect(story, "captions", page, "captions")
    b.connect(page, "pages", save, "images")
    b.connect(write, "bank", save_bank, "bank")
    b.connect(identity_sampler, 0, save_bank, "after")


# ComfyUI-Distributed (robertvoy, another pack): the nodes story_distributed needs from it
DISTRIBUTED_NODES = ("DistributedSeed", "DistributedCollector")
DISTRIBUTED_PARTICIPANTS = 2  # the master and one worker: the smallest set-up; the note says to change it


def story_distributed(b: WorkflowBuilder) -> None:
    """The Two characters, twelve panels story on several machines (ComfyUI-Distributed): every machine writes the
    identity bank and samples its share of the other panels; the Collector and Panels In Story Order join them."""
    b.note("## Story on several machines (ComfyUI-Distributed)\nNeeds the **ComfyUI-Distributed** pack (robertvoy) "
           "on the master and every worker; its nodes here: **Distributed Seed** and **Distributed Collector**. "
           "Start the workers (its sidebar panel: add, launch, enable them; same checkpoint on every machine), then "
           "queue from the master: it sends this prompt to the master and to every enabled worker that answers.\n\n"
           "**1. Identity run, on every machine:** each machine samples the identity panels (panels 1–4) with the same "
           "seed and writes the identity bank itself: the same bank everywhere, no file to copy. (Or save it once "
           "with Save Identity Bank into a `models/storydiffusion` folder every machine sees through "
           "`extra_model_paths.yaml`, and give the workers Load Identity Bank.)\n\n"
           "**2. Story run, split:** **Select Story Panels** gives each machine its share of panels 5–12: set "
           "**participants** to the master plus the enabled workers (saved: 2). **Distributed Seed** tells each "
           "machine which share is its own: keep its seed at **0** and *fixed* (master 0, workers 1, 2, …). Its "
           "`latent` output starts every panel from the noise of its story index, so the panels do not depend on the "
           "split.\n\n**3. On the master:** **Distributed Collector** gathers the shares (master first, then the "
           "workers: story order), **Panels In Story Order** adds the identity panels, Comic Page lays them out. A "
           "worker that is offline when the run starts is skipped: the run then stops at Panels In Story Order "
           "naming the missing panels; nothing is saved.\n\n**Does not fan out:** whole-batch sharing (the *Comic "
           "page* templates, every panel in one batch) is one sampling: run it on one machine.\n\n"
           f"**Settings:** {SD15_SIZE}×{SD15_SIZE} (SD1.5's own size), both KSamplers {SD15_SAMPLER['steps']} steps, "
           f"cfg {SD15_SAMPLER['cfg']:g}, dpmpp_2m / karras. **VRAM per machine:** the checkpoint is about 2 GB; a step "
           "of the identity run (4 panels, cond + uncond) about 0.7 GB more, of a share (4 panels with 2 machines) "
           "the same: far below 24 GB. The bank lives in RAM (storage cpu): ≈ 1.3 GB per machine.",
           0, height=900, width=400)
    run = _add_identity_run(b, "Select Story Panels (identity run, every machine)")  # identity run: on every machine
    ckpt, story, csa, write = run.ckpt, run.story, run.csa, run.write
    identity_select, identity_sampler, identity_decode = run.select, run.sampler, run.decode
    # story run: this machine's share
    participant = b.add("DistributedSeed", 3, {"seed": 0}, title="Distributed Seed (which machine: keep 0, fixed)")
    story_select = b.add("StoryDiffusionSelectPanels", 3, {"select": "panels that are not identity panels",
                                                          "participants": DISTRIBUTED_PARTICIPANTS},
                         title="Select Story Panels (this machine's share)")
    panel_latent = b.add("EmptyLatentImage", 3, {"width": SD15_SIZE, "height": SD15_SIZE, "batch_size": 1},
                         title="Panel size (one latent)")
    read = b.add("StoryDiffusionIdentityBankRead", 3)
    sampler = b.add("KSampler", 3, dict({"seed": 43}, **SD15_SAMPLER), title="KSampler (this machine's share)")
    decode = b.add("VAEDecode", 3, title="VAE Decode (this machine's share)")
    # on the master
    collector = b.add("DistributedCollector", 4)
    order = b.add("StoryDiffusionStoryOrder", 4)
    page = b.add("StoryDiffusionComicPage", 4, {"layout": "grid", "rows": 3, "columns": 4, "page_width": 768})
    save = b.add("SaveImage", 4, {"filename_prefix": "storydiffusion/story_distributed"})

    _wire_identity_run(b, run, story_select)
    b.connect(participant, "seed", story_select, "participant")
    b.connect(panel_latent, 0, story_select, "latent")
    b.connect(csa, "model", read, "model")
    b.connect(write, "bank", read, "bank")
    b.connect(story_select, "panels", read, "panels")
    b.connect(identity_sampler, 0, read, "after")
    sample_and_decode(b, sampler, decode, model=(read, "model"), positive=(story_select, "positive"),
                      negative=(story_select, "negative"), latent=(story_select, "latent"), vae=(ckpt, "VAE"))
    b.connect(decode, 0, collector, "images")
    b.connect(collector, "images", order, "images_a")
    b.connect(story_select, "panels", order, "panels_a")
    b.connect(identity_decode, 0, order, "images_b")
    b.connect(identity_select, "panels", order, "panels_b")
    b.connect(order, "images", page, "images")
    b.connect(story, "captions", page, "captions")
    b.connect(page, "pages", save, "images")


PHOTOMAKER_FILE = ModelFile("photomaker", "photomaker-v1.bin", "photomaker")


def comic_sdxl_photomaker(b: WorkflowBuilder) -> None:
    """Reference photos -> PhotoMaker ID fuse per panel + Consistent Self-Attention (SDXL) -> comic page."""
    b.note("## Your character from photos (SDXL + PhotoMaker)\nPut 1–4 photos of one person in **Load Image** "
           "(batch them with Batch Images). Write the class word and trigger in the character line, e.g. "
           "`[Ann] a woman img`. Files: an SDXL checkpoint in `models/checkpoints`, `photomaker-v1.bin` in "
           "`models/photomaker`.\n\n"
           "**Settings:** 1024×1024 (SDXL's own size), KSampler 30 steps, cfg 5 (StoryDiffusion's and PhotoMaker's), "
           "dpmpp_2m / karras. **VRAM:** the checkpoint is about 7 GB and PhotoMaker 1 GB; one step over the four "
           "panels (cond + uncond: 8 latent rows at 128×128) about 2.1 GB more: the four panels fit a 24 GB card in "
           "one batch, and so do 8 (≈ 4.2 GB a step); longer stories: 768×768 or the identity bank.", 0, height=440)
    ckpt = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": SDXL_CHECKPOINT})
    photomaker = b.add("StoryDiffusionPhotoMakerLoader", 0, {"photomaker_name": PHOTOMAKER_FILE})
    photo_a = b.add("LoadImage", 0, {"image": ModelFile("input", "storydiffusion_reference_1.png", "photo")})
    photo_b = b.add("LoadImage", 0, {"image": ModelFile("input", "storydiffusion_reference_2.png", "photo")})
    photos = b.add("StoryDiffusionBatchImages", 1)
    lora = b.add("StoryDiffusionPhotoMakerApplyLoRA", 1)
    character = b.add("StoryDiffusionPhotoMakerCharacter", 1, {"name": "Ann", "trigger_word": "img"})
    b.connect(photo_a, "IMAGE", photos, "image1")
    b.connect(photo_b, "IMAGE", photos, "image2")
    b.connect(ckpt, "MODEL", lora, "model")
    b.connect(photomaker, 0, lora, "photomaker")
    b.connect(photos, 0, character, "images")
    story = b.add("StoryDiffusionStory", 2, {
        "characters": "[Ann] a woman img, curly black hair, yellow jacket",
        "panels": "[Ann] reads a map at a train station # Where to?\n[Ann] looks out of a train window\n"
                  "[NC] mountains and a lake seen from a train\n[Ann] arrives in a snowy village # Finally.",
        "style": "Comic book", "identity_panels": 2}, width=420)
    fuse = b.add("StoryDiffusionPhotoMakerFuse", 2, {"trigger_word": "img", "start_merge": 0.1})
    csa = b.add("StoryDiffusionConsistentSelfAttention", 3, {"seed": 7})
    latent = b.add("EmptyLatentImage", 3, {"width": SDXL_SIZE, "height": SDXL_SIZE})
    sampler = b.add("KSampler", 4, dict({"seed": 42}, **SDXL_SAMPLER))
    decode = b.add("VAEDecode", 4)
    page = b.add("StoryDiffusionComicPage", 5, {"layout": "horizontal strip", "page_width": 768})
    save = b.add("SaveImage", 5, {"filename_prefix": "storydiffusion/comic_sdxl_photomaker"})
    b.connect(ckpt, "CLIP", story, "clip")
    b.connect(ckpt, "CLIP", fuse, "clip")
    b.connect(photomaker, 0, fuse, "photomaker")
    b.connect(character, 0, fuse, "characters")
    b.connect(story, "story", fuse, "story")
    b.connect(lora, 0, csa, "model")
    b.connect(story, "story", csa, "story")
    b.connect(story, "panel_count", latent, "batch_size")
    sample_and_decode(b, sampler, decode, model=(csa, "model"), positive=(fuse, 0),
                      negative=(story, "negative"), latent=(latent, 0), vae=(ckpt, "VAE"))
    b.connect(decode, 0, page, "images")
    b.connect(story, "captions", page, "captions")
    b.connect(page, "pages", save, "images")


REFERENCE_SHEET_FILE = ModelFile("input", "storydiffusion_character_sheet.png", "photo")
REFERENCE_CHARACTER = "Ann"
REFERENCE_DESCRIPTION = "a girl with curly black hair, yellow raincoat, red boots"
REFERENCE_STORY = {
    "characters": f"[{REFERENCE_CHARACTER}] {REFERENCE_DESCRIPTION}",
    "panels": f"[{REFERENCE_CHARACTER}] jumps into a puddle # Splash!\n"
              f"[{REFERENCE_CHARACTER}] feeds ducks at a pond\n"
              "[NC] a paper boat floating on a stream\n"
              f"[{REFERENCE_CHARACTER}] waves from a bridge at sunset # Bye!",
    "style": "Comic book", "identity_panels": 1}


def comic_from_reference(b: WorkflowBuilder) -> None:
    """Reference image -> Identity Bank From Images -> Identity Bank Read -> KSampler for the panels -> comic page:
    every panel shares tokens with the user's own drawing of the character (SDXL)."""
    b.note("## A character from your own image (SDXL)\nPut a picture of the character in **Load Image**: a character "
           "sheet, a drawing, a photo or an earlier panel (a tight, plain-background crop works best). **Story "
           "Consistency Reference** binds it to the story's `[Name]` (chain one per character, batch several views of "
           "one character with Batch Images). **Identity Bank From Images** noises the reference to every step's level "
           "the way the model samples and runs it once per step through **Consistent Self-Attention**: the bank "
           "holds the reference's own tokens. **Identity Bank Read** then lets every story panel attend to the tokens "
           "of its characters; `[NC]` panels read nothing. `rate` on Consistent Self-Attention sets how many reference "
           "tokens a panel reads.\n\n"
           "**Keep in step:** Identity Bank From Images' steps, cfg, sampler, scheduler, denoise, width and height are "
           "those of the KSampler and Empty Latent Image that read the bank (a read with another step count or size is "
           "refused with the reason). Its prompt (**Character prompt**) is the character's description.\n\n"
           "**vs PhotoMaker:** PhotoMaker (SDXL, real faces) steers the prompt from photos; this shares the "
           "reference's attention tokens and works for drawn characters and on every family (SD1.5, SDXL, Flux, "
           "SD3, Qwen-Image, Z-Image). Files: an SDXL checkpoint in `models/checkpoints`.\n\n"
           f"**Settings:** {SDXL_SIZE}×{SDXL_SIZE} (SDXL's own size), {SDXL_SAMPLER['steps']} steps, cfg "
           f"{SDXL_SAMPLER['cfg']:g}, dpmpp_2m / karras in both places. **VRAM:** the checkpoint is about 7 GB; one "
           "step over the four panels (cond + uncond: 8 latent rows at 128×128) about 2.1 GB more, and one step of the "
           "bank: a 24 GB card takes the four panels in one batch with a wide margin. The bank lives in RAM (storage "
           "cpu): one reference × 30 steps in fp16 ≈ 3.3 GB (fp8: half); more panels read it a few at a time (Select "
           "Story Panels, as in *Two characters, twelve panels*).", 0, height=740, width=380)
    ckpt = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": SDXL_CHECKPOINT})
    sheet = b.add("LoadImage", 0, {"image": REFERENCE_SHEET_FILE}, title="Load Image (character reference)")
    story = b.add("StoryDiffusionStory", 1, REFERENCE_STORY, width=420)
    reference = b.add("StoryDiffusionConsistencyReference", 1, {"character": REFERENCE_CHARACTER})
    character_prompt = b.add("CLIPTextEncode", 1, {"text": f"{REFERENCE_DESCRIPTION}, comic book style"},
                             title="Character prompt")
    csa = b.add("StoryDiffusionConsistentSelfAttention", 2, {"seed": 7})
    from_images = b.add("StoryDiffusionIdentityBankFromImages", 2, dict(
        {"seed": 11, "width": SDXL_SIZE, "height": SDXL_SIZE, "denoise": 1.0}, **SDXL_SAMPLER))
    read = b.add("StoryDiffusionIdentityBankRead", 3)
    latent = b.add("EmptyLatentImage", 3, {"width": SDXL_SIZE, "height": SDXL_SIZE})
    sampler = b.add("KSampler", 3, dict({"seed": 42}, **SDXL_SAMPLER))
    decode = b.add("VAEDecode", 4)
    page = b.add("StoryDiffusionComicPage", 4, {"layout": "classic comic", "page_width": 768})
    save = b.add("SaveImage", 4, {"filename_prefix": "storydiffusion/comic_from_reference"})
    b.connect(sheet, "IMAGE", reference, "images")
    b.connect(ckpt, "CLIP", story, "clip")
    b.connect(ckpt, "CLIP", character_prompt, "clip")
    b.connect(ckpt, "MODEL", csa, "model")
    b.connect(story, "story", csa, "story")
    b.connect(csa, "model", from_images, "model")
    b.connect(ckpt, "VAE", from_images, "vae")
    b.connect(reference, "references", from_images, "references")
    b.connect(character_prompt, 0, from_images, "positive")
    b.connect(story, "negative", from_images, "negative")
    b.connect(story, "story", from_images, "story")
    b.connect(csa, "model", read, "model")
    b.connect(from_images, "bank", read, "bank")
    b.connect(story, "panel_count", latent, "batch_size")
    sample_and_decode(b, sampler, decode, model=(read, "model"), positive=(story, "positive"),
                      negative=(story, "negative"), latent=(latent, 0), vae=(ckpt, "VAE"))
    b.connect(decode, 0, page, "images")
    b.connect(story, "captions", page, "captions")
    b.connect(page, "pages", save, "images")


CLIP_VISION_FILE = ModelFile("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision_vit_l")
IPADAPTER_SD15_FILE = ModelFile("ipadapter", "ip-adapter_sd15.safetensors", "ipadapter_sd15")
VIDEO_PANELS = 3
VIDEO_FRAMES_PER_TRANSITION = 16  # AnimateDiff's clip length: the frames of one transition are one latent batch


def joined_frames(per_transition: int, panels: int = VIDEO_PANELS) -> int:
    """Frames of the joined video: one transition per panel pair, Story Video overlapping neighbours by 1 frame."""
    return (panels - 1) * per_transition - (panels - 2)



def panels_to_per_frame_model(b: WorkflowBuilder, checkpoint: ModelFile, ipadapter_file: ModelFile,
                              frames_per_transition: int):
    """The shared front of the video workflows: checkpoint + CLIP vision, the panels in story order, Panel Pairs,
    the Semantic Motion Predictor and Per-frame Semantic Conditioning on the checkpoint's MODEL.
    Returns (checkpoint loader, motion predictor, per-frame conditioning) node ids."""
    ckpt = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": checkpoint})
    clip_vision = b.add("CLIPVisionLoader", 0, {"clip_name": CLIP_VISION_FILE})
    panels = [b.add("LoadImage", 1, {"image": ModelFile("input", f"storydiffusion_panel_{i + 1}.png", "panel")})
              for i in range(VIDEO_PANELS)]
    batch = b.add("StoryDiffusionBatchImages", 2, title="Batch Images (panels in story order)")
    for i, panel in enumerate(panels):
        b.connect(panel, "IMAGE", batch, f"image{i + 1}")
    pairs = b.add("StoryDiffusionPanelPairs", 2)
    motion = b.add("StoryDiffusionSemanticMotionPredictor", 3,
                   {"frames": frames_per_transition, "embeddings": "pooled"})
    ipadapter = b.add("StoryDiffusionIPAdapterLoader", 3, {"ipadapter_file": ipadapter_file})
    per_frame = b.add("StoryDiffusionPerFrameSemanticConditioning", 3)
    b.connect(batch, "images", pairs, "panels")
    b.connect(clip_vision, 0, motion, "clip_vision")
    b.connect(pairs, "start_images", motion, "start")
    b.connect(pairs, "end_images", motion, "end")
    b.connect(ckpt, "MODEL", per_frame, "model")
    b.connect(ipadapter, 0, per_frame, "ipadapter")
    b.connect(motion, "clip_vision_output", per_frame, "clip_vision_output")
    b.connect(clip_vision, 0, per_frame, "clip_vision")  # plus/full-face adapters: black-image uncond
    return ckpt, motion, per_frame


def story_to_video(b: WorkflowBuilder) -> None:
    """Panels -> panel pairs -> semantic motion predictor -> per-frame IP-Adapter conditioning -> frames -> video."""
    b.note("## Story panels to video (SD1.5 + IP-Adapter)\nLoad your panels in order (e.g. from a comic run). "
           "**Panel Pairs** turns them into transitions; for each one the **Semantic Motion Predictor** encodes "
           "both panels with CLIP vision and predicts one embedding per frame, **Per-Frame Semantic Conditioning** "
           "makes latent frame *j* follow embedding *j*, and **Story Video** joins the transitions.\n\n"
           "Files: an SD1.5 checkpoint, `ip-adapter_sd15.safetensors` in `models/ipadapter`, its CLIP vision "
           "model (ViT-H) in `models/clip_vision`. A trained predictor (Motion Predictor Loader) can be connected "
           "to **predictor**; unconnected = training-free interpolation.\n\n"
           f"**Settings:** 512×512, {VIDEO_FRAMES_PER_TRANSITION} frames per transition (Semantic Motion Predictor "
           "`frames` = the latent batch), KSampler 25 steps, cfg 7, dpmpp_2m / karras. **VRAM:** checkpoint 2 GB + "
           "CLIP vision ViT-H 2.5 GB; a step over one transition (16 frames, cond + uncond: 32 latent rows at 64×64) "
           "about 2.6 GB more. Panel Pairs samples one transition at a time: 16 frames fit a 24 GB card with a wide "
           "margin.", 0, height=420)
    ckpt, motion, per_frame = panels_to_per_frame_model(b, SD15_CHECKPOINT, IPADAPTER_SD15_FILE,
                                                        VIDEO_FRAMES_PER_TRANSITION)
    pos = b.add("CLIPTextEncode", 4, {"text": "a comic character walking through a rainy city, comic book style"})
    neg = b.add("CLIPTextEncode", 4, {"text": "blurry, watermark, text"})
    latent = b.add("EmptyLatentImage", 4, {"width": SD15_SIZE, "height": SD15_SIZE})
    sampler = b.add("KSampler", 5, dict({"seed": 42}, **SD15_SAMPLER))
    decode = b.add("VAEDecode", 5)
    video = b.add("StoryDiffusionStoryVideo", 6, {"fps": 8.0, "overlap": 1})
    combine = b.add("StoryDiffusionVideoCombine", 6, {"format": "mp4", "filename_prefix": "storydiffusion/story_to_video"})
    b.connect(ckpt, "CLIP", pos, "clip")
    b.connect(ckpt, "CLIP", neg, "clip")
    b.connect(motion, "total_frames", latent, "batch_size")
    sample_and_decode(b, sampler, decode, model=(per_frame, "model"), positive=(pos, 0),
                      negative=(neg, 0), latent=(latent, 0), vae=(ckpt, "VAE"))
    b.connect(decode, 0, video, "segments")
    b.connect(video, "frames", combine, "images")
    b.connect(video, "fps", combine, "fps")


# AnimateDiff-Evolved (ADE, another pack: Kosinkadink/ComfyUI-AnimateDiff-Evolved) drives the motion module; the
# paper's stage-2 video model is SD1.5 + an AnimateDiff motion module. Its node ids, for the tests and the builder:
ANIMATEDIFF_NODES = ("ADE_LoadAnimateDiffModel", "ADE_ApplyAnimateDiffModelSimple", "ADE_StandardStaticContextOptions",
                     "ADE_UseEvolvedSampling")
MOTION_MODULE_FILE = ModelFile("animatediff_models", "mm_sd_v15_v2.ckpt", "motion_module_sd15_v2")
# The same public models as the other SD1.5 workflows, in the other format they are published in (full-precision
# checkpoint, .bin IP-Adapter): the tests share one models folder between all workflows, and ADE injects its motion
# modules at SD1.5's real widths, so this workflow's files must be a real-width checkpoint and an IP-Adapter sized to
# it (tests/test_workflows.py MODEL_WRITERS), not the tiny `sd15` ones.
ANIMATEDIFF_CHECKPOINT = ModelFile("checkpoints", "v1-5-pruned-emaonly.safetensors", "sd15_real_width")
ANIMATEDIFF_IPADAPTER_FILE = ModelFile("ipadapter", "ip-adapter_sd15.bin", "ipadapter_sd15_real_width")
# mm_sd_v15_v2 was trained on 16-frame clips: 16 frames per transition in 16-frame context windows overlapping by 4
# (one window at 16 frames; longer transitions slide it).
ANIMATEDIFF_FRAMES_PER_TRANSITION = 16
ANIMATEDIFF_CONTEXT_LENGTH = 16
ANIMATEDIFF_CONTEXT_OVERLAP = 4
ANIMATEDIFF_SIZE_NOTE = (
    f"**Settings:** 512×512, {ANIMATEDIFF_FRAMES_PER_TRANSITION} frames per transition (Semantic Motion Predictor "
    f"`frames`), Context Options context_length {ANIMATEDIFF_CONTEXT_LENGTH} / context_overlap "
    f"{ANIMATEDIFF_CONTEXT_OVERLAP} (mm_sd_v15_v2 was trained on 16-frame clips: longer transitions slide the window), "
    "KSampler 25 steps, cfg 7, dpmpp_2m / karras. **VRAM:** checkpoint 2 GB + motion module 0.9 GB (fp16) + CLIP "
    "vision ViT-H 2.5 GB; a step over one 16-frame window (32 latent rows at 64×64) about 2.6 GB more plus the motion "
    "module's temporal attention: well within 24 GB. Memory follows context_length, not the transition's length.")


def story_to_video_animatediff(b: WorkflowBuilder) -> None:
    """Panels -> pairs -> semantic motion predictor -> per-frame IP-Adapter conditioning -> AnimateDiff motion module
    (ADE, sliding context windows) -> frames -> story video: the paper's video stack."""
    b.note("## Story panels to video with AnimateDiff (SD1.5)\nThe paper's stage 2: the **Semantic Motion Predictor** "
           "gives one CLIP embedding per frame between two panels, **Per-Frame Semantic Conditioning** makes latent "
           "frame *j* follow embedding *j*, and an **AnimateDiff motion module** (AnimateDiff-Evolved nodes) makes the "
           "frames move together. Transitions longer than the motion module's context are sampled in overlapping "
           "**context windows**; frame *j* keeps embedding *j* in every window.\n\n"
           "Needs the **ComfyUI-AnimateDiff-Evolved** pack. Files: an SD1.5 checkpoint, `mm_sd_v15_v2.ckpt` in "
           "`models/animatediff_models`, the SD1.5 IP-Adapter (`ip-adapter_sd15.bin` or `.safetensors`) in "
           "`models/ipadapter`, CLIP vision ViT-H in `models/clip_vision`.\n\n" + ANIMATEDIFF_SIZE_NOTE, 0, height=440)
    ckpt, motion, per_frame = panels_to_per_frame_model(b, ANIMATEDIFF_CHECKPOINT, ANIMATEDIFF_IPADAPTER_FILE,
                                                        ANIMATEDIFF_FRAMES_PER_TRANSITION)
    motion_model = b.add("ADE_LoadAnimateDiffModel", 4, {"model_name": MOTION_MODULE_FILE})
    apply = b.add("ADE_ApplyAnimateDiffModelSimple", 4)
    context = b.add("ADE_StandardStaticContextOptions", 4, {"context_length": ANIMATEDIFF_CONTEXT_LENGTH,
                                                             "context_overlap": ANIMATEDIFF_CONTEXT_OVERLAP})
    evolved = b.add("ADE_UseEvolvedSampling", 4)
    pos = b.add("CLIPTextEncode", 5, {"text": "a comic character walking through a rainy city, comic book style"})
    neg = b.add("CLIPTextEncode", 5, {"text": "blurry, watermark, text"})
    latent = b.add("EmptyLatentImage", 5, {"width": SD15_SIZE, "height": SD15_SIZE})
    sampler = b.add("KSampler", 6, dict({"seed": 42}, **SD15_SAMPLER))
    decode = b.add("VAEDecode", 6)
    video = b.add("StoryDiffusionStoryVideo", 7, {"fps": 8.0, "overlap": 1})
    combine = b.add("StoryDiffusionVideoCombine", 7, {"format": "mp4",
                                                      "filename_prefix": "storydiffusion/story_to_video_animatediff"})
    b.connect(motion_model, 0, apply, "motion_model")
    b.connect(per_frame, "model", evolved, "model")
    b.connect(apply, 0, evolved, "m_models")
    b.connect(context, 0, evolved, "context_options")
    b.connect(ckpt, "CLIP", pos, "clip")
    b.connect(ckpt, "CLIP", neg, "clip")
    b.connect(motion, "total_frames", latent, "batch_size")
    sample_and_decode(b, sampler, decode, model=(evolved, 0), positive=(pos, 0),
                      negative=(neg, 0), latent=(latent, 0), vae=(ckpt, "VAE"))
    b.connect(decode, 0, video, "segments")
    b.connect(video, "frames", combine, "images")
    b.connect(video, "fps", combine, "fps")


# DiT comics (Flux.1 dev, Z-Image Turbo): separate diffusion model, text encoder(s) and VAE files, 16-channel latents
# (EmptySD3LatentImage), one sampler over all panels. The files the tests write for these names are full-width random
# models at minimal depth (tests/dit_workflow_fixtures.py): ComfyUI's detection fixes the DiT widths.
FLUX_DEV_FILE = ModelFile("diffusion_models", "flux1-dev.safetensors", "flux1_dev")
FLUX_CLIP_L_FILE = ModelFile("text_encoders", "clip_l.safetensors", "clip_l")
FLUX_T5XXL_FILE = ModelFile("text_encoders", "t5xxl_fp16.safetensors", "t5xxl")
FLUX_VAE_FILE = ModelFile("vae", "ae.safetensors", "flux_vae")  # Flux's autoencoder; Z-Image uses the same file
Z_IMAGE_FILE = ModelFile("diffusion_models", "z_image_turbo_bf16.safetensors", "z_image_turbo")
Z_IMAGE_TEXT_FILE = ModelFile("text_encoders", "qwen_3_4b.safetensors", "qwen3_4b")
FLUX_GUIDANCE = 3.5  # Flux.1 dev's distilled guidance (the KSampler's cfg stays 1.0)
FLUX_SIZE = (1024, 768)  # (width, height): a landscape panel; four of them fit 24 GB with the model in fp8
FLUX_SAMPLER = {"steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}  # ComfyUI's Flux dev template
# flux1-dev.safetensors is 23.8 GB in bf16: on a 24 GB card nothing else would fit, so the loader stores it in fp8
FLUX_WEIGHT_DTYPE = "fp8_e4m3fn"
Z_IMAGE_SHIFT = 3.0  # ModelSamplingAuraFlow shift of ComfyUI's Z-Image Turbo template
Z_IMAGE_SIZE = (1024, 1024)
Z_IMAGE_SAMPLER = {"steps": 9, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple"}  # the same template
DIT_COMIC_STORY = {"style": "Comic book"}  # the Story node's default four panels, two characters
DIT_COMIC_PAGE = {"layout": "classic comic", "page_width": 768}


def _dit_story_to_page(b: WorkflowBuilder, model_out: tuple, clip_out: tuple, vae_out: tuple, prefix: str,
                       size: tuple[int, int], sampler_widgets: dict, guidance: float | None = None) -> None:
    """_story_to_page for DiTs: 16-channel latent, the DiT comic's story and page."""
    _story_to_page(b, model_out, clip_out, vae_out, DIT_COMIC_STORY, prefix, size, DIT_COMIC_PAGE, sampler_widgets,
                   latent_node="EmptySD3LatentImage", guidance=guidance)


def comic_flux(b: WorkflowBuilder) -> None:
    """Story -> Flux Guidance -> Consistent Self-Attention on Flux.1 dev -> KSampler (cfg 1) -> comic page."""
    b.note("## StoryDiffusion comic (Flux.1 dev)\nOne line per panel in **Story**; `[Name]` puts a character in a "
           "panel. Consistent Self-Attention shares image tokens between the panels inside Flux's joint attention "
           "(by default the single-stream blocks 11–37, after Story2Board; CharaConsist also shares in single-stream "
           "blocks only; `layers` = all blocks or a custom list such as `single 20-37` or "
           "`double 10-18, single 0-37`).\n\n"
           "Files: `flux1-dev.safetensors` (or an fp8 copy of it) in `models/diffusion_models`; "
           "`clip_l.safetensors` and `t5xxl_fp16.safetensors` (or `t5xxl_fp8_e4m3fn`) in `models/text_encoders`; "
           "`ae.safetensors` in `models/vae`. Flux.1 schnell works too (4 steps, no Flux Guidance).\n\n"
           f"**Settings:** {FLUX_SIZE[0]}×{FLUX_SIZE[1]} panels, KSampler {FLUX_SAMPLER['steps']} steps, cfg 1.0 (Flux "
           f"Guidance {FLUX_GUIDANCE} does the guiding), euler / simple (ComfyUI's Flux dev template). **VRAM (24 GB):** "
           f"Load Diffusion Model stores the 23.8 GB bf16 file in {FLUX_WEIGHT_DTYPE} (11.9 GB); one step over the four "
           "panels (4 latent rows at 128×96, no cfg batch) about 3 GB more; the T5 (9.8 GB) is unloaded when the model "
           "needs the room: about 15 GB while sampling. With 32 GB or more set weight_dtype to default. More panels: "
           "`window_size`, a lower `rate`, or the identity bank.", 0, height=560)
    unet = b.add("UNETLoader", 0, {"unet_name": FLUX_DEV_FILE, "weight_dtype": FLUX_WEIGHT_DTYPE})
    clip = b.add("DualCLIPLoader", 0, {"clip_name1": FLUX_CLIP_L_FILE, "clip_name2": FLUX_T5XXL_FILE, "type": "flux"})
    vae = b.add("VAELoader", 0, {"vae_name": FLUX_VAE_FILE})
    _dit_story_to_page(b, (unet, 0), (clip, 0), (vae, 0), "storydiffusion/comic_flux", FLUX_SIZE, FLUX_SAMPLER,
                       guidance=FLUX_GUIDANCE)


def comic_zimage(b: WorkflowBuilder) -> None:
    """Story -> Consistent Self-Attention on Z-Image Turbo (AuraFlow shift 3) -> KSampler (cfg 1) -> comic page."""
    b.note("## StoryDiffusion comic (Z-Image Turbo)\nOne line per panel in **Story**; `[Name]` puts a character in "
           "a panel. Consistent Self-Attention shares image tokens between the panels inside Z-Image's "
           "single-stream layers (by default the later half: layers 15–29; the caption and noise refiners are never "
           "shared; `layers` = all blocks or a custom list such as `single 10-29`).\n\n"
           "Files: `z_image_turbo_bf16.safetensors` in `models/diffusion_models`, `qwen_3_4b.safetensors` in "
           "`models/text_encoders` (CLIP loader type lumina2), `ae.safetensors` (the Flux VAE) in `models/vae`.\n\n"
           f"**Settings:** {Z_IMAGE_SIZE[0]}×{Z_IMAGE_SIZE[1]}, KSampler {Z_IMAGE_SAMPLER['steps']} steps (a turbo model: "
           f"more steps do not help), cfg 1.0, res_multistep / simple, Model Sampling AuraFlow shift {Z_IMAGE_SHIFT:g} "
           "(ComfyUI's Z-Image Turbo template). **VRAM (24 GB):** the model is 12.3 GB in bf16; one step over the four "
           "panels (4 latent rows at 128×128) about 2.2 GB more; the Qwen3 text encoder (8 GB) is unloaded when the "
           "model needs the room: about 15 GB while sampling. More panels: 768×768, `window_size`, or a lower `rate`.",
           0, height=500)
    unet = b.add("UNETLoader", 0, {"unet_name": Z_IMAGE_FILE})
    clip = b.add("CLIPLoader", 0, {"clip_name": Z_IMAGE_TEXT_FILE, "type": "lumina2"})
    vae = b.add("VAELoader", 0, {"vae_name": FLUX_VAE_FILE})
    shift = b.add("ModelSamplingAuraFlow", 1, {"shift": Z_IMAGE_SHIFT})
    b.connect(unet, 0, shift, "model")
    _dit_story_to_page(b, (shift, 0), (clip, 0), (vae, 0), "storydiffusion/comic_zimage", Z_IMAGE_SIZE,
                       Z_IMAGE_SAMPLER)


# Wan 2.1 FLF2V: core ComfyUI's Wan nodes (UNETLoader, CLIPLoader type "wan", WanFirstLastFrameToVideo) once per panel
# pair, the pack's Wan Per-frame Semantics steering each latent frame by the predictor's tokens. The names are the
# public files (Comfy-Org/Wan_2.1_ComfyUI_repackaged); the tests write tiny random files under them
# (tests/wan_fixtures.py).
WAN_MODEL_FILE = ModelFile("diffusion_models", "wan2.1_flf2v_720p_14B_fp16.safetensors", "wan21_flf2v_tiny")
WAN_TEXT_ENCODER_FILE = ModelFile("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "umt5_xxl_tiny")
WAN_VAE_FILE = ModelFile("vae", "wan_2.1_vae.safetensors", "wan21_vae_tiny")
WAN_CLIP_VISION_FILE = ModelFile("clip_vision", "clip_vision_h.safetensors", "clip_vision_h")
# Wan packs 4 video frames into one latent frame (the first alone): a transition has 4k + 1 frames; the predictor's
# frame count is the transition's length (its total_frames feeds WanFirstLastFrameToVideo's length)
WAN_FRAMES_PER_TRANSITION = 33  # 9 latent frames, ComfyUI's FLF2V template length
WAN_SIZE = (832, 480)  # 480p, what fits 24 GB; the 720p FLF2V model's own size is 1280 x 720
WAN_STEPS = 20
WAN_SHIFT = 8.0  # ModelSamplingSD3 shift of ComfyUI's Wan templates
WAN_CFG = 5.0  # Wan 2.1's default sample_guide_scale (ComfyUI's FLF2V template uses 3)
WAN_STRENGTH = 0.3  # Wan Per-frame Semantics: above 0 is off the model's training distribution, so start low
# the 14B model is 32.8 GB in fp16: the loader stores it in fp8 (16.4 GB) so one transition fits a 24 GB card
WAN_WEIGHT_DTYPE = "fp8_e4m3fn"
WAN_SIZE_NOTE = (
    f"**Settings:** WanFirstLastFrameToVideo {WAN_SIZE[0]}×{WAN_SIZE[1]} (480p; keep your panels' aspect, the panels "
    f"are centre-cropped to it), {WAN_FRAMES_PER_TRANSITION} frames per transition (Semantic Motion Predictor `frames`, "
    f"4k + 1: it sets each transition's length), KSampler {WAN_STEPS} steps, cfg {WAN_CFG:g}, uni_pc / simple, shift {WAN_SHIFT:g}. "
    f"**VRAM (24 GB):** Load Diffusion Model stores the 32.8 GB fp16 model in {WAN_WEIGHT_DTYPE} (16.4 GB); one step "
    "over a 33-frame 480p transition (9 latent frames at 104×60, cond + uncond) about 5.2 GB more; the text "
    "encoder is unloaded when the model needs the room: about 22 GB while sampling, one transition at a time (Panel "
    "Pairs runs them in turn). Tight: ComfyUI moves part of the weights to RAM if it must (slower). With 40 GB or "
    "more set weight_dtype to default; 720p (1280×720) needs about twice the activation memory.")


def story_to_video_wan(b: WorkflowBuilder) -> None:
    """Panels -> pairs -> CLIP vision of both panels + semantic motion predictor -> Wan Per-frame Semantics on the Wan
    2.1 model -> WanFirstLastFrameToVideo -> KSampler per pair -> story video."""
    b.note("## Story panels to video with Wan 2.1 (first/last frame)\n**Panel Pairs** runs the graph once per pair "
           "of adjacent panels (list execution). Core **WanFirstLastFrameToVideo** makes each pair a transition that "
           "starts on one panel and ends on the next: it conditions Wan on both panels (VAE latents) and on their "
           "CLIP vision H tokens (257 per image). The **Semantic Motion Predictor** predicts CLIP tokens for every "
           "frame in between, and **Wan Per-frame Semantics** makes each latent frame attend to the tokens of its "
           "own time instead of the fixed start/end pair. **Story Video** joins the transitions, **Video Combine** "
           "writes the mp4.\n\n"
           "Files (Comfy-Org/Wan_2.1_ComfyUI_repackaged): `wan2.1_flf2v_720p_14B_fp16.safetensors` (or the "
           "`wan2.1_i2v_480p_14B_fp16.safetensors` I2V model) in `models/diffusion_models`, "
           "`umt5_xxl_fp8_e4m3fn_scaled.safetensors` in `models/text_encoders`, `wan_2.1_vae.safetensors` in "
           "`models/vae`, `clip_vision_h.safetensors` in `models/clip_vision`.\n\n"

           "**Limits:** no trained motion predictor weights exist (unconnected = interpolation between the two "
           "panels' tokens). Wan was trained with the fixed start/end pair, so any **strength** above 0 is off its "
           "training distribution: start low; strength 0 = plain FLF2V (bit-identical).\n\n" + WAN_SIZE_NOTE,
           0, height=640, width=380)
    unet = b.add("UNETLoader", 0, {"unet_name": WAN_MODEL_FILE, "weight_dtype": WAN_WEIGHT_DTYPE})
    text_encoder = b.add("CLIPLoader", 0, {"clip_name": WAN_TEXT_ENCODER_FILE, "type": "wan"})
    vae = b.add("VAELoader", 0, {"vae_name": WAN_VAE_FILE})
    clip_vision = b.add("CLIPVisionLoader", 0, {"clip_name": WAN_CLIP_VISION_FILE})
    panels = [b.add("LoadImage", 1, {"image": ModelFile("input", f"storydiffusion_panel_{i + 1}.png", "panel")})
              for i in range(VIDEO_PANELS)]
    batch = b.add("StoryDiffusionBatchImages", 2, title="Batch Images (panels in story order)")
    pairs = b.add("StoryDiffusionPanelPairs", 2)
    pos = b.add("CLIPTextEncode", 2, {"text": "a comic character walking through a rainy city, comic book style, "
                                               "smooth motion"})
    neg = b.add("CLIPTextEncode", 2, {"text": "blurry, watermark, text, static, distorted"})
    encode_start = b.add("CLIPVisionEncode", 3, {"crop": "none"}, title="CLIP Vision Encode (start panel)")
    encode_end = b.add("CLIPVisionEncode", 3, {"crop": "none"}, title="CLIP Vision Encode (end panel)")
    motion = b.add("StoryDiffusionSemanticMotionPredictor", 3,
                   {"frames": WAN_FRAMES_PER_TRANSITION, "embeddings": "penultimate", "crop": "none"})
    shift = b.add("ModelSamplingSD3", 4, {"shift": WAN_SHIFT})
    per_frame = b.add("StoryDiffusionWanPerFrameSemantics", 4, {"strength": WAN_STRENGTH})
    flf = b.add("WanFirstLastFrameToVideo", 4, {"width": WAN_SIZE[0], "height": WAN_SIZE[1]})
    sampler = b.add("KSampler", 5, {"seed": 42, "steps": WAN_STEPS, "cfg": WAN_CFG, "sampler_name": "uni_pc",
                                    "scheduler": "simple"})
    decode = b.add("VAEDecode", 5)
    video = b.add("StoryDiffusionStoryVideo", 6, {"fps": 16.0, "overlap": 1})
    combine = b.add("StoryDiffusionVideoCombine", 6, {"format": "mp4",
                                                      "filename_prefix": "storydiffusion/story_to_video_wan"})
    for i, panel in enumerate(panels):
        b.connect(panel, "IMAGE", batch, f"image{i + 1}")
    b.connect(batch, "images", pairs, "panels")
    b.connect(text_encoder, 0, pos, "clip")
    b.connect(text_encoder, 0, neg, "clip")
    for encode, images in ((encode_start, "start_images"), (encode_end, "end_images")):
        b.connect(clip_vision, 0, encode, "clip_vision")
        b.connect(pairs, images, encode, "image")
    b.connect(clip_vision, 0, motion, "clip_vision")
    b.connect(pairs, "start_images", motion, "start")
    b.connect(pairs, "end_images", motion, "end")
    b.connect(unet, 0, shift, "model")
    b.connect(shift, 0, per_frame, "model")
    b.connect(motion, "clip_vision_output", per_frame, "clip_vision_output")
    b.connect(pos, 0, flf, "positive")
    b.connect(neg, 0, flf, "negative")
    b.connect(vae, 0, flf, "vae")
    b.connect(motion, "total_frames", flf, "length")  # the predictor's frames are the transition's frames
    b.connect(encode_start, 0, flf, "clip_vision_start_image")
    b.connect(encode_end, 0, flf, "clip_vision_end_image")
    b.connect(pairs, "start_images", flf, "start_image")
    b.connect(pairs, "end_images", flf, "end_image")
    sample_and_decode(b, sampler, decode, model=(per_frame, "model"), positive=(flf, "positive"),
                      negative=(flf, "negative"), latent=(flf, "latent"), vae=(vae, 0))
    b.connect(decode, 0, video, "segments")
    b.connect(video, "frames", combine, "images")
    b.connect(video, "fps", combine, "fps")


TUNE_RATES = "0, 0.2, 0.35, 0.5, 0.65, 0.8"  # 0 = no sharing: the plain model's panels, the baseline
TUNE_PANELS = ("[Mia] wakes up in a small attic room\n"
               "[Leo] buys a newspaper at the kiosk\n"
               "[Mia] waits at a bus stop with an umbrella\n"
               "[Leo] feeds pigeons in the park\n"
               "[Mia] and [Leo] laugh on the bus\n"
               "[NC] the sun breaks through the clouds over the city")


def tune_consistency(b: WorkflowBuilder) -> None:
    """Value List -> the rate of Consistent Self-Attention: the story is sampled once per rate (ComfyUI list
    execution), each run scored by Story Consistency, and Consistency Plot draws the scores against the rate."""
    b.note("## Tune the rate with numbers (SD1.5)\n**Value List** holds the rates to try; ComfyUI runs Consistent "
           "Self-Attention, the KSampler, VAE Decode and Story Consistency once per value, in one queue, with the same "
           "seed. **Story Consistency** encodes each run's panels with the CLIP vision model and scores how alike each "
           "character's panels are (cosine similarity of image embeddings; `[NC]` panels are left out). **Consistency "
           "Plot** draws `self` (mean over the character's panel pairs) and its worst pair against the rate, with "
           "every run's panels below: more sharing makes the characters more alike, and past some rate the poses and "
           "scenes stop varying — pick the rate where the curve flattens and the panels still differ. Rate 0 is the "
           "plain model.\n\nThe numbers compare runs on *your* checkpoint; they are not the paper's benchmark "
           "(different encoder, story and crops). Score a subset of panels with Select Story Panels' `panels`; add "
           "Story Consistency Reference nodes for a cross score against your own images.\n\n"
           "Files: any SD1.5 checkpoint in `models/checkpoints`; a CLIP vision model in `models/clip_vision` (the "
           "IP-Adapter one, ViT-H, or ViT-L).\n\n"
           f"**Settings:** {SD15_SIZE}×{SD15_SIZE}, KSampler {SD15_SAMPLER['steps']} steps, cfg "
           f"{SD15_SAMPLER['cfg']:g}, dpmpp_2m / karras, six rates = six runs of six panels. **VRAM:** the checkpoint "
           "is about 2 GB; one step over six panels (cond + uncond: 12 latent rows at 64×64) about 1 GB more, the "
           "CLIP vision model 2.5 GB (ViT-H, fp16: 1.3 GB): far below 24 GB.", 0, height=760, width=380)
    ckpt = b.add("CheckpointLoaderSimple", 0, {"ckpt_name": SD15_CHECKPOINT})
    clip_vision = b.add("CLIPVisionLoader", 0, {"clip_name": CLIP_VISION_FILE})
    rates = b.add("StoryDiffusionValueList", 1, {"values": TUNE_RATES}, title="Value List (rates to try)")
    story = b.add("StoryDiffusionStory", 1, {"characters": STORY_CHARACTERS, "panels": TUNE_PANELS,
                                             "style": "Comic book"}, width=420)
    csa = b.add("StoryDiffusionConsistentSelfAttention", 2, {"seed": 7})
    latent = b.add("EmptyLatentImage", 2, {"width": SD15_SIZE, "height": SD15_SIZE})
    sampler = b.add("KSampler", 3, dict({"seed": 42}, **SD15_SAMPLER))
    decode = b.add("VAEDecode", 3)
    score = b.add("StoryDiffusionStoryConsistency", 4)
    plot = b.add("StoryDiffusionConsistencyPlot", 4, {"label": "rate"})
    save = b.add("SaveImage", 5, {"filename_prefix": "storydiffusion/tune_consistency"})
    b.connect(ckpt, "CLIP", story, "clip")
    b.connect(ckpt, "MODEL", csa, "model")
    b.connect(story, "story", csa, "story")
    b.connect(rates, "values", csa, "rate")  # every layer shares at the swept rate: the low and the high-res ones
    b.connect(rates, "values", csa, "rate_high_res")
    b.connect(story, "panel_count", latent, "batch_size")
    sample_and_decode(b, sampler, decode, model=(csa, "model"), positive=(story, "positive"),
                      negative=(story, "negative"), latent=(latent, 0), vae=(ckpt, "VAE"))
    b.connect(clip_vision, 0, score, "clip_vision")
    b.connect(decode, 0, score, "panels")
    b.connect(story, "story", score, "story")
    b.connect(rates, "values", plot, "values")
    b.connect(score, "self_consistency", plot, "self_consistency")
    b.connect(score, "self_min", plot, "self_min")
    b.connect(decode, 0, plot, "panels")
    b.connect(plot, "plot", save, "images")


# Template cards: `title` and `description` are what the template browser shows (web/templates.json). The
# frontend turns "-" and "_" in a description into spaces, so descriptions avoid them.
WORKFLOWS: dict[str, Workflow] = {
    "core_sd15": Workflow(core_sd15, "ComfyUI core nodes only (harness check)", (".png",), shipped=False),
    "comic_sd15": Workflow(
        comic_sd15, "A four panel comic page from one story text: the same character in every panel (SD1.5).",
        (".png",), title="Comic page (SD1.5)"),
    "story_characters": Workflow(
        story_characters, "Two characters over twelve panels, sampled in two small runs that share an identity "
                          "bank, laid out on one page.", (".png",), title="Two characters, twelve panels"),
    # needs ComfyUI-Distributed (DISTRIBUTED_NODES) in the server that builds and runs it: make_workflows.py and
    # tests/test_workflows.py load a private copy of the snapshot in ../shared/thirdparty when it is there
    "story_distributed": Workflow(
        story_distributed, "The twelve panel story on several machines with the ComfyUI Distributed pack: every "
                           "machine writes the identity bank and samples its share of the panels, the master lays "
                           "them out in story order.", (".png",), title="Story on several machines (ComfyUI-Distributed)",
        requires=DISTRIBUTED_NODES),
    "comic_sdxl_photomaker": Workflow(
        comic_sdxl_photomaker, "Your own character from reference photos (PhotoMaker), kept consistent across a "
                               "comic strip (SDXL).", (".png",), title="Comic from photos (SDXL, PhotoMaker)"),
    "comic_from_reference": Workflow(
        comic_from_reference, "Your own character from one reference image (a drawing, a character sheet, a photo): "
                              "every panel shares attention tokens with it through an identity bank (SDXL).",
        (".png",), title="Comic from a reference image (SDXL)"),
    "story_to_video": Workflow(
        story_to_video, "Story panels to a video: each pair of panels becomes a transition, joined into one mp4.",
        (".mp4",), title="Story panels to video"),
    # needs AnimateDiff-Evolved in the server that builds and runs it: make_workflows.py and tests/test_workflows.py
    # load the snapshot in ../shared/thirdparty (tests/animatediff_fixtures.server_args) when it is there
    "story_to_video_animatediff": Workflow(
        story_to_video_animatediff, "Story panels to a moving video: an AnimateDiff motion module (AnimateDiff Evolved "
                                    "pack) animates each transition between two panels, joined into one mp4.",
        (".mp4",), title="Story panels to video (AnimateDiff)",
        requires=ANIMATEDIFF_NODES),
    "comic_flux": Workflow(
        comic_flux, "A four panel comic page from one story text on Flux.1 dev: consistent self attention inside "
                    "the joint attention keeps the characters the same.", (".png",), title="Comic page (Flux.1 dev)"),
    "comic_zimage": Workflow(
        comic_zimage, "A four panel comic page from one story text on Z Image Turbo: consistent characters in "
                      "eight steps.", (".png",), title="Comic page (Z-Image Turbo)"),
    "story_to_video_wan": Workflow(
        story_to_video_wan, "Story panels to a video with Wan 2.1: each pair of panels becomes a first and last frame "
                            "transition, steered frame by frame by the predicted panel embeddings, joined into one mp4.",
        (".mp4",), title="Story panels to video (Wan 2.1)"),
    "tune_consistency": Workflow(
        tune_consistency, "Tune the sharing rate with numbers: the story sampled once per rate in one queue, each run "
                          "scored for character consistency, and a plot of the scores against the rate (SD1.5).",
        (".png",), title="Tune consistency (rate sweep)"),
}
