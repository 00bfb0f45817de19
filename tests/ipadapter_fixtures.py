"""IP-Adapter files with the real key names (tencent-ailab/IP-Adapter layout) and test-only nodes.

Widths are either the real ones (to check that public files are recognised) or shrunk to match
tests/tiny_models.make_model(...), whose cross-attention layers are listed here in file order.
"""
from __future__ import annotations

import torch

# (ComfyUI patch key, inner width) of every cross-attention, in IP-Adapter file order
# (input blocks, output blocks, middle block). Real SD1.5 / SDXL: facts from IPAdapter_plus's block lists.
SD15_KEYS = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("output", i, 0) for i in range(3, 12)] + [("middle", 0, 0)]
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
SDXL_KEYS = ([("input", i, j) for i in (4, 5) for j in range(2)] + [("input", i, j) for i in (7, 8) for j in range(10)]
             + [("output", i, j) for i in (0, 1, 2) for j in range(10)] + [("output", i, j) for i in (3, 4, 5) for j in range(2)]
             + [("middle", 0, j) for j in range(10)])
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10

# tiny_models.make_model("sd15") (width 32, mult 1,2,4,4) and make_model("sdxl") (width 32, mult 1,2,4, depth 2)
TINY_SD15_WIDTHS = [32, 32, 64, 64, 128, 128] + [128] * 3 + [64] * 3 + [32] * 3 + [128]
TINY_SD15_CONTEXT = 64
TINY_SDXL_KEYS = ([("input", 4, 0), ("input", 5, 0)] + [("input", i, j) for i in (7, 8) for j in range(2)]
                  + [("output", i, j) for i in (0, 1, 2) for j in range(2)] + [("output", i, 0) for i in (3, 4, 5)]
                  + [("middle", 0, j) for j in range(2)])
TINY_SDXL_WIDTHS = [64, 64] + [128] * 4 + [128] * 6 + [64] * 3 + [128] * 2
TINY_SDXL_CONTEXT = 112


def _tensor(shape, gen, device, dtype, std=None):
    if device == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    if std is None:
        std = 1.0 / max(shape[-1], 1) ** 0.5
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def ipadapter_state_dict(widths, context_dim, kind="plain", clip_dim=32, num_tokens=4, resampler_dim=None,
                         resampler_inner=128, depth=2, seed=0, dtype=torch.float32, device="cpu") -> dict:
    """Nested {"image_proj", "ip_adapter"} with the public key names; random seeded values.

    Norm weights are 1 and biases small, like trained files; device="meta" builds shapes only.
    """
    gen = torch.Generator().manual_seed(seed)
    t = lambda *shape, std=None: _tensor(shape, gen, device, dtype, std)
    ones = lambda n: torch.ones(n, dtype=dtype, device=device)
    zeros = lambda n: torch.zeros(n, dtype=dtype, device=device)
    proj = {}
    if kind == "plain":
        proj = {"proj.weight": t(num_tokens * context_dim, clip_dim), "proj.bias": t(num_tokens * context_dim, std=0.02),
                "norm.weight": ones(context_dim), "norm.bias": zeros(context_dim)}
    elif kind == "full":
        proj = {"proj.0.weight": t(clip_dim, clip_dim), "proj.0.bias": zeros(clip_dim),
                "proj.2.weight": t(context_dim, clip_dim), "proj.2.bias": zeros(context_dim),
                "proj.3.weight": ones(context_dim), "proj.3.bias": zeros(context_dim)}
    elif kind == "plus":
        dim = resampler_dim or context_dim
        proj = {"latents": t(1, num_tokens, dim, std=dim ** -0.5), "proj_in.weight": t(dim, clip_dim), "proj_in.bias": zeros(dim),
                "proj_out.weight": t(context_dim, dim), "proj_out.bias": zeros(context_dim),
                "norm_out.weight": ones(context_dim), "norm_out.bias": zeros(context_dim)}
        for i in range(depth):
            p = f"layers.{i}."
            proj.update({p + "0.norm1.weight": ones(dim), p + "0.norm1.bias": zeros(dim),
                         p + "0.norm2.weight": ones(dim), p + "0.norm2.bias": zeros(dim),
                         p + "0.to_q.weight": t(resampler_inner, dim), p + "0.to_kv.weight": t(2 * resampler_inner, dim),
                         p + "0.to_out.weight": t(dim, resampler_inner),
                         p + "1.0.weight": ones(dim), p + "1.0.bias": zeros(dim),
                         p + "1.1.weight": t(4 * dim, dim), p + "1.3.weight": t(dim, 4 * dim)})
    else:
        raise ValueError(kind)
    layers = {}
    for i, width in enumerate(widths):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = t(width, context_dim)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = t(width, context_dim)
    return {"image_proj": proj, "ip_adapter": layers}


def tiny_ipadapter(family="sd15", kind="plain", seed=0, **kw) -> dict:
    widths, context = (TINY_SD15_WIDTHS, TINY_SD15_CONTEXT) if family == "sd15" else (TINY_SDXL_WIDTHS, TINY_SDXL_CONTEXT)
    if kind == "plus":
        kw.setdefault("num_tokens", 16)
    return ipadapter_state_dict(widths, context, kind=kind, seed=seed, **kw)


def write_ipadapter(path: str, groups: dict) -> str:
    """`.safetensors`: flat 'image_proj.' / 'ip_adapter.' keys; anything else: the nested torch pickle."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        flat = {f"{g}.{k}": v.contiguous() for g, sd in groups.items() for k, v in sd.items()}
        save_file(flat, path)
    else:
        torch.save(groups, path)
    return path


def frame_embeddings(frames: int, dim: int = 32, tokens: int = 0, seed: int = 0) -> torch.Tensor:
    """Seeded stand-ins for CLIP embeddings: [frames, dim] or [frames, tokens, dim]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (frames, dim) if tokens == 0 else (frames, tokens, dim)
    return torch.randn(shape, generator=gen)


class TestFrameEmbeddingsNode:
    """Test-only node: a CLIP_VISION_OUTPUT with seeded per-frame embeddings (no CLIP vision model needed)."""

    CATEGORY = "tests"
    RETURN_TYPES = ("CLIP_VISION_OUTPUT", "EMBEDS")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("INT", {"default": 2, "min": 1}), "dim": ("INT", {"default": 32, "min": 1}),
                             "tokens": ("INT", {"default": 5, "min": 1}), "seed": ("INT", {"default": 0})},
                "optional": {"redraw_frame": ("INT", {"default": -1, "min": -1})}}

    def make(self, frames, dim, tokens, seed, redraw_frame=-1):
        """redraw_frame j >= 0: frame j's embeddings come from another seed, every other frame is unchanged."""
        from comfy.clip_vision import Output

        out = Output()
        out["image_embeds"] = frame_embeddings(frames, dim, 0, seed)
        out["penultimate_hidden_states"] = frame_embeddings(frames, dim, tokens, seed + 1)
        if redraw_frame >= 0:
            out["image_embeds"][redraw_frame] = frame_embeddings(1, dim, 0, seed + 1000)[0]
            out["penultimate_hidden_states"][redraw_frame] = frame_embeddings(1, dim, tokens, seed + 1001)[0]
        out["last_hidden_state"] = out["penultimate_hidden_states"]
        return (out, out["image_embeds"])
