"""Consistent Self-Attention's run planning, in plain torch: what a patched MODEL carries (`CSAConfig`), what
one sampling run knows (`RunState`: sigmas, panel rows, share mask, chunk roles, the step in progress), and
the token arithmetic of DiT model calls (`AttentionCalls`). Nothing here imports ComfyUI; attention/comfy/
puts these objects into transformer_options and reads them back in its patches.

- `CSAConfig` (immutable, in transformer_options[CONFIG_KEY]): the node's settings, the story, the bank and
  its mode. Shared, never copied, by ModelPatcher.clone().
- `RunState` (in the per-run copy of transformer_options[RUN_KEY]): created at the start of each sampling run
  and dropped at its end — so an interrupted run leaves nothing behind.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..common.errors import StoryDiffusionError
from ..common.roles import CFG_ROLES, role_names
from .bank import HIDDEN_STATES, KEYS_VALUES, IdentityBank
from .schedule import Schedule, step_index

CONFIG_KEY = "storydiffusion_csa"
RUN_KEY = "storydiffusion_csa_run"
TOKENS_KEY = "storydiffusion_csa_tokens"  # per model call: (tokens before the image, image tokens) of the joint attention
CALLS_KEY = "storydiffusion_csa_calls"  # per model call (or block): the AttentionCalls of families that name no blocks

MODE_BATCH, MODE_WRITE, MODE_READ = "batch", "write", "read"
AUTO_BUDGET = -1  # memory_budget_mib: a share of the device's free memory at the run's first call (CPU: 0)
AUTO_BUDGET_SHARE = 0.25  # that share: the rest stays for the model's other activations and other nodes


class PatchError(StoryDiffusionError):
    """The model cannot be patched, or the patched model does not fit this run."""


@dataclass(frozen=True)
class CSAConfig:
    rate: float
    rate_high_res: float
    window: int
    seed: int
    schedule: Schedule
    layers: tuple
    high_res_layers: frozenset
    panel_characters: tuple | None = None  # characters of every story panel; None: one group
    identity_rows: tuple | None = None  # story panels of the identity batch (write)
    mode: str = MODE_BATCH
    bank: IdentityBank | None = None
    first_panel: int = 0  # story panel of the first latent row (read)
    read_rows: tuple | None = None  # story panel of every latent row (read), e.g. panels 2 and 5
    attn1: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # layer -> attn1 module
    attn1_paths: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # layer -> its name in the UNet
    family: str = "UNet"  # "UNet", or the DiT family the override serves (see DIT_FAMILIES)
    fingerprint: str | None = None  # the model writing or reading the bank (attention/comfy/fingerprint.py)
    memory_budget_mib: int = AUTO_BUDGET  # extra attention memory per call, MiB (0: one query panel per call)

    def __deepcopy__(self, memo):
        return self

    def rows_for(self, batch: int) -> tuple:
        """Story panel index of each latent row; raises if the story and the batch disagree."""
        story_len = None if self.panel_characters is None else len(self.panel_characters)
        if self.mode == MODE_READ and self.read_rows is not None:
            if batch != len(self.read_rows):
                raise PatchError(f"the read run was given story panels {list(self.read_rows)} but the latent batch has "
                                 f"{batch}: set the batch size to {len(self.read_rows)} (Select Story Panels' panel_count)")
            return self.read_rows
        if self.mode == MODE_READ:
            rows = tuple(range(self.first_panel, self.first_panel + batch))
            if story_len is not None and rows[-1] >= story_len:
                raise PatchError(f"the read run covers story panels {rows[0]}-{rows[-1]} (first panel {self.first_panel}, "
                                 f"latent batch {batch}) but the story has {story_len} panels: lower first_panel or the batch size")
            return rows
        if self.mode == MODE_WRITE and self.identity_rows:
            if batch != len(self.identity_rows):
                raise PatchError(f"the story names {len(self.identity_rows)} identity panels {list(self.identity_rows)} but "
                                 f"the latent batch has {batch}: set the identity KSampler's batch size to {len(self.identity_rows)}")
            return self.identity_rows
        if story_len is not None and batch != story_len:
            raise PatchError(f"the story has {story_len} panels but the latent batch has {batch}: one latent per panel "
                             f"(set the latent batch size to {story_len}), or generate parts with the identity bank nodes")
        return tuple(range(batch))

    @property
    def bank_content(self) -> str:
        """What this model's identity bank stores (attention/bank.py): UNet hidden states or DiT keys/values."""
        return HIDDEN_STATES if self.family == "UNet" else KEYS_VALUES + self.family

    def characters_of(self, rows) -> list | None:
        return None if self.panel_characters is None else [self.panel_characters[r] for r in rows]

    def share_for(self, rows) -> torch.Tensor:
        """share[i, j]: row i reads row j (a common character; all rows when there is no story)."""
        n = len(rows)
        if self.mode == MODE_READ:
            return torch.zeros((n, n), dtype=torch.bool)  # read runs attend to the bank and themselves
        chars = self.characters_of(rows)
        if chars is None:
            return ~torch.eye(n, dtype=torch.bool)
        sets = [set(c) for c in chars]
        return torch.tensor([[i != j and bool(a & b) for j, b in enumerate(sets)] for i, a in enumerate(sets)],
                            dtype=torch.bool).reshape(n, n)


