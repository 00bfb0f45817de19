"""The writer of one identity bank write run: collects the run's tokens and hands them to the bank only when the
run completes, keeping them in memory or, step by step, in files on disk (see BankWriter)."""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch

from .bank_format import HIDDEN_STATES, BankError, encode, entry_bytes, layer_name, tensor_prefix
from .bank_store import SpillFolder, write_step_file


class BankWriter:
    """Collects one write run; the bank only changes when the run completes (commit).

    A bank grows with steps x layers x sampled tokens: on a DiT at 1024 px that is about 1 GB per identity image
    per step at the default blocks, more than a machine's RAM over a whole run. Every entry of a (layer, role) has
    the same size from step to step, so once the first written step is done the writer knows what the whole run
    will store (`planned_steps(layer)` steps per layer). Then, by the bank's `keep`:
    - "memory": a run whose bank would pass `memory_limit` stops with a BankError saying what to change, before
      the memory is gone, instead of the process being killed;
    - "disk": every finished step goes to its own file in a new folder under `spill_parent` (one step in memory);
      a run that would pass `disk_limit` stops the same way;
    - "auto": memory while the projection fits, else disk.
    Stored bytes past the memory limit inside a step (layers a random schedule skipped in the first step) move
    the finished steps to disk ("auto", "disk") or stop the run ("memory").

    A run the writer cannot store faithfully stops at once (BankError) rather than leave a bank that reads
    wrong later: two chunks of one role in a model call, or one layer called at two token counts.

    `put` may be called from several threads at once (ComfyUI's multi-GPU evaluates the positive and negative
    chunks of one step concurrently, each on its own device): a lock of this writer (one per run) serialises it."""

    def __init__(self, bank, panels, characters, sample_sigmas, content: str = HIDDEN_STATES,
                 planned_steps=None, memory_limit: int | None = None, spill_parent: str | None = None,
                 disk_limit: int | None = None, grid: tuple[int, int] | None = None, fingerprint: str | None = None):
        self.bank = bank
        self.content = content
        self.panels = panels
        self.characters = characters
        self.sample_sigmas = sample_sigmas
        self.grid = grid  # the latent's token grid (rows, columns) of this run, as the glue measures it
        self.fingerprint = fingerprint  # the writing model, as the glue describes it (opaque here)
        self.entries: dict = {}  # in memory: the whole bank, or (spilling) the step in progress
        self.file_keys: dict = {}  # spilled: key -> (step file, tensor name prefix)
        self.layer_tokens: dict = {}
        self.planned_steps = planned_steps
        self.memory_limit = memory_limit
        self.spill_parent = spill_parent
        self.disk_limit = disk_limit
        self.spill: SpillFolder | None = None  # the step files, when kept on disk
        self.written_in: dict = {}  # key -> the model evaluation that wrote it (see put)
        self.memory_bytes = 0  # bytes of self.entries
        self.entry_bytes: dict = {}  # (layer, role) -> bytes of one step's entry
        self.step: int | None = None  # the step the last put wrote
        self.lock = threading.Lock()  # put from several threads (multi-GPU chunks of one evaluation)
        if bank.keep == "disk":
            self._start_spilling()

    @property
    def spill_folder(self) -> str | None:
        return None if self.spill is None else self.spill.path

    @property
    def nbytes(self) -> int:
        """Bytes stored so far, in memory and on disk."""
        on_disk = sum(os.path.getsize(path) for path in {path for path, _ in self.file_keys.values()})
        return self.memory_bytes + on_disk

    def put(self, step: int, layer, roles: Sequence[str], hidden: torch.Tensor, num_tokens: int,
            evaluation: int | None = None):
        """hidden: [chunks, panels, n, channels] sampled tokens (hidden states, or a DiT's keys and values), one
        chunk per entry of `roles`; `num_tokens`: the layer's full token count. A key already written keeps its
        first tokens (a second-order sampler evaluates a step twice); `evaluation` (optional, the glue's count of
        model evaluations) tells such a later evaluation from a second call of the same evaluation, which is a
        second chunk of a role that ComfyUI sent in a call of its own."""
        with self.lock:
            self._put(step, layer, roles, hidden, num_tokens, evaluation)

    def _put(self, step: int, layer, roles: Sequence[str], hidden: torch.Tensor, num_tokens: int,
             evaluation: int | None):
        self._check_call(layer, list(roles), int(num_tokens))
        if self.step is not None and step != self.step:
            self._step_done()
        self.step = int(step)
        self.layer_tokens[layer] = int(num_tokens)
        for c, role in enumerate(roles):
            key = (int(step), layer, role)
            if evaluation is not None and self.written_in.get(key, evaluation - 1) == evaluation:
                self._repeated_role(role, layer, "two calls of one model evaluation")
            if key not in self.entries and key not in self.file_keys:
                self.written_in[key] = evaluation
                stored, scale = encode(hidden[c].detach(), self.bank.dtype_name, scaled=self.content != HIDDEN_STATES)
                self.entries[key] = (stored.to("cpu"), None if scale is None else scale.to("cpu"))
                size = entry_bytes(stored, scale)
                self.entry_bytes[(layer, role)] = size
                self.memory_bytes += size
        if self.memory_limit is not None and self.memory_bytes > self.memory_limit:
            if self.bank.keep != "memory" and self.spill_parent is not None:
                self._spill(finished_only=True)
            if self.memory_bytes > self.memory_limit:
                self._refuse(self.memory_bytes, "has stored", "memory", self.memory_limit)

    def _check_call(self, layer, roles: list, num_tokens: int):
        repeated = sorted({role for role in roles if roles.count(role) > 1})
        if repeated:
            self._repeated_role(repeated[0], layer, f"one model call (chunks {roles})")
        written = self.layer_tokens.get(layer)
        if written is not None and written != num_tokens:
            self.discard()
            raise BankError(
                f"this identity bank write called layer {layer_name(layer)} with {written} tokens and then with "
                f"{num_tokens}: the bank stores one resolution per layer, and area conditioning (Conditioning (Set "
                f"Area) and similar) runs the model on parts of the latent. Write and read the identity bank "
                f"without area conditioning; nothing was written.")

    def _repeated_role(self, role: str, layer, where: str):
        """Two chunks of one role (several conditionings of one prompt batched by ComfyUI, e.g. from Conditioning
        (Combine)): the bank keys tokens by role, so it could keep only one of them and read it back for both."""
        self.discard()
        raise BankError(
            f"this identity bank write got two {role} chunks in {where} at layer {layer_name(layer)}: the bank "
            f"keeps one set of tokens per prompt ({role}, ...), so it cannot store both. Give the identity run one "
            f"conditioning per prompt (no Conditioning (Combine) on its {role} input); nothing was written.")

    def projected_bytes(self) -> int:
        """What the whole run will store, from the entries seen so far (exact once every layer has been written)."""
        if self.planned_steps is None:
            return self.nbytes
        return sum(size * int(self.planned_steps(layer)) for (layer, _), size in self.entry_bytes.items())

    def _step_done(self):
        """A step is finished: check the projection, and move the step to disk when spilling."""
        projected = self.projected_bytes()
        if self.spill_folder is None and self.memory_limit is not None and projected > self.memory_limit:
            if self.bank.keep == "memory" or self.spill_parent is None:
                self._refuse(projected, "would store", "memory", self.memory_limit)
            self._start_spilling()
        if self.spill_folder is not None:
            if self.disk_limit is not None and projected > self.disk_limit:
                self._refuse(projected, "would store", f"disk space in {self.spill_parent}", self.disk_limit)
            self._spill(finished_only=False)

    def _start_spilling(self):
        if self.spill_parent is None:
            raise BankError("this identity bank is kept on disk, but no folder for it was given")
        self.spill = SpillFolder(self.spill_parent)

    def _spill(self, finished_only: bool):
        """Write the steps in memory (all, or all before the current one) to one file per step and drop them."""
        if self.spill is None:
            self._start_spilling()
        steps = sorted({key[0] for key in self.entries if not finished_only or key[0] != self.step})
        for step in steps:
            entries = {k: v for k, v in self.entries.items() if k[0] == step}
            path = self.spill.step_file(step)
            write_step_file(path, entries)
            for key, (stored, scale) in entries.items():
                self.file_keys[key] = (path, tensor_prefix(key))
                self.memory_bytes -= entry_bytes(stored, scale)
                del self.entries[key]

    def _refuse(self, nbytes: int, verb: str, where: str, limit: int):
        self.discard()
        layers = len({layer for layer, _ in self.entry_bytes})
        raise BankError(
            f"this identity bank write {verb} about {nbytes / 2**30:.1f} GiB ({len(self.panels)} identity panels, "
            f"{len(self.sample_sigmas) - 1} steps, {layers} layers, {self.bank.dtype_name}), more than the "
            f"{limit / 2**30:.1f} GiB of free {where} it may use; nothing was written. Make it smaller: "
            f"dtype fp8 (half of fp16), fewer layers on 'Consistent Self-Attention' (a custom list; on Flux.1 e.g. "
            f"'double 10-18'), a lower rate, an end_percent below 1, fewer steps, or fewer identity panels per write"
            + ("; or set keep to 'disk' or 'auto' on 'Identity Bank Write' to keep it on disk." if where == "memory"
               and self.bank.keep == "memory" else "."))

    def discard(self):
        """Drop what this run wrote, and only that: an interrupted or refused run leaves no files behind, and the
        bank keeps what an earlier write committed (so the glue must not clear the bank after a failed run)."""
        if self.spill is not None:
            self.spill.remove()
            self.spill = None
        self.entries, self.file_keys, self.memory_bytes = {}, {}, 0

    def commit(self):
        """The run completed: the bank now holds what it wrote (and owns its step files), in place of what it held."""
        if self.spill is not None:
            self._step_done()  # the last step: checked and written like the others
        bank = self.bank
        storage, dtype, keep = bank.storage, bank.dtype_name, bank.keep
        bank.clear()
        bank.storage, bank.dtype_name, bank.keep = storage, dtype, keep
        bank.entries = self.entries
        bank.file_keys = self.file_keys
        bank.spill, self.spill = self.spill, None
        bank.panels = self.panels
        bank.characters = self.characters
        bank.sample_sigmas = self.sample_sigmas
        bank.layer_tokens = self.layer_tokens
        bank.content = self.content
        bank.grid = self.grid
        bank.fingerprint = self.fingerprint
