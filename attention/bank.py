"""The identity bank: sampled self-attention inputs of the identity panels, per step, layer and chunk role.

StoryDiffusion's released code first denoises a few identity panels together (write) and stores
what they share; every other panel is then generated alone and reads the stored tokens of its
characters (read), so a story of any length costs the memory of the identity batch plus one panel.

What is stored is what the official code stores: the *hidden states entering attn1* (normalised,
before to_k/to_v) of the tokens each identity panel shares, one tensor [panels, tokens, channels]
per (step, layer, role). A read projects them with the layer's own to_k/to_v (the projections are
per token, so this is exact), which halves the bytes against storing keys and values. Options:
- dtype fp16 / bf16 / fp32, or fp8 (e4m3, half of fp16: LayerNorm outputs stay far inside its
  +-448 range, its 3 mantissa bits give at most 6.25% relative error per value);
- only (step, layer) pairs at which the schedule lets a read use the bank are written;
- reads stream one step at a time: a loaded bank is memory-mapped and each step's tensors are
  read (and, with storage "device", moved to the sampling device) when that step starts, so a
  read run's memory does not grow with the number of steps;
- `keep`: a write run keeps the bank in memory, or writes each finished step to a file on disk
  ("disk"; one step in memory at a time), or decides after its first step ("auto": memory when the
  whole bank fits in free memory, else disk). A spilled bank reads like a loaded one.

Roles name the chunks of a model call: "positive", "negative" and, under DualCFGGuider, "middle".

DiT models (Flux, SD3, Qwen-Image, ...) compute q/k/v inside their blocks with fused projections, q/k
norms and RoPE; the attention override that serves them sees only the finished keys and values. A DiT
bank therefore stores the sampled image *keys and values* (after RoPE), [panels, tokens, 2 * channels]:
twice the bytes of hidden states, read back exactly. The bank records its content ("hidden_states", or
"keys_values:<family>"), and a model of another kind or family refuses it. In fp8, keys/values (which no
norm bounds) are stored with one scale per tensor.

Plain torch; save/load uses safetensors with a JSON header, so a character can be reused later.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
import tempfile
from typing import Optional, Sequence

import torch

from ..common.errors import StoryDiffusionError
from ..common.files import atomic_path

FORMAT = "storydiffusion-identity-bank/2"
OLD_FORMATS = ("storydiffusion-identity-bank/1",)  # projected keys/values: refused with a message
FP8 = "fp8"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, FP8: torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
HIDDEN_STATES = "hidden_states"  # UNet banks: the input of attn1, projected by the layer on read
KEYS_VALUES = "keys_values:"  # + DiT family name: sampled image keys and values after RoPE
KEEP_CHOICES = ("auto", "memory", "disk")  # where a write run keeps the bank (module docstring)
SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1}  # safetensors dtype name -> bytes per value


def content_name(content: str) -> str:
    """How a bank's content reads in messages."""
    if content.startswith(KEYS_VALUES):
        return f"a {content[len(KEYS_VALUES):]} model (DiT keys and values)"
    return "a UNet model (SD1.5 / SD2 / SDXL hidden states)"


class BankError(StoryDiffusionError):
    """A bank cannot serve this run (empty, other step count, other resolution, missing layer)."""


def _layer_name(layer) -> str:
    kind, block, index = layer
    return f"{kind}.{int(block)}.{int(index)}"


def _parse_layer(name: str):
    kind, block, index = name.split(".")
    return (kind, int(block), int(index))