@dataclass
class RunState:
    """What one sampling run needs: its sigmas, panel rows, share mask, chunk roles, a bank writer, and
    how many steps the sampler reported done (so a second-order sampler's call at sigmas[i+1] is step i)."""
    sample_sigmas: tuple
    rows: tuple
    share: torch.Tensor
    roles: tuple = CFG_ROLES
    bank_reads: torch.Tensor | None = None
    writer: object = None
    sampler: str = ""  # the k-diffusion sampler function's name
    reported: int = -1  # the last step the sampler's callback reported (it fires after a step's first evaluation)
    evaluations_since_report: int = 0
    step: int | None = None  # the step of the evaluation in progress (None: decide by sigma)
    sigma: float | None = None  # the sigma of the evaluation in progress (read once, not per layer)
    reached: set = field(default_factory=set)  # layers whose CSA patch ran at an active step (see unreached_message)
    written_steps: set = field(default_factory=set)  # steps a bank write stored tokens for (see skipped_write_message)
    evaluations: int = 0  # model evaluations so far (a bank writer tells a second chunk of a role from Heun's re-run)
    clones: dict | None = None  # ComfyUI multi-GPU: device -> the patcher whose own model evaluates that device's chunks
    modules: dict = field(default_factory=dict)  # (device, layer) -> attn1 module of that device's model (memo)
    budgets: dict = field(default_factory=dict)  # device -> attention memory budget in bytes, fixed at its first call

    def __deepcopy__(self, memo):
        return self

    def extra_evaluations(self, i: int) -> int:
        """Evaluations step i makes after its first one at sigmas >= sigmas[i+1]'s that sigma alone cannot place.

        Every k-diffusion sampler reports a step right after its first evaluation. Midpoint methods
        (dpm_2, dpmpp_2s, ...) then evaluate between sigmas[i] and sigmas[i+1], which sigma places
        right; Heun evaluates again at exactly sigmas[i+1], Heun++ also at sigmas[i+2]."""
        last = len(self.sample_sigmas) - 1
        if self.sampler == "sample_heun":
            return 1 if i + 1 < last and self.sample_sigmas[i + 1] > 0 else 0
        if self.sampler == "sample_heunpp2":
            if i + 1 >= last or self.sample_sigmas[i + 1] <= 0:
                return 0
            return 1 if i + 2 >= last or self.sample_sigmas[i + 2] <= 0 else 2
        return 0

    def start_evaluation(self, sigma: float):
        """Called once per model evaluation (PREDICT_NOISE wrapper), before its layer calls."""
        self.sigma = sigma
        self.evaluations += 1
        if self.reported >= 0:
            self.evaluations_since_report += 1
            if self.evaluations_since_report <= self.extra_evaluations(self.reported):
                self.step = self.reported
                return
        self.step = step_index(sigma, self.sample_sigmas)

    def attn1_of(self, config: CSAConfig, layer, device=None):
        """The attn1 module of `layer` in the model running this call. ComfyUI's multi-GPU (0.29+) evaluates the
        chunks of a step concurrently on per-device deep clones of the model (transformer_options
        ["multigpu_thread_device"] names the device): its layer is that clone's own module, with that device's
        weights, never the main model's (config.attn1)."""
        if device is None or not self.clones or device not in self.clones:
            return config.attn1[layer]
        key = (device, layer)
        module = self.modules.get(key)
        if module is None:  # a benign race: two threads resolve the same module
            module = self.clones[device].model.diffusion_model.get_submodule(config.attn1_paths[layer])
            self.modules[key] = module
        return module

    def attention_budget(self, config: CSAConfig, device, free_memory) -> int:
        """Bytes the query panels' K/V buffers of one attention call may take on `device` (core.panels_per_call):
        the node's budget, or by default AUTO_BUDGET_SHARE of the memory `free_memory(device)` reports at this
        run's first call on the device (0 on the CPU: one panel per call, the CPU's fastest, see the README)."""
        key = str(device)
        budget = self.budgets.get(key)
        if budget is None:
            budget = resolve_budget(config.memory_budget_mib, torch.device(device), free_memory)
            self.budgets[key] = budget  # a benign race under multi-GPU threads: both compute the same kind of value
        return budget

    def reach(self, step: int, layer) -> None:
        """A selected layer's patch ran at an active step: CSA is really in this run's attention."""
        self.reached.add(layer)

    def window(self, config: CSAConfig) -> int:
        """The sliding window of this run: none in a read run, whose panels share nothing with each other (each
        reads the bank), so every window would repeat the same work."""
        return 0 if self.bank_reads is not None else config.window

    def unreached_message(self, config: CSAConfig) -> str | None:
        """Why this finished run did not get Consistent Self-Attention everywhere it should, or None.

        A layer is due when the schedule makes it active at some step of this run; a due layer whose patch never
        ran means another node took the attention slot (or the forward) after ours without chaining it."""
        if config.rate <= 0 and config.rate_high_res <= 0 and config.mode != MODE_READ:
            return None
        planned = planned_steps(config, self.sample_sigmas)
        due = [layer for layer in config.layers if planned(layer) > 0]
        missing = [layer for layer in due if layer not in self.reached]
        if not missing:
            return None
        shown = ", ".join(" ".join(str(p) for p in layer[:2]) for layer in missing[:6]) + (" ..." if len(missing) > 6 else "")
        if config.family == "UNet":
            causes = ("another node set its own attn1 replace on these blocks after Consistent Self-Attention without "
                      "chaining it (put that node before Consistent Self-Attention, which keeps what it finds)")
        else:
            causes = ("another node put its own attention override on the MODEL after Consistent Self-Attention without "
                      "calling the one it found, a cache or speed-up node replaced the model's forward (its blocks then "
                      "do not name themselves), or SD3's 'dit' block replace was overwritten (put such nodes before "
                      "Consistent Self-Attention, or remove them)")
        return (f"StoryDiffusion: Consistent Self-Attention ran in {len(due) - len(missing)} of the {len(due)} "
                f"{config.family} layers it was to share in this run (never in: {shown}), so those panels were drawn "
                f"without it. Likely cause: {causes}.")

    def write(self, step: int, layer, roles, tokens: torch.Tensor, num_tokens: int) -> None:
        """Hand one layer's sampled tokens of this evaluation to the bank writer."""
        self.writer.put(step, layer, roles, tokens, num_tokens, evaluation=self.evaluations)
        self.written_steps.add(step)

    def skipped_write_message(self, config: CSAConfig) -> str | None:
        """Why this finished write run's bank would miss steps a read will ask for, or None. A step the schedule
        makes active that stored nothing means its model evaluation never ran: a cache node (EasyCache,
        LazyCache, ...) reused an earlier output instead, and a read at that step would find no tokens."""
        planned = planned_steps(config, self.sample_sigmas)
        if not self.written_steps or not any(planned(layer) for layer in config.layers):
            return None
        due = {i for i in range(len(self.sample_sigmas) - 1)
               for layer in config.layers if config.schedule.active(i, self.sample_sigmas[i], layer)}
        missing = sorted(due - self.written_steps)
        if not missing:
            return None
        return (f"StoryDiffusion: the identity bank write skipped steps {missing} of {len(self.sample_sigmas) - 1}: "
                "their model evaluations never ran, so no tokens were stored for them (a cache node such as EasyCache "
                "or LazyCache reuses earlier outputs). Remove the cache node from the identity write's MODEL (the "
                "read runs may keep it). Nothing was written to the identity bank.")

    def report(self, i: int):
        self.reported, self.evaluations_since_report = int(i), 0

    def step_of(self, sigma: float) -> int:
        """The step a model call belongs to (a Heun correction at exactly sigmas[i+1] is step i)."""
        return self.step if self.step is not None else step_index(sigma, self.sample_sigmas)

    def sigma_of(self, options: dict) -> float:
        """This call's sigma: the evaluation's, read once by the PREDICT_NOISE wrapper (reading the sigmas tensor
        in every layer would make the CPU wait for the GPU there), else from the call's options."""
        return self.sigma if self.sigma is not None else float(options["sigmas"].flatten()[0])

    def roles_of(self, kinds) -> list:
        return role_names(self.roles, kinds)

    def rows_of_call(self, rows_in_call: int, chunks: int, extra_options: dict) -> tuple:
        """(story panel of each latent row, share mask) for a call with `rows_in_call` attention rows: the
        whole run, or the frames of an AnimateDiff context window; anything else is an error."""
        batch = rows_in_call // chunks
        if batch * chunks == rows_in_call and batch == len(self.rows):
            return self.rows, self.share
        if batch * chunks == rows_in_call:
            return context_window(self, batch, extra_options)
        raise PatchError(f"StoryDiffusion: attention batch {rows_in_call} does not split into {chunks} chunks of "
                         f"{len(self.rows)} panels (another node changed the batch?)")


