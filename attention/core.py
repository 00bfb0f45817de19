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

Query panels are attended G per kernel call: panels with the same key count (and bank reads) share one K/V
buffer [chunks, G, L, D], filled by one index_select from the call's own k/v (rows_of: any strides, no copy).
G comes from a memory budget in bytes (panels_per_call; 0 = one panel per call, the least memory). Grouped and
one-per-call results differ only by the kernel's batch-size noise (0 on the CPU, measured).
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


def panels_per_call(budget_bytes: int, panel_bytes: int, panels: int) -> int:
    """G, the query panels one attention call takes: as many as `budget_bytes` holds at `panel_bytes` each (the
    extra memory one query panel adds to a call: its K/V buffer and copies, panel_call_bytes), at least 1, at most
    `panels`. A budget of 0 (or below one panel's bytes) is one panel per call: the least memory, the most calls."""
    if budget_bytes <= 0 or panels <= 1:
        return 1
    if panel_bytes <= 0:
        return panels
    return max(1, min(panels, int(budget_bytes) // int(panel_bytes)))


def panel_call_bytes(chunks: int, query_tokens: int, keys: int, width: int, element_size: int,
                     index_rows: int = 1, extra: int = 0) -> int:
    """Extra bytes one query panel adds to a grouped attention call: its K and V buffers ([chunks, keys, width]
    each), its query copy, the kernel's output and its layout copy ([chunks, query_tokens, width] each), the
    gather index (8 bytes per key row, `index_rows` rows per key: chunks for a UNet, chunks x heads for a DiT) and `extra` (a mask)."""
    return chunks * (2 * keys + 3 * query_tokens) * width * element_size + 8 * keys * index_rows + extra


@dataclass(frozen=True)
class QueryUnit:
    """One query panel's attention in one window: the panels whose sampled tokens it reads (in key order), the
    bank panels it reads, and its key count."""
    panel: int
    others: tuple
    reads: tuple
    keys: int


def query_units(share: torch.Tensor, sampled: torch.Tensor, windows: list, bank_reads: list, bank_tokens: int,
                own_tokens: int) -> list:
    """Every (window, query panel) attention of a call, ordered by the panel's place in its window, then by
    window: consecutive units of one place are consecutive, distinct panels (so a group of them reads and
    writes slices of the batch)."""
    counts = [int(sampled[j].numel()) for j in range(sampled.shape[0])]
    units = []
    for place in range(len(windows[0])):
        for members in windows:
            i = members[place]
            others = tuple(j for j in members if share[i, j] and counts[j])
            keys = len(bank_reads[i]) * bank_tokens + sum(counts[j] for j in others) + own_tokens
            units.append(QueryUnit(i, others, tuple(bank_reads[i]), keys))
    return units


def query_groups(units: list, group_size) -> list:
    """Units in groups of one attention call each: same key count and bank reads (one K/V buffer without
    padding), distinct panels, at most group_size(keys) units."""
    open_groups: dict = {}
    groups = []
    for unit in units:
        key = (unit.keys, unit.reads, not unit.others and not unit.reads)
        group = open_groups.get(key)
        if group is None or len(group) >= group_size(unit.keys) or any(u.panel == unit.panel for u in group):
            group = []
            open_groups[key] = group
            groups.append(group)
        group.append(unit)
    return groups


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """t ([..., D], unit stride on D, any other strides) as [R, D] rows where row r starts r elements after t's
    first element: row sum(index * stride) is t[index]. A read-only view, no copy (a permuted v too)."""
    if t.stride(-1) != 1:
        raise ValueError("rows_of needs a unit stride on the last dim")
    span = sum((size - 1) * stride for size, stride in zip(t.shape[:-1], t.stride()[:-1])) + 1
    return t.as_strided((span, t.shape[-1]), (1, 1), t.storage_offset())


def key_index(t: torch.Tensor, base: torch.Tensor, tokens: int) -> torch.Tensor:
    """Rows of rows_of(t) for a group's keys, flat in the order of its buffer [chunks, G, *mid, L, D].

    t: [chunks, B, *mid, tokens, D] (mid: heads for a DiT); base: [G, L] keys as panel * tokens + token."""
    s = t.stride()
    if s[1] == tokens * s[-2]:
        rows = base * s[-2]
    else:
        rows = torch.div(base, tokens, rounding_mode="floor") * s[1] + (base % tokens) * s[-2]
    mid = t.ndim - 4
    index = rows.view((1, base.shape[0]) + (1,) * mid + (base.shape[1],))
    dims = [0] + list(range(2, 2 + mid))
    for d in dims:
        shape = [1] * index.ndim
        shape[d] = t.shape[d]
        index = index + (torch.arange(t.shape[d], device=base.device) * s[d]).view(shape)
    return index.reshape(-1)


def gather_rows(t: torch.Tensor, index: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A new [*shape] tensor (shape[-1] = t's last dim) filled with the rows `index` (key_index) of t: one
    index_select into a buffer allocated once."""
    out = t.new_empty(shape)
    torch.index_select(rows_of(t), 0, index, out=out.view(-1, shape[-1]))
    return out


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _consecutive(members: list) -> bool:
    return members == list(range(members[0], members[0] + len(members)))


def select_panels(t4: torch.Tensor, members: list) -> torch.Tensor:
    """Rows of panels `members` of every chunk, [chunks, B, ...] -> [chunks*G, ...] (a view for one panel)."""
    chunks = t4.shape[0]
    if _consecutive(members):
        part = t4[:, members[0]:members[0] + len(members)]
    else:
        part = t4.index_select(1, to_device(torch.tensor(members), t4.device))
    return part.reshape((chunks * len(members),) + tuple(t4.shape[2:]))


def write_group(out4: torch.Tensor, members: list, result: torch.Tensor, single: bool) -> None:
    """out4[:, members] = result (one window) or += result (sliding windows); result [chunks, G, ...]."""
    if _consecutive(members):
        part = out4[:, members[0]:members[0] + len(members)]
        if single:
            part.copy_(result)
        else:
            part.add_(result)
        return
    index = to_device(torch.tensor(members), out4.device)
    if single:
        out4.index_copy_(1, index, result)
    else:
        out4.index_add_(1, index, result)


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
                         bank: BankTokens | None = None, budget: int = 0,
                         attention: AttentionFn = multihead_attention) -> torch.Tensor:
    """Self-attention where each panel also reads sampled tokens of the panels it shares with.

    q: [chunks*B, Tq, D]; k, v: [chunks*B, Tk, D]; row c*B+i is panel i of chunk c.
    share: [B, B] bool, share[i, j] = panel i may read panel j (the diagonal is ignored).
    sampled: [B, n] token indices (into Tk) of each panel that the others read.
    window: 0 or >= B — one window over the whole batch. 0 < W < B — the paper's sliding window:
        windows of W consecutive panels (stride 1); inside a window a panel reads the panels of
        that window only; its output is the mean over the windows that contain it.
    bank: extra tokens from an identity bank that panels read on top of their own.
    budget: bytes of extra memory the call may use for query panels' K/V buffers (see panels_per_call):
        0 = one query panel per attention call (the least memory); more = G panels of the same key count
        per attention call, their K/V built in one buffer (fewer, larger kernel launches).
    attention: the kernel, attention(q, k, v, heads) on [rows, tokens, D] (plain sdpa by default).

    Key order of panel i: [bank panels it reads, sampled tokens of the panels it shares with, its own].
    With G = 1 the extra memory is one panel's K/V, [chunks, L_i, D] each, whatever B and W are. A panel
    that reads nothing but itself, alone in its group, gets plain attention on views of its rows, with no copy.
    """
    total, tq, dim = q.shape
    if total % chunks:
        raise ValueError(f"{total} attention rows do not split into {chunks} chunks")
    panels = total // chunks
    tk = k.shape[1]
    share, sampled, windows = panel_plan(share, sampled, panels, window)

    # [chunks, B, tokens, D] views (no copy for the contiguous tensors ComfyUI passes)
    q4 = q.reshape(chunks, panels, tq, dim)
    k4 = unit_stride(k.reshape(chunks, panels, tk, dim))
    v4 = unit_stride(v.reshape(chunks, panels, tk, dim))
    bank_k = bank_v = None
    bank_reads = [()] * panels
    bank_tokens = 0
    if bank is not None and bank.k.shape[1] > 0:
        if bank.k.shape[0] != chunks:
            raise ValueError(f"bank holds {bank.k.shape[0]} chunks, the call has {chunks}")
        bank_k = bank.k.to(k.device, k.dtype)  # no copy when it is already there
        bank_v = bank.v.to(v.device, v.dtype)
        bank_reads = [tuple(torch.nonzero(r).reshape(-1).tolist()) for r in bank.reads.to(torch.bool).cpu()]
        bank_tokens = bank_k.shape[2]

    units = query_units(share, sampled, windows, bank_reads, bank_tokens, tk)
    element = k.element_size()
    groups = query_groups(units, lambda keys: panels_per_call(
        budget, panel_call_bytes(chunks, tq, keys, dim, element, index_rows=chunks), panels))
    single = len(windows) == 1
    out = torch.empty_like(q) if single else torch.zeros_like(q)
    out4 = out.view(chunks, panels, tq, dim)
    flat_sampled = to_device(sampled + torch.arange(panels)[:, None] * tk, k.device)  # panel*tk + token, one copy
    own = None
    for group in groups:
        members = [unit.panel for unit in group]
        if not group[0].others and not group[0].reads:  # they read nothing but themselves: plain attention
            result = attention(*(select_panels(t, members) for t in (q4, k4, v4)), heads)  # one panel: views
            write_group(out4, members, result.reshape(chunks, len(members), tq, dim), single)
            continue
        if own is None:  # row panel*tk + t: token t of each panel (views below, no launch per panel)
            own = torch.arange(panels * tk, device=k.device).view(panels, tk)
        g, keys = len(group), group[0].keys
        pieces = []
        placeholder = own.new_zeros(len(group[0].reads) * bank_tokens)  # the group reads the same bank panels
        for unit in group:  # per unit: [bank (placeholder keys, overwritten below), others' sampled, own]
            pieces.append(placeholder)
            pieces.extend(flat_sampled[j] for j in unit.others)
            pieces.append(own[unit.panel])
        base = torch.cat(pieces).view(g, keys)
        del pieces
        index = key_index(k4, base, tk)
        index_v = index if v4.stride() == k4.stride() else key_index(v4, base, tk)
        kk = gather_rows(k4, index, (chunks, g, keys, dim))
        vv = gather_rows(v4, index_v, (chunks, g, keys, dim))
        del index, index_v, base
        at = 0
        for b in group[0].reads:  # the group's panels read the same bank panels: one broadcast copy each
            kk[:, :, at:at + bank_tokens].copy_(bank_k[:, b, None])
            vv[:, :, at:at + bank_tokens].copy_(bank_v[:, b, None])
            at += bank_tokens
        result = attention(select_panels(q4, members), kk.view(chunks * g, keys, dim), vv.view(chunks * g, keys, dim),
                           heads)
        del kk, vv
        write_group(out4, members, result.reshape(chunks, g, tq, dim), single)
        del result
    if not single:
        mean_over_windows(out4, windows)
    return out
