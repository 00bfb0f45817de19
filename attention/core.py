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

from collections.abc import Sequence
from dataclasses import dataclass

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
    return max(0, min(num_tokens, round(num_tokens * float(rate))))


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


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor (token indices) on `device` without stalling the GPU: a copy from pageable host memory
    first waits for all queued GPU work, a non-blocking copy from pinned memory does not (PyTorch keeps the
    pinned block alive until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def panel_plan(share: torch.Tensor, sampled: torch.Tensor, panels: int, window: int):
    """Checked inputs of a consistent attention call: (share without the diagonal, sampled indices on the
    CPU, the windows of panels: one over the batch, or the paper's sliding windows of W panels, stride 1)."""
    if share.shape != (panels, panels) or sampled.shape[0] != panels:
        raise ValueError(f"share {tuple(share.shape)} / sampled {tuple(sampled.shape)} do not match {panels} panels")
    share = share.to(torch.bool).cpu() & ~torch.eye(panels, dtype=torch.bool)
    if window <= 0 or window >= panels:
        windows = [range(panels)]
    else:
        windows = [range(s, s + window) for s in range(panels - window + 1)]
    return share, sampled.to(torch.long).cpu(), windows


def mean_over_windows(out4: torch.Tensor, windows: list) -> None:
    """Divide panel i's summed outputs ([chunks, panels, ...], in place) by the number of windows holding it.
    Scalars per panel: no host-to-device copy on the GPU."""
    for i in range(out4.shape[1]):
        out4[:, i].mul_(1.0 / sum(1 for members in windows if i in members))


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
                         bank: BankTokens | None = None,
                         attention: AttentionFn = multihead_attention) -> torch.Tensor:
    """Self-attention where each panel also reads sampled tokens of the panels it shares with.

    q: [chunks*B, Tq, D]; k, v: [chunks*B, Tk, D]; row c*B+i is panel i of chunk c.
    share: [B, B] bool, share[i, j] = panel i may read panel j (the diagonal is ignored).
    sampled: [B, n] token indices (into Tk) of each panel that the others read.
    window: 0 or >= B — one window over the whole batch. 0 < W < B — the paper's sliding window:
        windows of W consecutive panels (stride 1); inside a window a panel reads the panels of
        that window only; its output is the mean over the windows that contain it.
    bank: extra tokens from an identity bank that panels read on top of their own.
    attention: the kernel, attention(q, k, v, heads) on [rows, tokens, D] (plain sdpa by default).

    Key order of panel i: [bank panels it reads, sampled tokens of the panels it shares with, its own].
    Query panels are processed one at a time (its rows of every chunk together): the extra memory
    is one panel's K/V, [chunks, L_i, D] each, built in one buffer, whatever B and W are. A panel
    that reads nothing but itself gets plain attention on views of its rows, with no copy.
    """
    total, tq, dim = q.shape
    if total % chunks:
        raise ValueError(f"{total} attention rows do not split into {chunks} chunks")
    panels = total // chunks
    tk = k.shape[1]
    share, sampled, windows = panel_plan(share, sampled, panels, window)

    # [chunks, B, tokens, D] views (no copy for the contiguous tensors ComfyUI passes)
    q4 = q.reshape(chunks, panels, tq, dim)
    k4 = k.reshape(chunks, panels, tk, dim)
    v4 = v.reshape(chunks, panels, tk, dim)
    k_flat = k4.reshape(chunks, panels * tk, dim)  # row j*tk + t is token t of panel j
    v_flat = v4.reshape(chunks, panels * tk, dim)
    if bank is not None and bank.k.shape[1] > 0:
        if bank.k.shape[0] != chunks:
            raise ValueError(f"bank holds {bank.k.shape[0]} chunks, the call has {chunks}")
        bank_k = bank.k.to(k.device, k.dtype)  # no copy when it is already there
        bank_v = bank.v.to(v.device, v.dtype)
        bank_reads = [torch.nonzero(r).reshape(-1).tolist() for r in bank.reads.to(torch.bool).cpu()]
    else:
        bank_k = bank_v = None
        bank_reads = [[] for _ in range(panels)]

    flat_sampled = to_device(sampled + torch.arange(panels)[:, None] * tk, k.device)  # rows of k_flat, one copy
    single = len(windows) == 1
    out = torch.empty_like(q) if single else torch.zeros_like(q)
    out4 = out.view(chunks, panels, tq, dim)
    for members in windows:
        for i in members:
            others = [j for j in members if share[i, j]]
            n_bank = sum(bank_k.shape[2] for _ in bank_reads[i]) if bank_k is not None else 0
            n_other = sum(int(sampled[j].numel()) for j in others)
            if n_bank + n_other == 0:
                kk, vv = k4[:, i], v4[:, i]  # reads nothing but itself: plain attention, no gather
            else:
                # one buffer per K and V, filled in place: bank tokens, the others' sampled tokens, own tokens
                length = n_bank + n_other + tk
                kk = k.new_empty((chunks, length, dim))
                vv = v.new_empty((chunks, length, dim))
                at = 0
                for b in bank_reads[i]:
                    nt = bank_k.shape[2]
                    kk[:, at:at + nt].copy_(bank_k[:, b])
                    vv[:, at:at + nt].copy_(bank_v[:, b])
                    at += nt
                if n_other:
                    index = torch.cat([flat_sampled[j] for j in others])
                    for c in range(chunks):  # kk[c, a:b] is contiguous: index_select writes straight into it
                        torch.index_select(k_flat[c], 0, index, out=kk[c, at:at + n_other])
                        torch.index_select(v_flat[c], 0, index, out=vv[c, at:at + n_other])
                    at += n_other
                kk[:, at:].copy_(k4[:, i])
                vv[:, at:].copy_(v4[:, i])
            result = attention(q4[:, i], kk, vv, heads)
            if single:
                out4[:, i].copy_(result)
            else:
                out4[:, i].add_(result)
            del kk, vv, result
    if not single:
        mean_over_windows(out4, windows)
    return out
