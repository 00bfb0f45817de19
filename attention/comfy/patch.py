"""What the nodes call: `patch_model` (a CSA clone of a UNet or DiT MODEL), `config_of` and `with_bank` (a clone
that writes or reads an identity bank)."""
from __future__ import annotations

import dataclasses

from ...common import comfy_adapter as glue
from ..bank import IdentityBank
from ..run import AUTO_BUDGET, CONFIG_KEY, MODE_READ, MODE_WRITE, CSAConfig, PatchError
from ..schedule import Schedule, select_layers
from .dit_families import dit_family
from .dit_override import patch_dit
from .fingerprint import model_fingerprint
from .lifecycle import install_run_wrappers
from .unet import BankWriteTap, patch_unet, unet_layers


def patch_model(model, *, rate: float, rate_high_res: float, window: int, layer_choice: str, custom_layers: str,
                start_percent: float, end_percent: float, official_schedule: bool, seed: int, story=None,
                memory_budget_mib: int = AUTO_BUDGET):
    """A clone of `model` with Consistent Self-Attention on the chosen layers (the input is untouched).

    UNets: attn1 replaces. DiTs (Flux.1, Flux.2, Chroma, SD3, Qwen-Image, Lumina 2 / Z-Image, HiDream): the attention override; `rate_high_res` does not
    apply (one rate for every block) and the "official" layer choice means the family's default blocks.
    memory_budget_mib: extra memory one attention call may take for query panels' K/V (MiB; 0 = one panel per
    call; AUTO_BUDGET = a share of the device's free memory at each run's first call, one panel on the CPU)."""
    for name, value in (("rate", rate), ("rate_high_res", rate_high_res)):
        if not 0.0 <= float(value) <= 1.0:  # a linked value (e.g. from a Value List) skips the widget's range
            raise PatchError(f"{name} is {value:g}: it is the share of tokens other panels read, between 0 and 1 "
                             "(if a Value List feeds it, keep its values in that range)")
    family = dit_family(model)
    if family is not None:
        diffusion_model = model.model.diffusion_model
        available, high_res, attn1 = family.blocks(diffusion_model), set(), {}
        official = family.default_blocks(diffusion_model)
    else:
        available, high_res, attn1 = unet_layers(model)
        official = None
    sigmas = glue.sigma_window(model, start_percent, end_percent)
    layers = select_layers(available, layer_choice, custom_layers, official=official)
    schedule = Schedule(window=sigmas, official=official_schedule, seed=int(seed))
    panel_characters = identity_rows = None
    if story is not None:
        panel_characters = tuple(tuple(p.characters) for p in story.panels)
        ids = sorted({int(i) for panels in (story.identity_panels or {}).values() for i in panels})
        identity_rows = tuple(ids) or None
    config = CSAConfig(rate=float(rate), rate_high_res=float(rate_high_res if family is None else rate),
                       window=int(window), seed=int(seed),
                       schedule=schedule, layers=tuple(layers), high_res_layers=frozenset(high_res),
                       panel_characters=panel_characters, identity_rows=identity_rows,
                       attn1={layer: attn1[layer] for layer in layers if layer in attn1},
                       attn1_paths=module_paths(model, {layer: attn1[layer] for layer in layers if layer in attn1}),
                       family=family.name if family is not None else "UNet",
                       memory_budget_mib=AUTO_BUDGET if memory_budget_mib is None else int(memory_budget_mib))
    patched = patch_dit(model, family) if family is not None else patch_unet(model, layers, high_res)
    patched.model_options["transformer_options"][CONFIG_KEY] = config
    install_run_wrappers(patched)
    return patched


def module_paths(model, modules: dict) -> dict:
    """layer -> the name of its module in the diffusion model (how a multi-GPU clone's own module is found)."""
    if not modules:
        return {}
    names = {id(module): name for name, module in model.model.diffusion_model.named_modules()}
    return {layer: names[id(module)] for layer, module in modules.items()}


def config_of(model) -> CSAConfig:
    config = model.model_options.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        raise PatchError("this MODEL has no Consistent Self-Attention: connect the MODEL output of "
                         "'Consistent Self-Attention (StoryDiffusion)' to this node")
    return config


def with_bank(model, mode: str, bank: IdentityBank, first_panel: int = 0, rows=None):
    """A clone of a CSA-patched model that writes (identity run) or reads (story panels) `bank`.

    rows: the story panel of every latent row of a read run (e.g. (2, 5) from Select Story Panels);
    default: consecutive panels from first_panel."""
    config = config_of(model)
    story_len = None if config.panel_characters is None else len(config.panel_characters)
    if mode == MODE_READ and story_len is not None and first_panel >= story_len:
        raise PatchError(f"first_panel {first_panel} is past the end of the story ({story_len} panels)")
    if rows is not None:
        rows = tuple(int(r) for r in rows)
        if not rows or len(set(rows)) != len(rows) or (story_len is not None and max(rows) >= story_len):
            raise PatchError(f"the read panels {list(rows)} must be distinct story panels of this story "
                             f"({story_len} panels): connect the 'panels' output of Select Story Panels of the same story")
    return bank_clone(model, dataclasses.replace(config, mode=mode, bank=bank, first_panel=int(first_panel),
                                                 read_rows=rows if mode == MODE_READ else None))


def bank_clone(model, config: CSAConfig):
    """A clone of `model` carrying `config` (a bank mode) and the fingerprint of `model`; a UNet write also gets the
    attn1 patch that records the hidden states (DiTs: the attention override writes, it sees k/v only)."""
    patched = model.clone()
    config = dataclasses.replace(config, fingerprint=model_fingerprint(model))
    patched.model_options["transformer_options"][CONFIG_KEY] = config
    if config.mode == MODE_WRITE and config.family == "UNet":
        patches = patched.model_options["transformer_options"].get("patches", {}).get("attn1_patch", [])
        if not any(isinstance(p, BankWriteTap) for p in patches):
            patched.set_model_attn1_patch(BankWriteTap())
    return patched