def resolve_budget(mib: int, device: torch.device, free_memory) -> int:
    """Budget in bytes: `mib` MiB when it is set (>= 0), else AUTO_BUDGET_SHARE of `free_memory(device)` on an
    accelerator and 0 (one panel per call) on the CPU."""
    if mib is not None and int(mib) >= 0:
        return int(mib) * 2**20
    if device.type == "cpu":
        return 0
    try:
        free = int(free_memory(device) or 0)
    except Exception:  # noqa: BLE001 (a ComfyUI that cannot tell: one panel per call, the least memory)
        return 0
    return int(free * AUTO_BUDGET_SHARE)


def planned_steps(config: CSAConfig, sigmas: tuple):
    """layer -> how many steps of this run write it (what the schedule lets a read use), memoised."""
    counts: dict = {}

    def planned(layer) -> int:
        if layer not in counts:
            counts[layer] = sum(1 for i in range(len(sigmas) - 1) if config.schedule.active(i, sigmas[i], layer))
        return counts[layer]
    return planned


def context_window(run: RunState, batch: int, extra_options: dict) -> tuple:
    """AnimateDiff-Evolved context windows: the call holds `batch` of the run's frames, whose absolute
    indices ADE gives in ad_params["sub_idxs"]; frames share with the frames of their window."""
    sub_idxs = (extra_options.get("ad_params") or {}).get("sub_idxs")
    if sub_idxs is None or len(sub_idxs) != batch or max(sub_idxs) >= len(run.rows):
        raise PatchError(f"StoryDiffusion: the attention call holds {batch} latents but the run has {len(run.rows)} "
                         "panels, and no AnimateDiff context window says which: another node changed the batch?")
    if run.writer is not None or run.bank_reads is not None:
        raise PatchError("StoryDiffusion: the identity bank needs every panel in one model call; it does not work "
                         "under AnimateDiff context windows (use context_length >= the frame count, or no bank)")
    index = torch.as_tensor(list(sub_idxs), dtype=torch.long)
    return tuple(run.rows[i] for i in sub_idxs), run.share[index][:, index]


