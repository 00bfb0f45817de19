"""The identity bank: sampled self-attention tokens of the identity panels, per step and layer.

StoryDiffusion's released code first denoises a few identity panels together (write) and stores
what they share; every other panel is then generated alone and reads the stored tokens of its
characters (read), so a story of any length costs the memory of the identity batch plus one panel.

The official code stores the normalised hidden states entering attn1 and re-projects them for
every read. This bank stores the sampled tokens already projected by to_k and to_v instead: the
projections are per token and frozen, so this is exact, a read needs no projection (the attn1
replace hook that reads it gets projected k/v and has no to_k/to_v), at twice the bytes per token.

Plain torch; save/load uses safetensors with a JSON header, so a character can be reused later.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import torch

from .core import BankTokens

FORMAT = "storydiffusion-identity-bank/1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class BankError(ValueError):
    """A bank cannot serve this run (empty, other step count, other resolution, missing layer)."""


def _layer_name(layer) -> str:
    kind, block, index = layer
    return f"{kind}.{int(block)}.{int(index)}"


def _parse_layer(name: str):
    kind, block, index = name.split(".")
    return (kind, int(block), int(index))


class IdentityBank:
    """Sampled K/V tokens of identity panels, keyed by (step, layer, chunk kind).

    `panels` are the story panel indices of the written rows and `characters` their characters
    (None when written without a story: then every reader reads every row). Mutable on purpose —
    a write run fills it, later runs read it — and shared, not copied, by ModelPatcher.clone().
    """

    def __init__(self, storage: str = "cpu", dtype: str = "fp16"):
        if dtype not in DTYPES:
            raise ValueError(f"bank dtype must be one of {list(DTYPES)}, not {dtype!r}")
        self.storage = storage  # "cpu" or "device" (the device the model samples on)
        self.dtype_name = dtype
        self.clear()

    def __deepcopy__(self, memo):
        return self

    def clear(self):
        self.entries: dict = {}
        self.panels: tuple[int, ...] = ()
        self.characters: Optional[tuple[tuple[str, ...], ...]] = None
        self.sample_sigmas: tuple[float, ...] = ()
        self.layer_tokens: dict = {}  # layer -> full token count at write (resolution check)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def empty(self) -> bool:
        return not self.entries

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.entries.values())

    def describe(self) -> str:
        if self.empty:
            return "empty identity bank"
        steps = len(self.sample_sigmas) - 1
        layers = len(self.layer_tokens)
        return (f"identity bank: {len(self.panels)} panels {list(self.panels)}, {steps} steps, {layers} layers, "
                f"{self.nbytes() / 2**20:.1f} MiB {self.dtype_name} on {self.storage}")

    # ---------------------------------------------------------------------------------------------
    # writing

    def begin_write(self, panels: Sequence[int], characters, sample_sigmas: Sequence[float]) -> "BankWriter":
        return BankWriter(self, tuple(int(p) for p in panels),
                          None if characters is None else tuple(tuple(c) for c in characters),
                          tuple(float(s) for s in sample_sigmas))

    # ---------------------------------------------------------------------------------------------
    # reading

    def check_run(self, sample_sigmas: Sequence[float]):
        """Raise a BankError unless this bank was written with the same sampling schedule."""
        if self.empty:
            raise BankError("the identity bank is empty: run a KSampler on the MODEL of 'Identity Bank Write "
                            "(StoryDiffusion)' first (connect its LATENT output to the 'after' input of the read node), or load a bank")
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

    def tokens(self, step: int, layer, kinds: Sequence[int], num_tokens: int, reads: torch.Tensor) -> BankTokens:
        """The stored tokens for one layer call, stacked over the call's chunks (kinds 0 cond / 1 uncond)."""
        written = self.layer_tokens.get(layer)
        if written is None:
            raise BankError(f"the identity bank has no tokens for layer {_layer_name(layer)}: write and read with the "
                            f"same layer selection (bank layers: {', '.join(map(_layer_name, self.layer_tokens))})")
        if written != num_tokens:
            raise BankError(f"the identity bank was written at another resolution ({written} tokens at layer "
                            f"{_layer_name(layer)}, this run has {num_tokens}): use the identity run's width and height")
        ks, vs = [], []
        for kind in kinds:
            entry = self.entries.get((step, layer, int(kind)))
            if entry is None:
                what = "negative" if kind == 1 else "positive"
                raise BankError(f"the identity bank holds no {what} pass for step {step} layer {_layer_name(layer)}: "
                                "write it with the same cfg as this run (cfg 1.0 skips the negative pass)")
            ks.append(entry[0])
            vs.append(entry[1])
        return BankTokens(torch.stack(ks), torch.stack(vs), reads)

    # ---------------------------------------------------------------------------------------------
    # files

    def save(self, path: str):
        """Write a .safetensors file (atomically: a temp file renamed into place)."""
        from safetensors.torch import save_file

        if self.empty:
            raise BankError("the identity bank is empty: nothing to save (run the identity KSampler first)")
        tensors = {}
        for (step, layer, kind), (k, v) in self.entries.items():
            base = f"{_layer_name(layer)}/step{step}/kind{kind}"
            tensors[base + "/k"] = k.detach().to("cpu").contiguous()
            tensors[base + "/v"] = v.detach().to("cpu").contiguous()
        header = {"panels": list(self.panels),
                  "characters": None if self.characters is None else [list(c) for c in self.characters],
                  "sample_sigmas": list(self.sample_sigmas),
                  "layer_tokens": {_layer_name(k): n for k, n in self.layer_tokens.items()},
                  "dtype": self.dtype_name}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT, "bank": json.dumps(header)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str, storage: str = "cpu") -> "IdentityBank":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise BankError(f"{os.path.basename(path)} is not a StoryDiffusion identity bank (its metadata has no "
                                    f"format {FORMAT!r}); save banks with 'Save Identity Bank (StoryDiffusion)'")
                header = json.loads(meta["bank"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except BankError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise BankError(f"cannot read identity bank {os.path.basename(path)}: {e}") from e
        bank = cls(storage=storage, dtype=header.get("dtype", "fp16"))
        bank.panels = tuple(header["panels"])
        bank.characters = None if header["characters"] is None else tuple(tuple(c) for c in header["characters"])
        bank.sample_sigmas = tuple(header["sample_sigmas"])
        bank.layer_tokens = {_parse_layer(k): int(n) for k, n in header["layer_tokens"].items()}
        for key in tensors:
            if not key.endswith("/k"):
                continue
            layer_name, step, kind, _ = key.split("/")
            k, v = tensors[key], tensors.get(key[:-1] + "v")
            if v is None:
                raise BankError(f"identity bank {os.path.basename(path)} is damaged: {key[:-1]}v is missing")
            bank.entries[(int(step[4:]), _parse_layer(layer_name), int(kind[4:]))] = (k, v)
        if bank.empty:
            raise BankError(f"identity bank {os.path.basename(path)} holds no tokens")
        return bank


class BankWriter:
    """Collects one write run; the bank only changes when the run completes (commit)."""

    def __init__(self, bank: IdentityBank, panels, characters, sample_sigmas):
        self.bank = bank
        self.panels = panels
        self.characters = characters
        self.sample_sigmas = sample_sigmas
        self.entries: dict = {}
        self.layer_tokens: dict = {}

    def put(self, step: int, layer, kinds: Sequence[int], k_sampled: torch.Tensor, v_sampled: torch.Tensor,
            num_tokens: int, device: torch.device):
        """k_sampled/v_sampled: [chunks, panels, n, dim], one chunk per entry of `kinds`."""
        target = torch.device("cpu") if self.bank.storage == "cpu" else device
        self.layer_tokens[layer] = int(num_tokens)
        for c, kind in enumerate(kinds):
            key = (int(step), layer, int(kind))
            if key not in self.entries:  # a second-order sampler's extra call keeps the first
                self.entries[key] = (k_sampled[c].detach().to(target, self.bank.dtype),
                                     v_sampled[c].detach().to(target, self.bank.dtype))

    def commit(self):
        bank = self.bank
        bank.clear()
        bank.entries = self.entries
        bank.panels = self.panels
        bank.characters = self.characters
        bank.sample_sigmas = self.sample_sigmas
        bank.layer_tokens = self.layer_tokens


def looks_like_bank_file(path: str) -> bool:
    """False only for a readable .safetensors that is not a bank (e.g. a motion predictor sharing the
    models/storydiffusion folder), so loader lists stay short; unreadable files stay listed and the
    load explains what is wrong with them."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return True
