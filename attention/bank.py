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
  read run's memory does not grow with the number of steps.

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

import json
import os
import shutil
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

    def __init__(self, storage: str = "cpu", dtype: str = "fp16"):
        if dtype not in DTYPES:
            raise BankError(f"bank dtype must be one of {list(DTYPES)}, not {dtype!r}")
        if storage not in ("cpu", "device"):
            raise BankError(f"bank storage must be 'cpu' or 'device', not {storage!r}")
        self.storage = storage  # where the current step's tokens live during a read
        self.dtype_name = dtype
        self.clear()

    def __deepcopy__(self, memo):
        return self

    def clear(self):
        self.entries: dict = {}  # key -> (stored, scale) for a bank in memory
        self.file: Optional[str] = None  # a loaded bank reads its entries from this file, step by step
        self.file_keys: dict = {}  # key -> tensor name prefix in `file`
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

    def nbytes(self) -> int:
        if self.file is not None:
            return os.path.getsize(self.file)
        return sum(t.numel() * t.element_size() + (0 if s is None else s.numel() * s.element_size())
                   for t, s in self.entries.values())

    def describe(self) -> str:
        if self.empty:
            return "empty identity bank"
        steps = len(self.sample_sigmas) - 1
        return (f"identity bank of {content_name(self.content)}: {len(self.panels)} panels {list(self.panels)}, "
                f"{steps} steps, {len(self.layer_tokens)} layers, {self.nbytes() / 2**20:.1f} MiB {self.dtype_name}")

    # ---------------------------------------------------------------------------------------------
    # writing

    def begin_write(self, panels: Sequence[int], characters, sample_sigmas: Sequence[float],
                    content: str = HIDDEN_STATES, planned_steps=None, memory_limit: Optional[int] = None) -> "BankWriter":
        """A writer for one run. `planned_steps(layer)`: how many steps of the run will write `layer`; with
        `memory_limit` (bytes of CPU memory the bank may take) the writer refuses, after the first written step, a
        run whose bank would not fit (see BankWriter)."""
        return BankWriter(self, tuple(int(p) for p in panels),
                          None if characters is None else tuple(tuple(c) for c in characters),
                          tuple(float(s) for s in sample_sigmas), content, planned_steps, memory_limit)

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
        if self.file is None:
            return {k: decode(*self.entries[k], dtype).to(device) for k in keys}
        from safetensors import safe_open

        loaded = {}
        with safe_open(self.file, framework="pt", device="cpu") as f:  # memory-mapped: reads only these tensors
            names = set(f.keys())
            for key in keys:
                prefix = self.file_keys[key]
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
        if self.file is not None:  # a loaded bank is its file
            with atomic_path(path) as tmp:
                shutil.copyfile(self.file, tmp)
            return
        tensors = {}
        for key, (stored, scale) in self.entries.items():
            prefix = _tensor_prefix(key)
            tensors[prefix + "/h"] = stored.detach().to("cpu").contiguous()
            if scale is not None:
                tensors[prefix + "/s"] = scale.detach().to("cpu").contiguous()
        header = {"panels": list(self.panels),
                  "characters": None if self.characters is None else [list(c) for c in self.characters],
                  "sample_sigmas": list(self.sample_sigmas),
                  "layer_tokens": {_layer_name(k): n for k, n in self.layer_tokens.items()},
                  "dtype": self.dtype_name,
                  "content": self.content}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"format": FORMAT, "bank": json.dumps(header)})

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
                    bank.file_keys[_parse_prefix(prefix)] = prefix
        except (KeyError, ValueError, TypeError) as e:
            raise BankError(f"identity bank {name} is damaged ({e}): save the bank again") from None
        if bank.empty:
            raise BankError(f"identity bank {name} holds no tokens")
        bank.file = os.path.abspath(path)
        return bank


def _tensor_prefix(key) -> str:
    step, layer, role = key
    return f"{_layer_name(layer)}/step{step}/{role}"