class AttentionCalls:
    """The attention calls a model call (or one block) will make, in ComfyUI's code order, for families whose
    blocks do not name themselves in transformer_options (SD3, Lumina 2 / Z-Image, HiDream).

    Each entry: (layer key or None for an attention CSA never touches, tokens before the image tokens,
    image tokens, total tokens of the call). The override takes one entry per call; a call whose token
    count differs from the entry's means another patch added or changed attention calls, and is refused
    rather than guessed. After the model call `check_all_made` refuses a call that never came once CSA has
    used an entry: every call after the missing one was placed on the wrong block (wrong seed, wrong layer,
    wrong bank key)."""

    def __init__(self, family: str, calls: list):
        self.family = family
        self.calls = calls
        self.at = 0
        self.used = False  # CSA shared, wrote or read tokens for one of this call's entries

    def __deepcopy__(self, memo):
        return self

    def next(self, tokens: int):
        if self.at >= len(self.calls):
            raise PatchError(f"StoryDiffusion: a {self.family} model call made more than the {len(self.calls)} attention "
                             f"calls its blocks make (another patch adds attention?): cannot tell which block this is")
        layer, before, image, expected = self.calls[self.at]
        self.at += 1
        if tokens != expected:
            raise PatchError(f"StoryDiffusion: {self.family} attention call {self.at} attends over {tokens} tokens, not the "
                             f"{expected} its block has (another patch changed the tokens?): cannot place the image tokens")
        return layer, before, image

    def check_all_made(self):
        if self.at != len(self.calls) and self.used:
            raise PatchError(f"StoryDiffusion: a {self.family} model call made {self.at} of the {len(self.calls)} attention "
                             "calls its blocks make, so Consistent Self-Attention placed later calls on the wrong blocks. "
                             "Another node skips attention calls (a block cache, an attention-skipping patch): remove "
                             "it from this MODEL, or put it after Consistent Self-Attention's sampling.")


def patched_image_tokens(x: torch.Tensor, patch: int) -> int:
    """Image tokens of a latent [.., H, W] cut into patch x patch patches after padding (common_dit.pad_to_patch_size)."""
    h, w = x.shape[-2:]
    return (-(-h // patch)) * (-(-w // patch))