def encode(hidden: torch.Tensor, dtype_name: str, scaled: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Tokens -> (stored tensor, scale or None). fp8 hidden states are clamped to fp8's finite range, which
    normalised hidden states never reach; with `scaled` (DiT keys/values, unbounded) fp8 stores
    tokens / scale with scale = max |token| / 448, so the largest value lands on fp8's largest."""
    if dtype_name == FP8:
        hidden = hidden.float()
        if scaled:
            scale = (hidden.abs().amax() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
            return (hidden / scale).clamp(-FP8_MAX, FP8_MAX).to(DTYPES[FP8]), scale.reshape(1)
        hidden = hidden.clamp(-FP8_MAX, FP8_MAX)
    return hidden.to(DTYPES[dtype_name]), None


def decode(stored: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale.to(stored.device)).to(dtype)


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
        self.spill_folder: Optional[str] = None
        self.clear()

    def __deepcopy__(self, memo):
        return self

    def clear(self):
        if self.spill_folder is not None:  # the step files of a spilled bank are this bank's own
            shutil.rmtree(self.spill_folder, ignore_errors=True)
        self.spill_folder = None
        self.entries: dict = {}  # key -> (stored, scale) for a bank in memory
        self.file_keys: dict = {}  # key -> (file, tensor name prefix): read from files, step by step
        self.panels: tuple[int, ...] = ()
        self.characters: Optional[tuple[tuple[str, ...], ...]] = None
        self.sample_sigmas: tuple[float, ...] = ()
        self.layer_tokens: dict = {}  # layer -> full token count at write (resolution check)
        self.content: str = HIDDEN_STATES  # what the tensors are (see the module docstring)
        self._step_cache: tuple = (None, None, None, {})  # (step, device, dtype, {key: decoded})

    @property
    def empty(self) -> bool:
        return not self.entries and not self.file_keys

    def keys(self) -> set:
        return set(self.entries) | set(self.file_keys)

    def files(self) -> list[str]:
        """The files the bank reads from (one for a loaded bank, one per step for a spilled one)."""
        return sorted({path for path, _ in self.file_keys.values()})

    def nbytes(self) -> int:
        return sum(os.path.getsize(path) for path in self.files()) + sum(
            _entry_bytes(t, s) for t, s in self.entries.values())

    def describe(self) -> str:
        if self.empty:
            return "empty identity bank"
        steps = len(self.sample_sigmas) - 1
        return (f"identity bank of {content_name(self.content)}: {len(self.panels)} panels {list(self.panels)}, "
                f"{steps} steps, {len(self.layer_tokens)} layers, {self.nbytes() / 2**20:.1f} MiB {self.dtype_name}")

    # ---------------------------------------------------------------------------------------------
    # writing

    def begin_write(self, panels: Sequence[int], characters, sample_sigmas: Sequence[float],
                    content: str = HIDDEN_STATES, planned_steps=None, memory_limit: Optional[int] = None,
                    spill_parent: Optional[str] = None, disk_limit: Optional[int] = None) -> "BankWriter":
        """A writer for one run. `planned_steps(layer)`: how many steps of the run will write `layer`;
        `memory_limit` / `disk_limit`: bytes of free memory / disk the bank may take; `spill_parent`: where a bank
        kept on disk gets its folder (see BankWriter)."""
        return BankWriter(self, tuple(int(p) for p in panels),
                          None if characters is None else tuple(tuple(c) for c in characters),
                          tuple(float(s) for s in sample_sigmas), content, planned_steps, memory_limit,
                          spill_parent, disk_limit)

    # ---------------------------------------------------------------------------------------------
    # reading

    def check_run(self, sample_sigmas: Sequence[float], content: str = HIDDEN_STATES):
        """Raise a BankError unless this bank was written by the same kind of model with the same sampling schedule."""
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
        values) for one layer call, one chunk per role.

        Tensors of one step are decoded (and moved) once and kept until the next step is asked for.
        """
        written = self.layer_tokens.get(layer)
        if written is None:
            raise BankError(f"the identity bank has no tokens for layer {_layer_name(layer)}: write and read with the "
                            f"same layer selection (bank layers: {', '.join(map(_layer_name, self.layer_tokens))})")
        if written != num_tokens:
            raise BankError(f"the identity bank was written at another resolution ({written} tokens at layer "
                            f"{_layer_name(layer)}, this run has {num_tokens}): use the identity run's width and height")
        target = torch.device("cpu") if self.storage == "cpu" or device is None else torch.device(device)
        cached_step, cached_device, cached_dtype, cache = self._step_cache
        if (cached_step, cached_device, cached_dtype) != (step, target, dtype):
            cache = {}  # drop the previous step before loading this one
            self._step_cache = (step, target, dtype, cache)
        out = []
        for role in roles:
            key = (int(step), layer, role)
            if key not in cache:
                cache.update(self._load_step(int(step), target, dtype, wanted=key))
            if key not in cache:
                raise BankError(f"the identity bank holds no {role} pass for step {step} layer {_layer_name(layer)}: "
                                f"write it with the same guider, cfg, schedule and start/end percent as this run "
                                f"(cfg 1.0 skips the negative pass; the bank holds {sorted({k[2] for k in self.keys()})})")
            out.append(cache[key])
        return torch.stack(out)

    def _load_step(self, step: int, device, dtype, wanted) -> dict:
        keys = [k for k in self.keys() if k[0] == step]
        if wanted not in keys:
            return {}
        loaded = {k: decode(*self.entries[k], dtype).to(device) for k in keys if k in self.entries}
        by_file: dict = {}
        for key in keys:
            if key in self.file_keys:
                path, prefix = self.file_keys[key]
                by_file.setdefault(path, []).append((key, prefix))
        if by_file:
            from safetensors import safe_open

            for path, items in by_file.items():
                with safe_open(path, framework="pt", device="cpu") as f:  # memory-mapped: reads only these tensors
                    names = set(f.keys())
                    for key, prefix in items:
                        scale = f.get_tensor(prefix + "/s") if prefix + "/s" in names else None
                        loaded[key] = decode(f.get_tensor(prefix + "/h"), scale, dtype).to(device)
        return loaded

    # ---------------------------------------------------------------------------------------------
    # files

    def save(self, path: str):
        """Write a .safetensors file (atomically: a temp file renamed into place, with the umask's mode)."""
        from safetensors.torch import save_file

        if self.empty:
            raise BankError("the identity bank is empty: nothing to save (run the identity KSampler first)")
        if not self.entries and self.spill_folder is None:  # a loaded bank is its file
            with atomic_path(path) as tmp:
                shutil.copyfile(self.files()[0], tmp)
            return
        header = {"panels": list(self.panels),
                  "characters": None if self.characters is None else [list(c) for c in self.characters],
                  "sample_sigmas": list(self.sample_sigmas),
                  "layer_tokens": {_layer_name(k): n for k, n in self.layer_tokens.items()},
                  "dtype": self.dtype_name,
                  "content": self.content}
        metadata = {"format": FORMAT, "bank": json.dumps(header)}
        if self.file_keys:  # spilled to step files: streamed into one file, a tensor at a time
            with atomic_path(path) as tmp:
                _merge_safetensors(tmp, [(prefix, file) for file, prefix in self.file_keys.values()], metadata)
            return
        with atomic_path(path) as tmp:
            save_file(_entry_tensors(self.entries), tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str, storage: str = "cpu") -> "IdentityBank":
        """Open a saved bank: reads its header now and its tensors step by step during reads."""
        from safetensors import safe_open

        name = os.path.basename(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
        except Exception as e:  # a truncated or foreign file
            raise BankError(f"cannot read identity bank {name}: the file is damaged or not a safetensors file "
                            f"({type(e).__name__}). Save the bank again with 'Save Identity Bank (StoryDiffusion)'.") from None
        if meta.get("format") in OLD_FORMATS:
            raise BankError(f"{name} was saved by an earlier version of this pack (it stores projected keys/values); "
                            "re-create it: run the identity panels through 'Identity Bank Write (StoryDiffusion)' "
                            "and save the bank again")
        if meta.get("format") != FORMAT:
            raise BankError(f"{name} is not a StoryDiffusion identity bank (its metadata has no format {FORMAT!r}); "
                            "save banks with 'Save Identity Bank (StoryDiffusion)'")
        try:
            header = json.loads(meta["bank"])
            bank = cls(storage=storage, dtype=header.get("dtype", "fp16"))
            bank.panels = tuple(header["panels"])
            bank.characters = None if header["characters"] is None else tuple(tuple(c) for c in header["characters"])
            bank.sample_sigmas = tuple(header["sample_sigmas"])
            bank.layer_tokens = {_parse_layer(k): int(n) for k, n in header["layer_tokens"].items()}
            bank.content = str(header.get("content", HIDDEN_STATES))
            for tensor_name in names:
                if tensor_name.endswith("/h"):
                    prefix = tensor_name[:-2]
                    bank.file_keys[_parse_prefix(prefix)] = (os.path.abspath(path), prefix)
        except (KeyError, ValueError, TypeError) as e:
            raise BankError(f"identity bank {name} is damaged ({e}): save the bank again") from None
        if bank.empty:
            raise BankError(f"identity bank {name} holds no tokens")
        return bank


def _entry_bytes(stored: torch.Tensor, scale: Optional[torch.Tensor]) -> int:
    return stored.numel() * stored.element_size() + (0 if scale is None else scale.numel() * scale.element_size())


def _entry_tensors(entries: dict) -> dict:
    """{tensor name: tensor} of in-memory entries, as a bank file names them."""
    tensors = {}
    for key, (stored, scale) in entries.items():
        prefix = _tensor_prefix(key)
        tensors[prefix + "/h"] = stored.detach().to("cpu").contiguous()
        if scale is not None:
            tensors[prefix + "/s"] = scale.detach().to("cpu").contiguous()
    return tensors


def _merge_safetensors(path: str, sources: list, metadata: dict):
    """Write one .safetensors file holding the tensors `prefix/h` (and `prefix/s`) of every (prefix, file) in
    `sources`, reading one tensor at a time: the safetensors layout (8-byte little-endian header length, JSON
    header with dtype, shape and byte offsets, then the bytes), so the bank never has to fit in memory."""
    from safetensors import safe_open

    by_file: dict = {}
    for prefix, file in sources:
        by_file.setdefault(file, []).append(prefix)
    plan, offset = [], 0  # (name, file, dtype, shape, begin, end), file by file
    for file in sorted(by_file):
        with safe_open(file, framework="pt", device="cpu") as f:
            names = set(f.keys())
            for prefix in sorted(by_file[file]):
                for name in (prefix + "/h", prefix + "/s"):
                    if name in names:
                        piece = f.get_slice(name)
                        dtype, shape = piece.get_dtype(), list(piece.get_shape())
                        size = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
                        plan.append((name, file, dtype, shape, offset, offset + size))
                        offset += size
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
              for name, _, dtype, shape, begin, end in plan}
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for file, items in itertools.groupby(plan, key=lambda item: item[1]):  # the plan is file by file
            with safe_open(file, framework="pt", device="cpu") as f:
                for name, *_ in items:
                    out.write(f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _tensor_prefix(key) -> str:
    step, layer, role = key
    return f"{_layer_name(layer)}/step{step}/{role}"


def _parse_prefix(prefix: str):
    layer_name, step, role = prefix.split("/")
    return (int(step[4:]), _parse_layer(layer_name), role)


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
    the finished steps to disk ("auto", "disk") or stop the run ("memory")."""

    def __init__(self, bank: IdentityBank, panels, characters, sample_sigmas, content: str = HIDDEN_STATES,
                 planned_steps=None, memory_limit: Optional[int] = None, spill_parent: Optional[str] = None,
                 disk_limit: Optional[int] = None):
        self.bank = bank
        self.content = content
        self.panels = panels
        self.characters = characters
        self.sample_sigmas = sample_sigmas
        self.entries: dict = {}  # in memory: the whole bank, or (spilling) the step in progress
        self.file_keys: dict = {}  # spilled: key -> (step file, tensor name prefix)
        self.layer_tokens: dict = {}
        self.planned_steps = planned_steps
        self.memory_limit = memory_limit
        self.spill_parent = spill_parent
        self.disk_limit = disk_limit
        self.spill_folder: Optional[str] = None
        self.memory_bytes = 0  # bytes of self.entries
        self.entry_bytes: dict = {}  # (layer, role) -> bytes of one step's entry
        self.step: Optional[int] = None  # the step the last put wrote
        if bank.keep == "disk":
            self._start_spilling()

    @property
    def nbytes(self) -> int:
        """Bytes stored so far, in memory and on disk."""
        on_disk = sum(os.path.getsize(path) for path in {path for path, _ in self.file_keys.values()})
        return self.memory_bytes + on_disk

    def put(self, step: int, layer, roles: Sequence[str], hidden: torch.Tensor, num_tokens: int):
        """hidden: [chunks, panels, n, channels] sampled tokens (hidden states, or a DiT's keys and values), one
        chunk per entry of `roles`."""
        if self.step is not None and step != self.step:
            self._step_done()
        self.step = int(step)
        self.layer_tokens[layer] = int(num_tokens)
        for c, role in enumerate(roles):
            key = (int(step), layer, role)
            if key not in self.entries and key not in self.file_keys:  # a second-order sampler's extra call keeps the first
                stored, scale = encode(hidden[c].detach(), self.bank.dtype_name, scaled=self.content != HIDDEN_STATES)
                self.entries[key] = (stored.to("cpu"), None if scale is None else scale.to("cpu"))
                size = _entry_bytes(stored, scale)
                self.entry_bytes[(layer, role)] = size
                self.memory_bytes += size
        if self.memory_limit is not None and self.memory_bytes > self.memory_limit:
            if self.bank.keep != "memory" and self.spill_parent is not None:
                self._spill(finished_only=True)
            if self.memory_bytes > self.memory_limit:
                self._refuse(self.memory_bytes, "has stored", "memory", self.memory_limit)

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
        os.makedirs(self.spill_parent, exist_ok=True)
        self.spill_folder = tempfile.mkdtemp(prefix="bank-", dir=self.spill_parent)

    def _spill(self, finished_only: bool):
        """Write the steps in memory (all, or all before the current one) to one file per step and drop them."""
        from safetensors.torch import save_file

        if self.spill_folder is None:
            self._start_spilling()
        steps = sorted({key[0] for key in self.entries if not finished_only or key[0] != self.step})
        for step in steps:
            entries = {k: v for k, v in self.entries.items() if k[0] == step}
            path = os.path.join(self.spill_folder, f"step{step:04d}.safetensors")
            save_file(_entry_tensors(entries), path)
            for key, (stored, scale) in entries.items():
                self.file_keys[key] = (path, _tensor_prefix(key))
                self.memory_bytes -= _entry_bytes(stored, scale)
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
        """Drop what this run wrote (an interrupted or refused run leaves nothing behind)."""
        if self.spill_folder is not None:
            shutil.rmtree(self.spill_folder, ignore_errors=True)
            self.spill_folder = None
        self.entries, self.file_keys, self.memory_bytes = {}, {}, 0

    def commit(self):
        if self.spill_folder is not None:
            self._step_done()  # the last step: checked and written like the others
        bank = self.bank
        storage, dtype, keep = bank.storage, bank.dtype_name, bank.keep
        bank.clear()
        bank.storage, bank.dtype_name, bank.keep = storage, dtype, keep
        bank.entries = self.entries
        bank.file_keys = self.file_keys
        bank.spill_folder = self.spill_folder
        bank.panels = self.panels
        bank.characters = self.characters
        bank.sample_sigmas = self.sample_sigmas
        bank.layer_tokens = self.layer_tokens
        bank.content = self.content


def looks_like_bank_file(path: str) -> bool:
    """False only for a readable .safetensors that is not a bank (e.g. a motion predictor sharing the
    models/storydiffusion folder), so loader lists stay short; unreadable files and banks of an older
    format stay listed, and the load explains what is wrong with them."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") in (FORMAT,) + OLD_FORMATS
    except Exception:
        return True
