"""The identity bank: sampled self-attention inputs of the identity panels, per step, layer and chunk role.

StoryDiffusion's released code first denoises a few identity panels together (write) and stores
what they share; every other panel is then generated alone and reads the stored tokens of its
characters (read), so a story of any length costs the memory of the identity batch plus one panel.

What is stored is what the official code stores: the *hidden states entering attn1* (normalised,
before to_k/to_v) of the tokens each identity panel shares, one tensor [panels, tokens, channels]
per (step, layer, role). A read projects them with the layer's own to_k/to_v (the projections are
per token, so this is exact), which halves the bytes against storing keys and values. Options:
- dtype fp16 / bf16 / fp32, or fp8 (e4m3, half of fp16; LayerNorm outputs stay far inside its +-448
  range). fp8's 3 mantissa bits keep a value within 6.25% only in its normal range (|x| >= 2^-6); below,
  the error is up to 2^-10 ~ 0.001 absolute (0.003 -> 0.0039, 0.0009 -> 0), so the bound is
  max(6.25% of |x|, 0.001) per value (bank_format.py);
- only (step, layer) pairs at which the schedule lets a read use the bank are written;
- reads stream one step at a time: a loaded bank is memory-mapped and each step's tensors are
  read (and, with storage "device", moved to the sampling device; with "cpu" and a CUDA device, pinned
  so every layer's copy is asynchronous) when that step starts, so a read run's memory does not grow
  with the number of steps; `release()` drops that step when the run ends;
- `keep`: a write run keeps the bank in memory, or writes each finished step to a file on disk
  ("disk"; one step in memory at a time), or decides after its first step ("auto": memory when the
  whole bank fits in free memory, else disk). A spilled bank reads like a loaded one; its step files
  go with the bank (clear(), a rewrite, or the bank object being dropped).
- the bank records what a read must match: the step schedule, the model kind, the token count of every
  layer and, when the glue gives them, the latent's token grid (rows, columns) and a fingerprint of
  the writing model (compared by `writer_mismatch`, for a warning).

Roles name the chunks of a model call: "positive", "negative" and, under DualCFGGuider, "middle".

DiT models (Flux, SD3, Qwen-Image, ...) compute q/k/v inside their blocks with fused projections, q/k
norms and RoPE; the attention override that serves them sees only the finished keys and values. A DiT
bank therefore stores the sampled image *keys and values* (after RoPE), [panels, tokens, 2 * channels]:
twice the bytes of hidden states, read back exactly. The bank records its content ("hidden_states", or
"keys_values:<family>"), and a model of another kind or family refuses it. In fp8, keys/values (which no
norm bounds) are stored with one scale per tensor.

Plain torch; save/load uses safetensors with a JSON header, so a character can be reused later.
This module is the bank (what it holds, reads, save and load); a write run is bank_writer.py, the files on
disk bank_store.py, and the names, dtypes and token encoding they share bank_format.py.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from .bank_format import (
    DTYPES,
    FORMAT,
    HIDDEN_STATES,
    KEEP_CHOICES,
    KEYS_VALUES,
    BankError,
    content_name,
    decode,
    entry_bytes,
    layer_name,
    parse_layer,
    parse_prefix,
)
from .bank_store import SpillFolder, copy_bank_file, looks_like_bank_file, read_bank_file, read_tensors, save_bank_file
from .bank_writer import BankWriter

# names callers import from here (the nodes, the ComfyUI glue, tests, benches): the bank's one public module
__all__ = ["HIDDEN_STATES", "KEEP_CHOICES", "KEYS_VALUES", "BankError", "BankWriter", "IdentityBank", "content_name",
           "looks_like_bank_file"]


class IdentityBank:
    """Sampled hidden states of identity panels, keyed by (step, layer, role).

    `panels` are the story panel indices of the written rows and `characters` their characters
    (None when written without a story: then every reader reads every row). Mutable on purpose —
    a write run fills it, later runs read it — and shared, not copied, by ModelPatcher.clone().
    """

    def __init__(self, storage: str = "cpu", dtype: str = "fp16", keep: str = "auto"):
        if dtype not in DTYPES:
            raise BankError(f"bank dtype must be one of {list(DTYPES)}, not {dtype!r}")
        if storage not in ("cpu", "device"):
            raise BankError(f"bank storage must be 'cpu' or 'device', not {storage!r}")
        if keep not in KEEP_CHOICES:
            raise BankError(f"bank keep must be one of {list(KEEP_CHOICES)}, not {keep!r}")
        self.storage = storage  # where the current step's tokens live during a read
        self.dtype_name = dtype
        self.keep = keep  # where a write run keeps the bank
        self.spill: SpillFolder | None = None  # the step files of a bank kept on disk (its own)
        self.clear()

    def __deepcopy__(self, memo):
        return self

    def clear(self):
        if self.spill is not None:
            self.spill.remove()
        self.spill = None
        self.entries: dict = {}  # key -> (stored, scale) for a bank in memory
        self.file_keys: dict = {}  # key -> (file, tensor name prefix): read from files, step by step
        self.panels: tuple[int, ...] = ()
        self.characters: tuple[tuple[str, ...], ...] | None = None
        self.sample_sigmas: tuple[float, ...] = ()
        self.layer_tokens: dict = {}  # layer -> full token count at write (resolution check)
        self.content: str = HIDDEN_STATES  # what the tensors are (see the module docstring)
        self.grid: tuple[int, int] | None = None  # the write's latent token grid (rows, columns); None: not recorded
        self.fingerprint: str | None = None  # the writing model, as the glue describes it; None: not recorded
        self.release()

    def release(self):
        """Drop the decoded steps a read keeps (on each GPU with storage "device", in pinned memory with "cpu"):
        called when a read run ends, so they do not sit outside ComfyUI's memory management during VAE decode
        and the next model load. The next read decodes its steps again."""
        # where the tokens are kept -> (step, dtype, pinned, {key: decoded}): one step per device, so GPUs reading
        # in threads at once (core multi-GPU, storage "device") each keep their own step instead of taking turns
        self._step_cache: dict = {}

    def decoded_steps(self) -> dict:
        """{device: the step a read keeps decoded there} (what release() drops)."""
        return {device: entry[0] for device, entry in dict(self._step_cache).items()}

    @property
    def spill_folder(self) -> str | None:
        return None if self.spill is None else self.spill.path

    @property
    def empty(self) -> bool:
        return not self.entries and not self.file_keys

    def keys(self) -> set:
        return set(self.entries) | set(self.file_keys)

    def files(self) -> list[str]:
        """The files the bank reads from (one for a loaded bank, one per step for a spilled one)."""
        return sorted({path for path, _ in self.file_keys.values()})

    def nbytes(self) -> int:
        self._check_files(self.files())
        return sum(os.path.getsize(path) for path in self.files()) + sum(
            entry_bytes(t, s) for t, s in self.entries.values())

    def _check_files(self, paths):
        """A BankError saying what happened and what to do when files the bank reads from are gone."""
        if all(os.path.isfile(path) for path in paths):
            return
        missing = [path for path in self.files() if not os.path.isfile(path)] or list(paths)
        if self.spill is not None:
            raise BankError(
                f"the identity bank kept on disk lost {len(missing)} of its {len(self.files())} step files in "
                f"{self.spill.path} (ComfyUI empties its temp folder when it starts: another ComfyUI on this "
                f"install, or a cleanup, removed them). Run the identity panels through 'Identity Bank Write "
                f"(StoryDiffusion)' again; to keep a bank across ComfyUI starts, save it with 'Save Identity Bank "
                f"(StoryDiffusion)' and load it with 'Load Identity Bank (StoryDiffusion)'.")
        raise BankError(f"the identity bank file {missing[0]} is gone (moved or deleted since it was loaded): load "
                        f"it again with 'Load Identity Bank (StoryDiffusion)', or write the bank again")

    def describe(self) -> str:
        if self.empty:
            return "empty identity bank"
        steps = len(self.sample_sigmas) - 1
        return (f"identity bank of {content_name(self.content)}: {len(self.panels)} panels {list(self.panels)}, "
                f"{steps} steps, {len(self.layer_tokens)} layers, {self.nbytes() / 2**20:.1f} MiB {self.dtype_name}")

    # ---------------------------------------------------------------------------------------------
    # writing

    def begin_write(self, panels: Sequence[int], characters, sample_sigmas: Sequence[float],
                    content: str = HIDDEN_STATES, planned_steps=None, memory_limit: int | None = None,
                    spill_parent: str | None = None, disk_limit: int | None = None,
                    grid: Sequence[int] | None = None, fingerprint: str | None = None) -> BankWriter:
        """A writer for one run. `planned_steps(layer)`: how many steps of the run will write `layer`;
        `memory_limit` / `disk_limit`: bytes of free memory / disk the bank may take; `spill_parent`: where a bank
        kept on disk gets its folder (see BankWriter); `grid`: the latent's token grid (rows, columns), which a
        read must match (check_run); `fingerprint`: the writing model, compared by writer_mismatch. The bank
        changes only when the writer commits; discard() leaves it as it was."""
        return BankWriter(self, tuple(int(p) for p in panels),
                          None if characters is None else tuple(tuple(c) for c in characters),
                          tuple(float(s) for s in sample_sigmas), content, planned_steps, memory_limit,
                          spill_parent, disk_limit, grid=_grid(grid), fingerprint=fingerprint)

    # ---------------------------------------------------------------------------------------------
    # reading

    def check_run(self, sample_sigmas: Sequence[float], content: str = HIDDEN_STATES, grid: Sequence[int] | None = None):
        """Raise a BankError unless this bank was written by the same kind of model with the same sampling schedule
        and, when both the bank and the run know it, the same latent token grid (rows, columns)."""
        if self.empty:
            raise BankError("the identity bank is empty: run a KSampler on the MODEL of 'Identity Bank Write "
                            "(StoryDiffusion)' first (connect its LATENT output to the 'after' input of the read node), or load a bank")
        if self.content != content:
            raise BankError(f"the identity bank was written with {content_name(self.content)} and cannot be read by "
                            f"{content_name(content)}: write the bank with the model you read it with")
        sigmas = tuple(float(s) for s in sample_sigmas)
        if len(sigmas) != len(self.sample_sigmas):
            raise BankError(f"the identity bank was written with {len(self.sample_sigmas) - 1} sampling steps, this run has "
                            f"{len(sigmas) - 1}: use the same steps, scheduler and denoise as the identity run")
        if any(abs(a - b) > 1e-3 * max(1.0, abs(b)) for a, b in zip(sigmas, self.sample_sigmas)):
            raise BankError("the identity bank was written with another noise schedule (same step count, different "
                            "sigmas): use the same scheduler and denoise as the identity run")
        grid = _grid(grid)
        if grid is not None and self.grid is not None and grid != self.grid:
            same = grid[0] * grid[1] == self.grid[0] * self.grid[1]
            raise BankError(
                f"the identity bank was written at another resolution: a latent of {self.grid[0]}x{self.grid[1]} "
                f"(height x width), this run's is {grid[0]}x{grid[1]}"
                + (" (the same size in another shape: each token belongs to a place in the picture)"
                   if same else "") + ": use the identity run's width and height")

    def writer_mismatch(self, fingerprint: str | None) -> str | None:
        """Why the model reading this bank may not be the one that wrote it, or None (the same fingerprint, or one
        side unknown, e.g. a bank saved before fingerprints). For a warning: a bank of another fine-tune or LoRA
        set still reads, but it holds what the writing model computed."""
        if fingerprint is None or self.fingerprint is None or fingerprint == self.fingerprint:
            return None
        return (f"the identity bank was written by another model than the one reading it (writer {_short(self.fingerprint)}, "
                f"reader {_short(fingerprint)}): other weights or LoRAs make the bank tokens fit this model less; "
                f"write the bank with the model (and LoRAs) you read it with")

    def reads_for(self, rows: int, characters_of_rows=None) -> torch.Tensor:
        """[rows, bank panels] bool: which bank panels each row reads (shared character; all without a story)."""
        if self.characters is None or characters_of_rows is None:
            return torch.ones((rows, len(self.panels)), dtype=torch.bool)
        mine = [set(c) for c in characters_of_rows]
        theirs = [set(c) for c in self.characters]
        return torch.tensor([[bool(a & b) for b in theirs] for a in mine], dtype=torch.bool).reshape(rows, len(theirs))

    def stored_tokens(self, step: int, layer, roles: Sequence[str], num_tokens: int, device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[chunks, bank panels, tokens, channels]: the stored tokens (UNet hidden states, or a DiT's keys and
        values) for one layer call, one chunk per role, on `device` (None: where the bank keeps the step).

        Tensors of one step are decoded (and moved) once per device and kept there until the next step is asked for
        on that device (or release()); reads on several devices at once (threads) each keep their own.
        With storage "cpu" and a CUDA device they are kept in pinned memory and copied with non_blocking=True: a
        copy from pageable memory would wait for all the GPU work queued before it, in every layer of every call.
        """
        written = self.layer_tokens.get(layer)
        if written is None:
            raise BankError(f"the identity bank has no tokens for layer {layer_name(layer)}: write and read with the "
                            f"same layer selection (bank layers: {', '.join(map(layer_name, self.layer_tokens))})")
        if written != num_tokens:
            raise BankError(f"the identity bank was written at another resolution ({written} tokens at layer "
                            f"{layer_name(layer)}, this run has {num_tokens}): use the identity run's width and height")
        target = torch.device("cpu") if self.storage == "cpu" or device is None else torch.device(device)
        pin = pins_reads(self.storage, device)
        entry = self._step_cache.get(target)
        if entry is None or entry[:3] != (step, dtype, pin):
            entry = (step, dtype, pin, {})
            self._step_cache[target] = entry  # drops this device's previous step before loading this one
        cache = entry[3]
        out = []
        for role in roles:
            key = (int(step), layer, role)
            if key not in cache:
                cache.update(self._load_step(int(step), target, dtype, wanted=key, pin=pin))
            if key not in cache:
                raise BankError(f"the identity bank holds no {role} pass for step {step} layer {layer_name(layer)}: "
                                f"write it with the same guider, cfg, schedule and start/end percent as this run "
                                f"(cfg 1.0 skips the negative pass; the bank holds {sorted({k[2] for k in self.keys()})})")
            out.append(cache[key])
        if device is not None and target != torch.device(device):  # storage "cpu" read by another device
            out = [tokens.to(device, non_blocking=pin) for tokens in out]
        return torch.stack(out)

    def _load_step(self, step: int, device, dtype, wanted, pin: bool = False) -> dict:
        keys = [k for k in self.keys() if k[0] == step]
        if wanted not in keys:
            return {}
        loaded = {k: decode(*self.entries[k], dtype).to(device) for k in keys if k in self.entries}
        by_file: dict = {}
        for key in keys:
            if key in self.file_keys:
                path, prefix = self.file_keys[key]
                by_file.setdefault(path, []).append((key, prefix))
        self._check_files(by_file)
        try:
            loaded.update(read_tensors(by_file, dtype, device))
        except FileNotFoundError:  # removed between the check and the read
            self._check_files(by_file)
            raise
        if pin:
            loaded = {key: tokens.pin_memory() for key, tokens in loaded.items()}
        return loaded

    # ---------------------------------------------------------------------------------------------
    # files

    def save(self, path: str):
        """Write a .safetensors file (atomically: a temp file renamed into place, with the umask's mode)."""
        if self.empty:
            raise BankError("the identity bank is empty: nothing to save (run the identity KSampler first)")
        self._check_files(self.files())
        if not self.entries and self.spill is None:  # a loaded bank is its file
            copy_bank_file(self.files()[0], path)
            return
        header = {"panels": list(self.panels),
                  "characters": None if self.characters is None else [list(c) for c in self.characters],
                  "sample_sigmas": list(self.sample_sigmas),
                  "layer_tokens": {layer_name(k): n for k, n in self.layer_tokens.items()},
                  "dtype": self.dtype_name,
                  "content": self.content,
                  "grid": None if self.grid is None else list(self.grid),
                  "fingerprint": self.fingerprint}
        metadata = {"format": FORMAT, "bank": json.dumps(header)}
        # a bank on disk is streamed from its step files into one file, a tensor at a time
        try:
            save_bank_file(path, metadata, self.entries, [(prefix, file) for file, prefix in self.file_keys.values()])
        except FileNotFoundError:  # a step file removed while saving
            self._check_files(self.files())
            raise

    @classmethod
    def load(cls, path: str, storage: str = "cpu") -> IdentityBank:
        """Open a saved bank: reads its header now and its tensors step by step during reads."""
        name = os.path.basename(path)
        header, names = read_bank_file(path)
        try:
            bank = cls(storage=storage, dtype=header.get("dtype", "fp16"))
            bank.panels = tuple(header["panels"])
            bank.characters = None if header["characters"] is None else tuple(tuple(c) for c in header["characters"])
            bank.sample_sigmas = tuple(header["sample_sigmas"])
            bank.layer_tokens = {parse_layer(k): int(n) for k, n in header["layer_tokens"].items()}
            bank.content = str(header.get("content", HIDDEN_STATES))
            bank.grid = _grid(header.get("grid"))  # banks saved before the grid was recorded: the token count check
            bank.fingerprint = None if header.get("fingerprint") is None else str(header["fingerprint"])
            for tensor_name in names:
                if tensor_name.endswith("/h"):
                    prefix = tensor_name[:-2]
                    bank.file_keys[parse_prefix(prefix)] = (os.path.abspath(path), prefix)
        except (KeyError, ValueError, TypeError) as e:
            raise BankError(f"identity bank {name} is damaged ({e}): save the bank again") from None
        if bank.empty:
            raise BankError(f"identity bank {name} holds no tokens")
        return bank


def pins_reads(storage: str, device) -> bool:
    """Whether a read keeps its step in pinned host memory: storage "cpu" read by a CUDA device (see stored_tokens)."""
    return (storage == "cpu" and device is not None and torch.device(device).type == "cuda"
            and torch.cuda.is_available())


def _grid(grid) -> tuple[int, int] | None:
    if grid is None:
        return None
    if len(grid) != 2 or min(int(n) for n in grid) < 1:
        raise BankError(f"a latent token grid is (rows, columns) of positive sizes, not {grid!r}")
    return (int(grid[0]), int(grid[1]))


def _short(fingerprint: str, limit: int = 48) -> str:
    return repr(fingerprint if len(fingerprint) <= limit else fingerprint[:limit - 1] + "…")
