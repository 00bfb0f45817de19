"""Plain-torch helpers around CLIP vision outputs: which field a predictor works on, and its layouts.

A CLIP vision output (ComfyUI's `comfy.clip_vision.Output`, or anything with the same attributes)
carries `image_embeds` [N, D_proj] (the pooled, projected embedding plain IP-Adapter uses) and
`penultimate_hidden_states` [N, T, D] (IP-Adapter "plus"). The predictor always sees token
sequences [N, T, D]; pooled embeddings get T = 1.

IP-Adapter's EMBEDS value (cubiq/ComfyUI_IPAdapter_plus, IPAdapterPlus.py: IPAdapterEncoder.encode
returns `.image_embeds` or `.penultimate_hidden_states` unchanged; "IPAdapter Embeds Batch" applies
batch item j to frame j) is the raw tensor: [N, D] for pooled, [N, T, D] for penultimate.
"""
from __future__ import annotations

import torch

FIELD_OF_KIND = {"pooled": "image_embeds", "penultimate": "penultimate_hidden_states"}


def tokens_of(output, kind: str) -> torch.Tensor:
    """The embeddings a `kind` predictor works on, as [N, T, D] float32."""
    if kind not in FIELD_OF_KIND:
        raise ValueError(f"Unknown embedding kind {kind!r}: use one of {', '.join(FIELD_OF_KIND)}.")
    value = getattr(output, FIELD_OF_KIND[kind], None)
    if value is None:
        raise ValueError(f"The CLIP vision model gave no {FIELD_OF_KIND[kind]}; choose the other embedding kind.")
    value = value.float()
    return value.unsqueeze(1) if kind == "pooled" else value


def embeds_layout(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, T, D] -> IP-Adapter's EMBEDS layout: [N, D] for pooled, [N, T, D] for penultimate."""
    return tokens[:, 0] if kind == "pooled" else tokens


def adjacent_pairs(count: int) -> list[tuple[int, int]]:
    """Panel indices of every transition in a batch of `count` panels: (0, 1), (1, 2), ..."""
    if count < 2:
        raise ValueError(f"A transition needs two panels: connect an end image, or pass a batch of at least "
                         f"2 panels as the start image (got {count}).")
    return [(i, i + 1) for i in range(count - 1)]
