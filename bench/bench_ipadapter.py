"""Per-frame IP-Adapter cost: one UNet forward with the per-frame attn2 patch versus without it.

    .harness/venv/bin/python bench/bench_ipadapter.py [--quick] [--repeats 3] [--latent 64] [--frames 4 16]

Real geometry: a full-size SD1.5-shaped UNet (320..1280 channels, 16 cross-attentions, random weights; the same
model as bench_attention.py) and IP-Adapters at the public files' widths: plain ip-adapter_sd15 (CLIP-H image
embeds 1024 -> 4 tokens of 768) and ip-adapter-plus_sd15 (CLIP-H hidden states 257 x 1280 -> resampler 768 wide,
4 layers -> 16 tokens). CFG-shaped batch (cond + uncond rows for every frame, as KSampler sends it). The image
projection runs once when the patch is applied, so it is not in the per-step cost measured here; the patch is
moved to the model's device and dtype first, as ComfyUI does when it loads the model. Unpatched and patched
forwards are interleaved and the best of `--repeats` is kept, so both see the same load. Ratio = patched /
unpatched time per forward. CUDA (fp16) when there is one; on a CPU the defaults are smaller (latent 32, 2 and 4
frames) so that the run ends in minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

# the public SD1.5 adapters' widths (ViT-H/14 image encoder; plus: its penultimate hidden states)
ADAPTERS = {"plain": {"kind": "plain", "clip_dim": 1024, "num_tokens": 4},
            "plus": {"kind": "plus", "clip_dim": 1280, "num_tokens": 16, "resampler_dim": 768,
                     "resampler_inner": 768, "depth": 4}}
PLUS_EMBED_TOKENS = 257  # CLIP-H at 224 px: 256 patches + the class token


def forward_seconds(patcher, options, x, sigma, context):
    """Wall time of one BaseModel.apply_model call (what KSampler calls per step)."""
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one frame count, two repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=None, help="latent side (64 = a 512 px image; CPU default 32)")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts (CPU default 2 4; CUDA 4 16)")
    args = parser.parse_args()

    import comfy_env

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import torch

    import bench_attention
    import ipadapter_fixtures as fx
    from comfyui_storydiffusion.ipadapter import comfy_adapter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    latent = args.latent or (64 if cuda else 32)
    frame_counts = args.frames or ([4, 16] if cuda else [2, 4])
    if args.quick:
        frame_counts = frame_counts[:1]
    repeats = 2 if args.quick else args.repeats

    model = bench_attention.make_unet(device)
    model.model.diffusion_model.to(device)
    dtype = next(model.model.diffusion_model.parameters()).dtype
    adapters = {name: fx.ipadapter_state_dict(fx.SD15_WIDTHS, 768, seed=1, **spec) for name, spec in ADAPTERS.items()}
    rows = []
    for frames in frame_counts:
        batch = 2 * frames  # CFG: uncond rows then cond rows, one per frame
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
        sigma = torch.full((batch,), 7.0, device=device)
        context = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
        plain_options = {"cond_or_uncond": [1, 0], "sigmas": sigma}
        for name, groups in adapters.items():
            spec = ADAPTERS[name]
            tokens = PLUS_EMBED_TOKENS if spec["kind"] == "plus" else 0
            embeds = fx.frame_embeddings(frames, spec["clip_dim"], tokens=tokens, seed=2)
            negative = torch.zeros_like(embeds[:1])  # the plus adapters' black-image encoding needs a CLIP vision model
            patched = comfy_adapter.apply_per_frame_ipadapter(model, groups, embeds, negative, 1.0, 0.0, 1.0)
            patched.model_patches_to(device)
            patched.model_patches_to(dtype)
            patched_options = {**patched.model_options["transformer_options"], **plain_options}
            forward_seconds(model, plain_options, x, sigma, context)  # warm-up
            forward_seconds(patched, patched_options, x, sigma, context)
            base, ours = float("inf"), float("inf")
            for _ in range(repeats):  # interleaved
                base = min(base, forward_seconds(model, plain_options, x, sigma, context))
                ours = min(ours, forward_seconds(patched, patched_options, x, sigma, context))
            rows.append((frames, name, base * 1000, ours * 1000, ours / base))

    print(f"UNet forward, full-size SD1.5 shape (16 cross-attentions, random weights), {device} {dtype}, latent "
          f"{latent}x{latent} ({latent * 8} px), CFG batch = 2 x frames, best of {repeats}, torch threads "
          f"{torch.get_num_threads()}, cpu count {os.cpu_count()}\n")
    print("| frames | adapter | unpatched ms | per-frame IP-Adapter ms | ratio |")
    print("|---:|---|---:|---:|---:|")
    for frames, name, base, ours, ratio in rows:
        print(f"| {frames} | {name} | {base:.1f} | {ours:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
