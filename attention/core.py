"""Consistent Self-Attention in plain torch: which tokens a panel reads, and the attention over them.

StoryDiffusion extends the keys/values of every panel's self-attention with tokens sampled from the
other panels of the story, so that all panels attend to the same character features:

    K_i, V_i = [sampled tokens of the panels i shares with, tokens of i]
    O_i      = Attention(Q_i, K_i, V_i)

The projections to_k/to_v act token by token, so sampling tokens of the projected k/v equals
projecting sampled hidden states: this module works on q/k/v already projected
([rows, tokens, heads*dim_head], the layout of ComfyUI's attn1 replace).

Rows are grouped into *chunks* (cond, uncond, ... one latent batch of B panels each): a panel only
reads panels of its own chunk, and the sampled token indices of a panel are the same in every chunk.
Nothing here keeps state: the token choice comes from a generator seeded by (seed, step, layer,
story panel), so the same call gives the same tokens whatever the batch layout is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..common.attention import AttentionFn, multihead_attention

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps): stable across runs, platforms, layouts."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def sampled_count(num_tokens: int, rate: float) -> int:
    """How many tokens of a panel the other panels read (fixed per layer, so lengths line up)."""
    return max(0, min(num_tokens, int(round(num_tokens * float(rate)))))


def sample_tokens(num_tokens: int, rate: float, seed: int, step: int, layer: int, panel: int) -> torch.Tensor:
    """Sorted indices of the tokens of `panel` that other panels read at this step and layer.

    Shared by all heads and by the cond/uncond chunks; redrawn every step; `panel` is the story
    panel index, so a panel gets the same tokens in a batch run and in a bank write run.
    """
    count = sampled_count(num_tokens, rate)
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(mix_seed(seed, step, layer, panel))
    return torch.randperm(num_tokens, generator=gen)[:count].sort().values


def sample_panel_tokens(num_tokens: int, rate: float, seed: int, step: int, layer: int,
                        panels: Sequence[int]) -> torch.Tensor:
    """[len(panels), count] sampled token indices, one row per panel (see sample_tokens)."""
    count = sampled_count(num_tokens, rate)
    if count == 0:
        return torch.zeros((len(panels), 0), dtype=torch.long)
    return torch.stack([sample_tokens(num_tokens, rate, seed, step, layer, p) for p in panels])


@dataclass(frozen=True)
class BankTokens:
    """Tokens read from an identity bank for one layer call.

    k, v: [chunks, bank_panels, tokens, dim] — the stored sampled tokens per chunk of this call.
    reads: [B, bank_panels] bool — batch panel i reads bank panel b.
    """
    k: torch.Tensor
    v: torch.Tensor
    reads: torch.Tensor


def consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, chunks: int,
                         share: torch.Tensor, sampled: torch.Tensor, window: int = 0,
                         bank: Optional[BankTokens] = None,
                         attention: AttentionFn = multihead_attention) -> torch.Tensor:
    """Self-attention where each panel also reads sampled tokens of the panels it shares with.

    q: [chunks*B, Tq, D]; k, v: [chunks*B, Tk, D]; row c*B+i is panel i of chunk c.
    share: [B, B] bool, share[i, j] = panel i may read panel j (the diagonal is ignored).
    sampled: [B, n] token indices (into Tk) of each panel that the others read.
    window: 0 or >= B — one window over the whole batch. 0 < W < B — the paper's sliding window:
        windows of W consecutive panels (stride 1); inside a window a panel reads the panels of
        that window only; its output is the mean over the windows that contain it. Windows are
        processed one after another, so the extra memory depends on W, not on B.
    bank: extra tokens from an identity bank that panels read on top of their own.
    attention: the kernel, attention(q, k, v, heads) on [rows, tokens, D] (plain sdpa by default).
    """
    total, _, dim = q.shape
    if total % chunks:
        raise ValueError(f"{total} attention rows do not split into {chunks} chunks")
    panels = total // chunks
    tk = k.shape[1]
    if share.shape != (panels, panels) or sampled.shape[0] != panels:
        raise ValueError(f"share {tuple(share.shape)} / sampled {tuple(sampled.shape)} do not match {panels} panels")
    share = share.to(torch.bool).cpu() & ~torch.eye(panels, dtype=torch.bool)
    sampled = sampled.to(torch.long).cpu()
    if window <= 0 or window >= panels:
        windows = [range(panels)]
    else:
        windows = [range(s, s + window) for s in range(panels - window + 1)]

    # one flat token source per chunk: [batch tokens..., bank tokens...]; a panel's keys are rows of it
    k_src = k.reshape(chunks, panels * tk, dim)
    v_src = v.reshape(chunks, panels * tk, dim)
    bank_offset = panels * tk
    bank_rows: list[torch.Tensor] = []
    if bank is not None and bank.k.shape[1] > 0:
        nb, nt = bank.k.shape[1], bank.k.shape[2]
        if bank.k.shape[0] != chunks:
            raise ValueError(f"bank holds {bank.k.shape[0]} chunks, the call has {chunks}")
        k_src = torch.cat([k_src, bank.k.to(k.device, k.dtype).reshape(chunks, nb * nt, dim)], dim=1)
        v_src = torch.cat([v_src, bank.v.to(v.device, v.dtype).reshape(chunks, nb * nt, dim)], dim=1)
        reads = bank.reads.to(torch.bool).cpu()
        tokens_of_bank = torch.arange(nb * nt).reshape(nb, nt) + bank_offset
        bank_rows = [tokens_of_bank[reads[i]].reshape(-1) for i in range(panels)]
    else:
        bank_rows = [torch.zeros(0, dtype=torch.long)] * panels

    own = torch.arange(tk)
    single = len(windows) == 1
    out = torch.empty_like(q) if single else torch.zeros_like(q)
    counts = torch.zeros(panels)
    for members in windows:
        # key rows of each query panel of this window, grouped by length so equal ones batch together
        by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for i in members:
            counts[i] += 1
            others = [j for j in members if share[i, j]]
            parts = [bank_rows[i]] + [j * tk + sampled[j] for j in others] + [i * tk + own]
            index = torch.cat(parts)
            by_length.setdefault(index.numel(), []).append((i, index))
        for group in by_length.values():
            ids = torch.tensor([i for i, _ in group])
            index = torch.stack([ix for _, ix in group]).to(k.device)
            rows = (torch.arange(chunks)[:, None] * panels + ids[None, :]).reshape(-1).to(q.device)
            if index.shape[1] == tk:
                kk, vv = k[rows], v[rows]  # reads nothing but itself: plain attention, no gather
            else:
                kk = k_src[:, index].reshape(chunks * len(group), -1, dim)
                vv = v_src[:, index].reshape(chunks * len(group), -1, dim)
            result = attention(q[rows], kk, vv, heads)
            if single:
                out[rows] = result
            else:
                out.index_add_(0, rows, result)
            del kk, vv, result
    if not single:
        scale = (1.0 / counts).to(out.dtype).repeat(chunks).to(out.device)
        out.mul_(scale[:, None, None])
    return out
