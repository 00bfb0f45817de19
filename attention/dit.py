"""Consistent Self-Attention on a DiT's joint attention, in plain torch.

A DiT block (Flux, Chroma, SD3, Qwen-Image, Lumina 2, ...) attends jointly over the text and image tokens of a panel:
q/k/v arrive as [rows, heads, tokens, dim_head] with the panel's text tokens first, then its
image tokens, then anything else (Kontext reference-image tokens). StoryDiffusion on a DiT:

    K_i, V_i = [all tokens of panel i, sampled *image* tokens of the panels i shares with]
    O_i      = Attention(Q_i, K_i, V_i)

Text tokens of other panels and tokens after the image (references) are never shared. An identity
bank (read runs) adds the stored image keys/values of the bank panels a panel reads. The keys
arrive after RoPE, so a shared key keeps the position phases of its own panel (CharaConsist-style
position matching is not done here). Rows are grouped into chunks (cond, uncond, ...) as in
attention/core.py: a panel reads panels of its own chunk only, with the same token indices in every
chunk, and query panels are attended G at a time (G panels' K/V in one buffer, G from a memory budget: core.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .core import (
    BankTokens,
    gather_rows,
    key_index,
    mean_over_windows,
    panel_call_bytes,
    panel_plan,
    panels_per_call,
    query_groups,
    query_units,
    select_panels,
    to_device,
    unit_stride,
    write_group,
)

# attention(q, k, v, mask) on [rows, heads, tokens, dim_head] -> anything with rows first
JointAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_joint(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference kernel: [rows, H, Nq, D] x [rows, H, Nk, D] -> [rows, Nq, H*D] (ComfyUI's output layout)."""
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows, heads, tokens, dim = out.shape
    return out.transpose(1, 2).reshape(rows, tokens, heads * dim)