def _parse_prefix(prefix: str):
    layer_name, step, role = prefix.split("/")
    return (int(step[4:]), _parse_layer(layer_name), role)


class BankWriter:
    """Collects one write run; the bank only changes when the run completes (commit).

    A bank grows with steps x layers x sampled tokens: on a DiT at 1024 px that is about 1 GB per identity image
    per step at the default blocks, more than a machine's RAM over a whole run. With a `memory_limit`, every entry
    of a (layer, role) has the same size from step to step, so once the first written step is done the writer
    knows what the whole run will store (`planned_steps(layer)` steps per layer) and raises a BankError saying
    what to change, before the memory is gone, instead of letting the process be killed; it also stops a run whose
    stored bytes pass the limit (layers a random schedule skipped in the first step)."""

    def __init__(self, bank: IdentityBank, panels, characters, sample_sigmas, content: str = HIDDEN_STATES,
                 planned_steps=None, memory_limit: Optional[int] = None):
        self.bank = bank
        self.content = content
        self.panels = panels
        self.characters = characters
        self.sample_sigmas = sample_sigmas
        self.entries: dict = {}
        self.layer_tokens: dict = {}
        self.planned_steps = planned_steps
        self.memory_limit = memory_limit
        self.nbytes = 0
        self.entry_bytes: dict = {}  # (layer, role) -> bytes of one step's entry
        self.step: Optional[int] = None  # the step the last put wrote

    def put(self, step: int, layer, roles: Sequence[str], hidden: torch.Tensor, num_tokens: int):
        """hidden: [chunks, panels, n, channels] sampled tokens (hidden states, or a DiT's keys and values), one
        chunk per entry of `roles`."""
        if self.step is not None and step != self.step:
            self._check_projection()
        self.step = int(step)
        self.layer_tokens[layer] = int(num_tokens)
        for c, role in enumerate(roles):
            key = (int(step), layer, role)
            if key not in self.entries:  # a second-order sampler's extra call keeps the first
                stored, scale = encode(hidden[c].detach(), self.bank.dtype_name, scaled=self.content != HIDDEN_STATES)
                self.entries[key] = (stored.to("cpu"), None if scale is None else scale.to("cpu"))
                size = stored.numel() * stored.element_size() + (0 if scale is None else scale.numel() * scale.element_size())
                self.entry_bytes[(layer, role)] = size
                self.nbytes += size
        if self.memory_limit is not None and self.nbytes > self.memory_limit:
            self._refuse(self.nbytes, "has stored")

    def projected_bytes(self) -> int:
        """What the whole run will store, from the entries seen so far (exact once every layer has been written)."""
        if self.planned_steps is None:
            return self.nbytes
        return sum(size * int(self.planned_steps(layer)) for (layer, _), size in self.entry_bytes.items())

    def _check_projection(self):
        if self.memory_limit is not None:
            projected = self.projected_bytes()
            if projected > self.memory_limit:
                self._refuse(projected, "would store")

    def _refuse(self, nbytes: int, verb: str):
        layers = len({layer for layer, _ in self.entry_bytes})
        raise BankError(
            f"this identity bank write {verb} about {nbytes / 2**30:.1f} GiB ({len(self.panels)} identity panels, "
            f"{len(self.sample_sigmas) - 1} steps, {layers} layers, {self.bank.dtype_name}), more than the "
            f"{self.memory_limit / 2**30:.1f} GiB of free memory it may use; nothing was written. Make it smaller: "
            f"dtype fp8 (half of fp16), fewer layers on 'Consistent Self-Attention' (a custom list; on Flux.1 e.g. "
            f"'double 10-18'), a lower rate, an end_percent below 1, fewer steps, or fewer identity panels per write.")

    def commit(self):
        bank = self.bank
        storage, dtype = bank.storage, bank.dtype_name
        bank.clear()
        bank.storage, bank.dtype_name = storage, dtype
        bank.entries = self.entries
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
