"""Tiny PhotoMaker v1 files with the public key names (written here from the published layout, not
from the pack's modules, so a renamed parameter in the pack fails the tests).

Tiny sizes: ViT width 64 (1 head of 64, as CLIP's head width), 2 layers, patch 32 at 224 px,
projections 64 + 48 = 112 = the tiny SDXL CLIP's cond width (tests/tiny_models.make_clip("sdxl")).
"""
from __future__ import annotations

import torch

TINY = {"hidden": 64, "layers": 2, "intermediate": 128, "patch": 32, "image": 224, "proj": 64, "proj2": 48}


def id_encoder_shapes(hidden=64, layers=2, intermediate=128, patch=32, image=224, proj=64, proj2=48) -> dict:
    """Every key of the public `id_encoder` section with its shape (ViT-L/14: 1024, 24, 4096, 14, 224, 768, 1280)."""
    shapes = {
        "vision_model.embeddings.class_embedding": (hidden,),
        "vision_model.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        "vision_model.embeddings.position_embedding.weight": ((image // patch) ** 2 + 1, hidden),
        "vision_model.pre_layrnorm.weight": (hidden,), "vision_model.pre_layrnorm.bias": (hidden,),
        "vision_model.post_layernorm.weight": (hidden,), "vision_model.post_layernorm.bias": (hidden,),
        "visual_projection.weight": (proj, hidden),
        "visual_projection_2.weight": (proj2, hidden),
    }
    for i in range(layers):
        pre = f"vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[pre + f"self_attn.{name}.weight"] = (hidden, hidden)
            shapes[pre + f"self_attn.{name}.bias"] = (hidden,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[pre + f"{norm}.weight"] = (hidden,)
            shapes[pre + f"{norm}.bias"] = (hidden,)
        shapes[pre + "mlp.fc1.weight"] = (intermediate, hidden)
        shapes[pre + "mlp.fc1.bias"] = (intermediate,)
        shapes[pre + "mlp.fc2.weight"] = (hidden, intermediate)
        shapes[pre + "mlp.fc2.bias"] = (hidden,)
    d = proj + proj2
    for mlp, d_in in (("mlp1", 2 * d), ("mlp2", d)):
        shapes[f"fuse_module.{mlp}.layernorm.weight"] = (d_in,)
        shapes[f"fuse_module.{mlp}.layernorm.bias"] = (d_in,)
        shapes[f"fuse_module.{mlp}.fc1.weight"] = (d, d_in)
        shapes[f"fuse_module.{mlp}.fc1.bias"] = (d,)
        shapes[f"fuse_module.{mlp}.fc2.weight"] = (d, d)
        shapes[f"fuse_module.{mlp}.fc2.bias"] = (d,)
    shapes["fuse_module.layer_norm.weight"] = (d,)
    shapes["fuse_module.layer_norm.bias"] = (d,)
    return shapes


def random_tensors(shapes: dict, seed: int) -> dict:
    """Seeded values: norms near 1, everything else small, so activations stay finite and varied."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] if len(shape) > 1 else 1
            scale = 0.02 if len(shape) == 1 or "embedding" in key else 1.0 / fan_in ** 0.5
            out[key] = scale * torch.randn(shape, generator=gen)
    return out


def tiny_sdxl_lora_shapes(rank: int = 4, width: int = 32, context: int = 112, depth: int = 2) -> dict:
    """`lora_weights` in the public format for the attention layers of tiny_models.make_model("sdxl")."""
    blocks = [("down_blocks.1.attentions.{}", 2, 2 * width, 1), ("down_blocks.2.attentions.{}", 2, 4 * width, depth),
              ("mid_block.attentions.{}", 1, 4 * width, depth), ("up_blocks.0.attentions.{}", 3, 4 * width, depth),
              ("up_blocks.1.attentions.{}", 3, 2 * width, 1)]
    shapes = {}
    for pattern, count, channels, blocks_deep in blocks:
        for a in range(count):
            for j in range(blocks_deep):
                for attn in ("attn1", "attn2"):
                    base = f"unet.{pattern.format(a)}.transformer_blocks.{j}.{attn}.processor"
                    for proj in ("to_q", "to_k", "to_v", "to_out"):
                        d_in = context if attn == "attn2" and proj in ("to_k", "to_v") else channels
                        shapes[f"{base}.{proj}_lora.down.weight"] = (rank, d_in)
                        shapes[f"{base}.{proj}_lora.up.weight"] = (channels, rank)
    return shapes


def photomaker_state_dict(seed: int = 0, lora: bool = True, **sizes) -> dict:
    """{'id_encoder': ..., 'lora_weights': ...} as in photomaker-v1.bin (tiny sizes by default)."""
    config = {**TINY, **sizes}
    sd = {"id_encoder": random_tensors(id_encoder_shapes(**config), seed)}
    sd["lora_weights"] = random_tensors(tiny_sdxl_lora_shapes(), seed + 1) if lora else {}
    return sd


def write_photomaker(path: str, sd: dict) -> str:
    """Write in the format the extension names: .bin (torch.save of the nested dict) or flat .safetensors."""
    if path.endswith(".safetensors"):
        import safetensors.torch

        flat = {f"{section}.{k}": v.contiguous() for section, part in sd.items() for k, v in part.items()}
        safetensors.torch.save_file(flat, path)
    else:
        torch.save(sd, path)
    return path


def reference_images(n: int = 2, seed: int = 0, h: int = 240, w: int = 200) -> torch.Tensor:
    """A ComfyUI IMAGE batch [n, h, w, 3] in 0..1 (not square, so the resize + crop path runs)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, h, w, 3), generator=gen)
