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
chunk, and query panels are processed one at a time (one panel's K/V buffer at a time).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .core import BankTokens, mean_over_windows, panel_plan, to_device

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
                               mask: torch.Tensor | None = None, bank: BankTokens | None = None,
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

    Key order of panel i: [its own tokens, bank panels it reads, sampled image tokens of the others].
    attention: attention(q, k, v, mask) on [chunks, H, tokens, D]; returns rows first ([chunks, N, H*D]
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
    bank_reads = [[] for _ in range(panels)]
    if bank is not None and bank.k.shape[1] > 0 and bank.k.shape[3] > 0:
        if bank.k.shape[0] != chunks or bank.k.shape[2] != heads or bank.k.shape[4] != dim:
            raise ValueError(f"bank tokens {tuple(bank.k.shape)} do not fit {chunks} chunks of {heads} heads x {dim}")
        bank_k, bank_v = bank.k.to(k.device, k.dtype), bank.v.to(v.device, v.dtype)
        bank_reads = [torch.nonzero(r).reshape(-1).tolist() for r in bank.reads.to(torch.bool).cpu()]

    q4 = q.reshape(chunks, panels, heads, tokens, dim)
    k4 = k.reshape(chunks, panels, heads, k.shape[2], dim)
    v4 = v.reshape(chunks, panels, heads, v.shape[2], dim)
    positions = to_device(text_tokens + sampled, k.device)  # [B, n] key positions others read, one copy

    single = len(windows) == 1
    out4 = None
    for members in windows:
        for i in members:
            others = [j for j in members if share[i, j]]
            n_bank = len(bank_reads[i]) * (bank_k.shape[3] if bank_k is not None else 0)
            n_other = sum(int(sampled[j].numel()) for j in others)
            if n_bank + n_other == 0:
                kk, vv, columns = k4[:, i], v4[:, i], None  # reads nothing but itself: plain joint attention
            else:
                own = k.shape[2]
                kk = k.new_empty((chunks, heads, own + n_bank + n_other, dim))
                vv = v.new_empty((chunks, heads, own + n_bank + n_other, dim))
                kk[:, :, :own].copy_(k4[:, i])
                vv[:, :, :own].copy_(v4[:, i])
                at = own
                for b in bank_reads[i]:
                    n = bank_k.shape[3]
                    kk[:, :, at:at + n].copy_(bank_k[:, b])
                    vv[:, :, at:at + n].copy_(bank_v[:, b])
                    at += n
                for j in others:
                    n = int(sampled[j].numel())
                    kk[:, :, at:at + n].copy_(k4[:, j].index_select(2, positions[j]))
                    vv[:, :, at:at + n].copy_(v4[:, j].index_select(2, positions[j]))
                    at += n
                columns = None
                if mask is not None:  # the mask columns of the appended keys
                    first_image = torch.full((n_bank,), text_tokens, dtype=torch.long, device=k.device)
                    columns = torch.cat([first_image] + [positions[j] for j in others])
            result = attention(q4[:, i], kk, vv, _panel_mask(mask, chunks, panels, i, columns))
            if out4 is None:
                shape = (chunks, panels) + tuple(result.shape[1:])
                out4 = result.new_empty(shape) if single else result.new_zeros(shape)  # empty: pages written once
            if single:
                out4[:, i].copy_(result)
            else:
                out4[:, i].add_(result)
            del kk, vv, result
    if not single:
        mean_over_windows(out4, windows)
    return out4.reshape((total,) + tuple(out4.shape[2:]))


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