def _panel_mask(mask: torch.Tensor | None, chunks: int, panels: int, i: int,
                columns: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask of panel i's rows, with a column for every appended key.

    A shared key at image position t of another panel takes the column of image position t of
    panel i (masks of joint attention say which positions a query may see, not whose they are)."""
    if mask is None:
        return None
    if mask.ndim >= 3 and mask.shape[0] == chunks * panels:
        mask = mask.reshape(chunks, panels, *mask.shape[1:])[:, i]
    if columns is None or columns.numel() == 0:
        return mask
    return torch.cat([mask, mask.index_select(-1, columns.to(mask.device))], dim=-1)


def joint_consistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunks: int, text_tokens: int,
                               image_tokens: int, share: torch.Tensor, sampled: torch.Tensor, window: int = 0,
                               mask: torch.Tensor | None = None, bank: BankTokens | None = None, budget: int = 0,
                               attention: JointAttentionFn = sdpa_joint) -> torch.Tensor:
    """Joint attention where each panel also reads sampled image tokens of the panels it shares with.

    q, k, v: [chunks*B, H, N, D]; row c*B+i is panel i of chunk c; tokens [text_tokens] text, then
        [image_tokens] image tokens, then N - text - image tokens that belong to the panel but are never shared.
        text_tokens is where the image tokens start: HiDream, whose image tokens come first and its text after
        them, passes 0 (its text then counts among the trailing, never shared tokens).
    share: [B, B] bool, share[i, j] = panel i may read panel j (the diagonal is ignored).
    sampled: [B, n] indices into the panel's image tokens (0 .. image_tokens-1) that the others read.
    window: 0 or >= B: one window over the batch; 0 < W < B: sliding windows of W consecutive panels,
        each panel's output the mean over the windows that contain it (as attention/core.py).
    mask: None, or a mask ComfyUI's kernels accept ([N, N], [rows, N, N], [rows, H, N, N]...); it is
        cut to each panel's rows and extended with a column per appended key.
    bank: identity-bank tokens, k/v [chunks, bank panels, H, n, D] (image keys/values after RoPE, as a
        write run stored them) and reads [B, bank panels]. A bank key takes the mask column of the panel's
        first image token: no supported family masks image tokens (masks there hide text padding).
    budget: bytes of extra memory for the query panels' K/V buffers (core.panels_per_call): 0 = one query panel
        per attention call; more = G panels of the same key count per call, their K/V gathered into one buffer.

    Key order of panel i: [its own tokens, bank panels it reads, sampled image tokens of the others].
    attention: attention(q, k, v, mask) on [chunks*G, H, tokens, D]; returns rows first ([chunks*G, N, H*D]
        for ComfyUI's kernels). The result has the kernel's layout with chunks*B rows.
    """
    total, heads, tokens, dim = q.shape
    if total % chunks:
        raise ValueError(f"{total} attention rows do not split into {chunks} chunks")
    panels = total // chunks
    if text_tokens < 0 or image_tokens <= 0 or text_tokens + image_tokens > k.shape[2]:
        raise ValueError(f"{k.shape[2]} key tokens cannot hold {text_tokens} text + {image_tokens} image tokens")
    if sampled.numel() and int(sampled.max()) >= image_tokens:
        raise ValueError(f"sampled token index {int(sampled.max())} is past the {image_tokens} image tokens")
    share, sampled, windows = panel_plan(share, sampled, panels, window)
    bank_k = bank_v = None
    bank_reads = [()] * panels
    bank_tokens = 0
    if bank is not None and bank.k.shape[1] > 0 and bank.k.shape[3] > 0:
        if bank.k.shape[0] != chunks or bank.k.shape[2] != heads or bank.k.shape[4] != dim:
            raise ValueError(f"bank tokens {tuple(bank.k.shape)} do not fit {chunks} chunks of {heads} heads x {dim}")
        bank_k, bank_v = bank.k.to(k.device, k.dtype), bank.v.to(v.device, v.dtype)
        bank_reads = [tuple(torch.nonzero(r).reshape(-1).tolist()) for r in bank.reads.to(torch.bool).cpu()]
        bank_tokens = bank_k.shape[3]

    own = k.shape[2]
    q4 = q.reshape(chunks, panels, heads, tokens, dim)
    k4 = unit_stride(k.reshape(chunks, panels, heads, own, dim))
    v4 = unit_stride(v.reshape(chunks, panels, heads, v.shape[2], dim))
    positions = to_device(text_tokens + sampled, k.device)  # [B, n] key positions others read, one copy
    flat = positions + to_device(torch.arange(panels)[:, None] * own, k.device)  # panel*own + position
    units = query_units(share, sampled, windows, bank_reads, bank_tokens, own)
    mask_bytes = 0 if mask is None else mask.element_size() * chunks * tokens * (heads if mask.ndim == 4 else 1)
    groups = query_groups(units, lambda keys: panels_per_call(budget, panel_call_bytes(
        chunks, tokens, keys, heads * dim, k.element_size(), index_rows=chunks * heads,
        extra=mask_bytes * keys), panels))

    single = len(windows) == 1
    out4 = None
    arange_own = None
    for group in groups:
        members = [unit.panel for unit in group]
        if not group[0].others and not group[0].reads:  # they read nothing but themselves: plain joint attention
            result = attention(*(select_panels(t, members) for t in (q4, k4, v4)),  # one panel: views
                               _group_mask([_panel_mask(mask, chunks, panels, i, None) for i in members], chunks)
                               if mask is not None else None)
        else:
            if arange_own is None:  # row panel*own + t: token t of each panel (views below)
                arange_own = torch.arange(panels * own, device=k.device).view(panels, own)
            g, keys = len(group), group[0].keys
            pieces = []
            placeholder = arange_own.new_zeros(len(group[0].reads) * bank_tokens)  # the same bank reads
            for unit in group:  # per unit: [own, bank (placeholder keys, overwritten below), others' sampled]
                pieces.append(arange_own[unit.panel])
                pieces.append(placeholder)
                pieces.extend(flat[j] for j in unit.others)
            base = torch.cat(pieces).view(g, keys)
            del pieces
            index = key_index(k4, base, own)
            kk = gather_rows(k4, index, (chunks, g, heads, keys, dim))
            if v4.stride() != k4.stride():
                index = key_index(v4, base, own)
            vv = gather_rows(v4, index, (chunks, g, heads, keys, dim))
            del index, base
            at = own
            for b in group[0].reads:  # the group reads the same bank panels: one broadcast copy each
                kk[:, :, :, at:at + bank_tokens].copy_(bank_k[:, b, None])
                vv[:, :, :, at:at + bank_tokens].copy_(bank_v[:, b, None])
                at += bank_tokens
            group_mask = None
            if mask is not None:  # the mask columns of the appended keys, per unit
                first_image = torch.full((len(group[0].reads) * bank_tokens,), text_tokens, dtype=torch.long,
                                         device=k.device)
                group_mask = _group_mask([_panel_mask(mask, chunks, panels, u.panel, torch.cat(
                    [first_image] + [positions[j] for j in u.others])) for u in group], chunks)
            result = attention(select_panels(q4, members), kk.view((chunks * g,) + kk.shape[2:]),
                               vv.view((chunks * g,) + vv.shape[2:]), group_mask)
            del kk, vv
        if out4 is None:
            shape = (chunks, panels) + tuple(result.shape[1:])
            out4 = result.new_empty(shape) if single else result.new_zeros(shape)  # empty: pages written once
        write_group(out4, members, result.reshape((chunks, len(members)) + tuple(result.shape[1:])), single)
        del result
    if not single:
        mean_over_windows(out4, windows)
    return out4.reshape((total,) + tuple(out4.shape[2:]))


def _group_mask(masks: list, chunks: int) -> torch.Tensor:
    """Per-unit masks ([.., N, L], rows broadcast over chunks) -> one mask of a group call's chunks*G rows."""
    if len(masks) == 1:
        return masks[0]
    rows = []
    for m in masks:
        m = m if m.ndim >= 3 else m[None]
        rows.append(m.expand((chunks,) + tuple(m.shape[1:])))
    width = max(m.ndim for m in rows)
    rows = [m.reshape((chunks,) + (1,) * (width - m.ndim) + tuple(m.shape[1:])) for m in rows]
    return torch.stack(rows, dim=1).reshape((-1,) + tuple(rows[0].shape[1:]))


def sampled_keys_values(k: torch.Tensor, v: torch.Tensor, *, chunks: int, text_tokens: int,
                        sampled: torch.Tensor) -> torch.Tensor:
    """What a DiT identity bank stores for one attention call: [chunks, B, n, 2*H*D], the sampled image
    keys then values of each panel (after RoPE, heads flattened), token-major like the UNet bank's hidden states.

    k, v: [chunks*B, H, N, D]; sampled: [B, n] indices into the image tokens (which start at text_tokens)."""
    total, heads, _, dim = k.shape
    panels = total // chunks
    index = (text_tokens + sampled.to(torch.long)).to(k.device)  # [B, n]
    gather = index[None, :, None, :, None].expand(chunks, panels, heads, index.shape[1], dim)

    def pick(t):
        picked = torch.gather(t.reshape(chunks, panels, heads, t.shape[2], dim), 3, gather)
        return picked.permute(0, 1, 3, 2, 4).reshape(chunks, panels, index.shape[1], heads * dim)

    return torch.cat([pick(k), pick(v)], dim=-1)


def bank_keys_values(stored: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of sampled_keys_values: [chunks, P, n, 2*H*D] -> k, v [chunks, P, H, n, D]."""
    chunks, panels, n, width = stored.shape
    if width % (2 * heads):
        raise ValueError(f"bank tokens of width {width} do not split into keys and values of {heads} heads")
    dim = width // (2 * heads)
    kv = stored.reshape(chunks, panels, n, 2, heads, dim).permute(3, 0, 1, 4, 2, 5)
    return kv[0], kv[1]
