"""PhotoMaker Fuse node cost versus plain CLIPTextEncode of the same prompt, on CPU.

    .harness/venv/bin/python bench/bench_identity.py [--quick] [--repeats 3] [--small]

Both use a full-size SDXL text encoder (CLIP-L + CLIP-G, random weights: only the shapes matter for
time). The Fuse node tokenises, encodes the text-only and the fused prompt, runs the ID encoder on
the reference photos (ViT-L/14 shapes: 24 layers, width 1024, 224 px, random weights) and the fuse
MLP. Rows: 1 and 4 reference photos. Runs are interleaved, best of `--repeats`.
Ratio = Fuse node time / CLIPTextEncode time. `--small` swaps in a 4-layer ViT for slow machines
(the table header says which size ran).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

PROMPT = "a photo of a man img, smiling, in a park, golden hour, detailed face"


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="4-layer ViT instead of the real 24")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    import comfy_env

    comfy_env.import_comfy()
    comfy_env.import_pack()
    import comfy.sd
    import comfy.supported_models
    import nodes
    import torch

    import identity_fixtures as F
    import tiny_models
    from comfyui_storydiffusion.identity.encoder import VIT_L14, PhotoMakerIDEncoder
    from comfyui_storydiffusion.identity.weights import PhotoMakerModel
    from comfyui_storydiffusion.nodes.identity import PhotoMakerFuse

    torch.manual_seed(0)
    config = comfy.supported_models.SDXL(tiny_models._file_unet_config("sdxl"))
    clip = comfy.sd.CLIP(config.clip_target({}))  # full-size CLIP-L + CLIP-G
    tiny_models.init_weights(clip.cond_stage_model, 1)
    vit = dict(VIT_L14, projection_2_dim=1280)
    if args.small:
        vit["num_hidden_layers"] = 4
    with torch.no_grad():
        encoder = PhotoMakerIDEncoder(vit).eval()  # transformers initialises the random weights
    photomaker = PhotoMakerModel(encoder=encoder, lora={}, name="random ViT-L/14")

    encode = nodes.CLIPTextEncode()
    fuse = PhotoMakerFuse()
    plain = partial(encode.encode, clip, PROMPT.replace(" img", ""))
    plain()  # warm-up (model load, tokenizer caches)
    rows = []
    for count in (1, 4):
        images = F.reference_images(count, seed=count, h=512, w=512)
        run = partial(fuse.fuse, clip, photomaker, PROMPT, "img", 0.0, images=images)
        run()
        base, ours = float("inf"), float("inf")
        for _ in range(repeats):  # interleaved
            base = min(base, best_of(plain, 1))
            ours = min(ours, best_of(run, 1))
        id_only = best_of(partial(encoder.encode_images, images), repeats)
        rows.append((count, base * 1000, ours * 1000, id_only * 1000, ours / base))

    layers = vit["num_hidden_layers"]
    print(f"SDXL prompt encoding on CPU, full-size CLIP-L + CLIP-G; ID encoder ViT ({layers} layers, width 1024, "
          f"224 px, random); best of {repeats}; torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}\n")
    print("| reference photos | CLIPTextEncode ms | PhotoMaker Fuse ms | of which ID encoder ms | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for count, base, ours, id_only, ratio in rows:
        print(f"| {count} | {base:.0f} | {ours:.0f} | {id_only:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
