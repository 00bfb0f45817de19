"""Multi-head attention on ComfyUI's [rows, tokens, heads*dim] layout, in plain torch.

The reference kernel for every package's core (CSA, IP-Adapter branches, the perceiver resampler);
inside ComfyUI the adapters pass ComfyUI's own kernel instead (common/comfy_adapter.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention; q [rows, Tq, heads*dim], k/v [rows, Tk, heads*dim] -> [rows, Tq, heads*dim]."""
    rows, _, inner = q.shape
    dim = inner // heads
    q, k, v = (t.reshape(t.shape[0], -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(rows, -1, inner)
