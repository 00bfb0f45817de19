"""Per-frame IP-Adapter cost: one UNet forward with the per-frame attn2 patch versus without it.

    .harness/venv/bin/python bench/bench_ipadapter.py [--quick] [--repeats 5]

Tiny SD1.5-layout UNet (tests/tiny_models.make_model("sd15"): width 32, 16 cross-attentions) on a
32x32 latent, CFG-shaped batch (cond + uncond rows for every frame, as KSampler sends it), for 4 and
16 frames, with a plain (4 tokens) and a plus (16 tokens, resampler) adapter. The image projection
runs once when the patch is applied, so it is not in the per-step cost measured here. Unpatched and
patched forwards are interleaved and the best of `--repeats` is kept, so both see the same load.
Ratio = patched / unpatched time per forward. Tiny widths exaggerate the relative cost of the extra
attention compared with a real 320..1280-wide UNet.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def forward_seconds(model, transformer_options, x, sigma, context, repeats):
    """Best-of-`repeats` wall time of one BaseModel.apply_model call (what KSampler calls per step)."""
    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options)
            best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = a 256 px image)")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats

    import comfy_env

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import torch

    import ipadapter_fixtures as fx
    import tiny_models
    from comfyui_storydiffusion.ipadapter import comfy_adapter

    torch.manual_seed(0)
    model = tiny_models.make_model("sd15")
    adapters = {"plain": (fx.tiny_ipadapter("sd15", "plain"), 0), "plus": (fx.tiny_ipadapter("sd15", "plus"), 5)}
    rows = []
    for frames in (4, 16):
        batch = 2 * frames  # CFG: uncond rows then cond rows, one per frame
        x = torch.randn(batch, 4, args.latent, args.latent)
        sigma = torch.full((batch,), 7.0)
        context = torch.randn(batch, 77, fx.TINY_SD15_CONTEXT)
        plain_options = {"cond_or_uncond": [1, 0], "sigmas": sigma}
        for kind, (groups, tokens) in adapters.items():
            embeds = fx.frame_embeddings(frames, 32, tokens=tokens, seed=1)
            patched = comfy_adapter.apply_per_frame_ipadapter(model, groups, embeds, None, 1.0, 0.0, 1.0)
            patched_options = {**patched.model_options["transformer_options"], **plain_options}
            forward_seconds(model, plain_options, x, sigma, context, 1)  # warm-up
            forward_seconds(patched, patched_options, x, sigma, context, 1)
            base, ours = float("inf"), float("inf")
            for _ in range(repeats):  # interleaved
                base = min(base, forward_seconds(model, plain_options, x, sigma, context, 1))
                ours = min(ours, forward_seconds(patched, patched_options, x, sigma, context, 1))
            rows.append((frames, kind, base * 1000, ours * 1000, ours / base))

    print(f"UNet forward, tiny SD1.5 (16 cross-attentions), latent {args.latent}x{args.latent}, CFG batch = 2 x frames, "
          f"best of {repeats}, torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}\n")
    print("| frames | adapter | unpatched ms | per-frame IP-Adapter ms | ratio |")
    print("|---:|---|---:|---:|---:|")
    for frames, kind, base, ours, ratio in rows:
        print(f"| {frames} | {kind} | {base:.1f} | {ours:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
