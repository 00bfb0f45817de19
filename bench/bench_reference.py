"""Identity Bank From Images against Identity Bank Write: what writing a bank from k reference images costs next to
writing it from k sampled identity panels, at SD1.5 512 px with a full-width random SD1.5-shaped UNet (320 channels,
CLIP-L context), cond + uncond, euler.

Both runs evaluate the model once per step on a batch of k latents through the same CSA write path, so memory should
match: the figure is the ratio of the extra peak memory (RSS on the CPU, allocator peak on CUDA) of the reference
write to the identity write, and of their wall times, measured in one run (rounds alternate the order); the banks
must hold the same bytes. Attention runs through torch's SDPA: ComfyUI's CPU default (sub-quadratic attention) sizes
its chunks from the free memory of the moment, which on a shared machine would be measured instead of the writes.

    .harness/venv/bin/python bench/bench_reference.py [--latent 64] [--images 2] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_attention import PeakMemory, make_unet  # bench_attention puts ComfyUI on the import path


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and not torch.cuda.is_available():
        # a fixed mmap threshold makes glibc return freed tensors to the OS, so RSS follows live memory
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--images", type=int, default=2, help="reference images = identity panels")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    import comfy.sample

    import comfy_env

    comfy_env.import_pack()
    from comfyui_storydiffusion.attention import comfy as csa
    from comfyui_storydiffusion.attention.bank import IdentityBank
    from comfyui_storydiffusion.attention.comfy.reference import write_bank_from_latents
    from comfyui_storydiffusion.story.model import Character, Panel, Story

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k, side = args.images, args.latent
    unet = make_unet(device)
    story = Story(characters=(Character("A", "a"),), panels=tuple(Panel(f"p{i}", "", ("A",)) for i in range(k)),
                  identity_panels={"A": tuple(range(k))})
    patched = csa.patch_model(unet, rate=0.5, rate_high_res=0.5, window=0, layer_choice="output blocks (official)",
                              custom_layers="", start_percent=0.0, end_percent=1.0, official_schedule=False, seed=0,
                              story=story)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(k, 77, 768, generator=g), {}]]
    negative = [[torch.randn(k, 77, 768, generator=g), {}]]
    latent = torch.zeros(k, 4, side, side)
    references = torch.randn(k, 4, side, side, generator=g)
    noise = comfy.sample.prepare_noise(latent, 5)

    def identity(bank):
        comfy.sample.sample(csa.with_bank(patched, csa.MODE_WRITE, bank), noise, args.steps, 4.0, "euler", "normal",
                            positive, negative, latent, disable_pbar=True, seed=5)

    def reference(bank):
        write_bank_from_latents(patched, references, (("A",),) * k, positive, negative, seed=5, steps=args.steps,
                                cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0, bank=bank)

    from comfy.ldm.modules import attention

    attention.optimized_attention = attention.attention_pytorch
    attention.optimized_attention_masked = attention.attention_pytorch
    identity(IdentityBank())  # warm-up: the model's first call allocates its buffers
    results = {"identity": [], "reference": []}
    for order in ((("identity", identity), ("reference", reference)), (("reference", reference), ("identity", identity))):
        for name, run in order:
            bank = IdentityBank(keep="memory")
            start = time.perf_counter()
            with PeakMemory(device) as peak:
                run(bank)
            results[name].append((peak.extra, time.perf_counter() - start, bank.nbytes()))
    results = {name: tuple(max(r[i] for r in runs) if i != 1 else min(r[i] for r in runs) for i in range(3))
               for name, runs in results.items()}  # peak memory: the larger of two rounds; time: the faster
    (m_id, t_id, b_id), (m_ref, t_ref, b_ref) = results["identity"], results["reference"]
    print(f"device {device}, SD1.5-shaped UNet 320ch, {side * 8} px, {k} images, {args.steps} steps, cfg 4")
    print("| write | extra peak MiB | time s | bank MiB |")
    print("|---|---:|---:|---:|")
    for name, (mem, seconds, nbytes) in results.items():
        print(f"| {name} | {mem / 2**20:.0f} | {seconds:.1f} | {nbytes / 2**20:.1f} |")
    print(f"reference / identity: memory {m_ref / m_id:.2f}, time {t_ref / t_id:.2f}, bank bytes {b_ref / b_id:.2f}")
    print(json.dumps({"reference_vs_identity_write_mem": round(m_ref / m_id, 3),
                      "reference_vs_identity_write_time": round(t_ref / t_id, 3),
                      "reference_vs_identity_bank_bytes": round(b_ref / b_id, 3), "pixels": side * 8, "images": k}))


if __name__ == "__main__":
    main()
