"""What an identity bank is made of, shared by the bank (bank.py), its writer (bank_writer.py) and its files
(bank_store.py): the names of its formats and contents, its error, the stored dtypes and how tokens are
encoded in them, and how a (step, layer, role) key is spelled as a tensor name.

Storage precision: fp16 / bf16 / fp32 store the tokens as they are; fp8 (e4m3) stores half of fp16.
LayerNorm outputs (UNet hidden states) stay far inside fp8's +-448 range, so they are stored unscaled;
a DiT's keys and values, which no norm bounds, are stored with one scale per tensor (max |x| / 448).
e4m3 has 3 mantissa bits, so rounding keeps a value within 2^-4 = 6.25% only in its normal range
(|x| >= 2^-6); below it the spacing is fixed at 2^-9 and the error reaches 2^-10 ~ 0.001 absolute
(0.003 -> 0.0039, 0.0009 -> 0). Per value: |error| <= max(6.25% of |x|, 2^-10 * scale), scale 1 unscaled.
"""
from __future__ import annotations

import torch

from ..common.errors import StoryDiffusionError

FORMAT = "storydiffusion-identity-bank/2"
OLD_FORMATS = ("storydiffusion-identity-bank/1",)  # projected keys/values: refused with a message
FP8 = "fp8"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, FP8: torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
HIDDEN_STATES = "hidden_states"  # UNet banks: the input of attn1, projected by the layer on read
KEYS_VALUES = "keys_values:"  # + DiT family name: sampled image keys and values after RoPE
KEEP_CHOICES = ("auto", "memory", "disk")  # where a write run keeps the bank (bank.py's docstring)
SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1}  # safetensors dtype name -> bytes per value


class BankError(StoryDiffusionError):
    """A bank cannot serve this run (empty, other step count, other resolution, missing layer)."""


def content_name(content: str) -> str:
    """How a bank's content reads in messages."""
    if content.startswith(KEYS_VALUES):
        return f"a {content[len(KEYS_VALUES):]} model (DiT keys and values)"
    return "a UNet model (SD1.5 / SD2 / SDXL hidden states)"


def layer_name(layer) -> str:
    kind, block, index = layer
    return f"{kind}.{int(block)}.{int(index)}"


def parse_layer(name: str):
    kind, block, index = name.split(".")
    return (kind, int(block), int(index))


def tensor_prefix(key) -> str:
    """A (step, layer, role) key as a bank file names its tensors: prefix + "/h" (tokens), prefix + "/s" (scale)."""
    step, layer, role = key
    return f"{layer_name(layer)}/step{step}/{role}"


def parse_prefix(prefix: str):
    name, step, role = prefix.split("/")
    return (int(step[4:]), parse_layer(name), role)


def encode(hidden: torch.Tensor, dtype_name: str, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def decode(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale.to(stored.device)).to(dtype)


def entry_bytes(stored: torch.Tensor, scale: torch.Tensor | None) -> int:
    return stored.numel() * stored.element_size() + (0 if scale is None else scale.numel() * scale.element_size())
