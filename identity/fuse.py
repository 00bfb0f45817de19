"""The PhotoMaker v1 fuse: class-word text embedding + ID embedding -> identity-aware embedding.

Key names follow the public file (`fuse_module.mlp1.layernorm`, `.fc1`, `.fc2`, `mlp2.*`,
`layer_norm`). `D` is the text-embedding width (2048 for SDXL: CLIP-L 768 + CLIP-G 1280).
"""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, optionally residual."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
        return x + y if self.residual else y


class FuseModule(nn.Module):
    """fuse(c, e) = LN(MLP2(MLP1([c, e]) + c)), with MLP2 residual: the learned ID stamp on a class word."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, class_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """class_embeds, id_embeds: [..., D] (paired row by row) -> fused [..., D]."""
        x = self.mlp1(torch.cat([class_embeds, id_embeds], dim=-1)) + class_embeds
        return self.layer_norm(self.mlp2(x))


@torch.no_grad()
def fuse_into_prompt(fuse: FuseModule, prompt_embeds: torch.Tensor, class_positions: list[int],
                     id_embeds: torch.Tensor) -> torch.Tensor:
    """Replace the class-word rows of one prompt with their fuse with the ID embeddings.

    prompt_embeds: [T, D] (all chunks of one prompt, flattened); class_positions: the T-indices of
    the repeated class token, one per reference photo, in photo order; id_embeds: [N, D].
    Returns a new tensor; the input is left untouched.
    """
    if len(class_positions) != id_embeds.shape[0]:
        raise ValueError(f"{len(class_positions)} class-word positions for {id_embeds.shape[0]} reference photos "
                         "(the prompt was probably cut off after the class word: move the trigger word earlier).")
    width = fuse.layer_norm.normalized_shape[0]
    if prompt_embeds.shape[-1] != width or id_embeds.shape[-1] != width:
        raise ValueError(f"the PhotoMaker file fuses {width}-wide embeddings but the text encoder gives "
                         f"{prompt_embeds.shape[-1]}-wide ones: PhotoMaker v1 needs an SDXL CLIP (2048 wide).")
    out = prompt_embeds.clone()
    weight = fuse.layer_norm.weight
    index = torch.tensor(class_positions, dtype=torch.long, device=out.device)
    fused = fuse(out[index].to(weight.device, weight.dtype), id_embeds.to(weight.device, weight.dtype))
    out[index] = fused.to(out.device, out.dtype)
    return out
