"""Consistent Self-Attention cost: time per sampling step and extra peak memory, patched vs unpatched.

A full-size SD1.5-shaped UNet (320 channels, context 768, random weights) at a small latent; one
"step" is one model call on a cond+uncond batch, as a KSampler with cfg makes it. Modes:
  batch  — every panel reads all others (window 0), 2/4/8/16 panels;
  window — W=4 sliding windows, 4/8/16 panels;
  bank   — write 4 identity panels, then read the other panels of a 4- or 40-panel story one at a time.
Printed ratios: step time patched/unpatched, and patched/(FLOP estimate of the longer K/V), where the
estimate is unpatched time x (UNet FLOPs + extra attention FLOPs) / UNet FLOPs.

Peak memory on CPU: the process RSS sampled every millisecond by a thread during the calls, minus
the RSS just before them ("extra peak"; the bench re-executes itself with MALLOC_MMAP_THRESHOLD_
fixed so that freed tensors leave the RSS); on CUDA, torch.cuda.max_memory_allocated minus the
allocation before. Run: .harness/venv/bin/python bench/bench_attention.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from functools import partial

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import comfy_env

comfy_env.import_comfy()
import tiny_models


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Extra peak memory of the enclosed block (RSS sampling on CPU, allocator stats on CUDA)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = rss_bytes()
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.extra = max(self.peak, rss_bytes()) - self.base


def make_unet(device):
    import comfy.model_patcher
    import comfy.supported_models

    config = tiny_models.sd15_unet_config(width=320, context_dim=768)
    sd15 = comfy.supported_models.SD15(config)
    sd15.set_inference_dtype(torch.float16 if device.type == "cuda" else torch.float32, None)
    model = sd15.get_model({})
    tiny_models.init_weights(model.diffusion_model, 0)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def model_call(patcher, panels, latent, sigma, sample_sigmas, run=None):
    """One cond+uncond model call as the sampler makes it (rows: uncond chunk, cond chunk)."""
    from comfyui_storydiffusion.attention import comfy as csa

    model = patcher.model
    device = next(model.diffusion_model.parameters()).device
    dtype = next(model.diffusion_model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * panels, 4, latent, latent, generator=g).to(device)
    context = torch.randn(2 * panels, 77, 768, generator=g).to(device, dtype)
    options = dict(patcher.model_options.get("transformer_options", {}))
    options.update({"cond_or_uncond": [1, 0], "sigmas": torch.full((2 * panels,), sigma, device=device),
                    "sample_sigmas": sample_sigmas})
    if run is not None:
        options[csa.RUN_KEY] = run
        run.start_evaluation(sigma)  # what the sampler's PREDICT_NOISE wrapper does once per evaluation
    with torch.inference_mode():
        return model.apply_model(x, torch.full((2 * panels,), sigma, device=device), c_crossattn=context,
                                 transformer_options=options)


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def unet_flops(patcher, panels, latent, sigma, sigmas):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model_call(patcher, panels, latent, sigma, sigmas)
    return counter.get_total_flops()


def extra_attention_flops(config, panels, latent, window, bank_panels=0):
    """QK^T and AV FLOPs (4 * Tq * Tk * dim per row) added by the longer K/V over the patched layers, 2 chunks."""
    from comfyui_storydiffusion.attention import core

    extra = 0
    for kind, block, index in config.layers:
        level = 3 - block // 3  # SD1.5 output block b sits at level 3 - b // 3
        tokens = (latent // 2 ** level) ** 2
        dim = 320 * [1, 2, 4, 4][level]
        rate = config.rate_high_res if (kind, block, index) in config.high_res_layers else config.rate
        n = core.sampled_count(tokens, rate)
        for i in range(panels):
            if bank_panels:
                added = bank_panels * n
            elif window and window < panels:
                inside = sum(1 for s in range(panels - window + 1) if s <= i < s + window)
                added = inside * (tokens + (window - 1) * n) - tokens  # one attention per window holding i
            else:
                added = (panels - 1) * n
            extra += 2 * 4 * tokens * added * dim
    return extra


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and not torch.cuda.is_available():
        # a fixed mmap threshold makes glibc return freed tensors to the OS, so RSS follows live memory
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small latent, fewer panel counts, one repeat")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32, quick 16)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comfy_env.import_pack()
    from comfyui_storydiffusion.attention import comfy as csa
    from comfyui_storydiffusion.attention.bank import IdentityBank
    from comfyui_storydiffusion.story.model import Character, Panel, Story

    latent = args.latent or (16 if args.quick else 32)
    counts = [2, 4] if args.quick else [2, 4, 8, 16]
    repeats = 1 if args.quick else 2
    unet = make_unet(device)
    unet.model.diffusion_model.to(device)
    sampling = unet.get_model_object("model_sampling")
    sigmas = [float(s) for s in torch.linspace(float(sampling.sigma_max), 0.0, 11)]
    sigma = sigmas[3]

    def patched(window=0, story=None):
        return csa.patch_model(unet, rate=0.5, rate_high_res=0.5, window=window,
                                       layer_choice="output blocks (official)", custom_layers="", start_percent=0.0,
                                       end_percent=1.0, official_schedule=False, seed=0, story=story)

    rows = []
    print(f"device {device}, latent {latent}x{latent} ({latent * 8}px), SD1.5-shaped UNet 320ch, cond+uncond per step")
    for mode, window, panel_counts in (("batch", 0, counts), ("window W=4", 4, [c for c in counts if c >= 4])):
        for panels in panel_counts:
            model = patched(window)
            config = model.model_options["transformer_options"][csa.CONFIG_KEY]
            run = csa.start_run(config, panels, sigmas)
            t_plain = timed(partial(model_call, unet, panels, latent, sigma, sigmas), repeats)
            t_csa = timed(partial(model_call, model, panels, latent, sigma, sigmas, run), repeats)
            with PeakMemory(device) as m_plain:
                model_call(unet, panels, latent, sigma, sigmas)
            with PeakMemory(device) as m_csa:
                model_call(model, panels, latent, sigma, sigmas, run)
            base = unet_flops(unet, panels, latent, sigma, sigmas)
            extra = extra_attention_flops(config, panels, latent, window)
            estimate = t_plain * (base + extra) / base
            rows.append((mode, panels, t_plain, t_csa, t_csa / t_plain, t_csa / estimate,
                         m_plain.extra / 2**20, m_csa.extra / 2**20, (m_csa.extra - m_plain.extra) / 2**20))
            print(f"  measured {mode}, {panels} panels", file=sys.stderr, flush=True)

    # bank: write 4 identity panels, then read every other story panel alone
    for story_len in ([4, 8] if args.quick else [4, 40]):
        panels = tuple(Panel(f"p{i}", "", ("Hero",)) for i in range(story_len + 4))
        story = Story((Character("Hero", "a hero"),), panels, {"Hero": (0, 1, 2, 3)})
        model = patched(story=story)
        bank = IdentityBank()
        writer = csa.with_bank(model, csa.MODE_WRITE, bank)
        config_w = writer.model_options["transformer_options"][csa.CONFIG_KEY]
        with PeakMemory(device) as mem:
            run = csa.start_run(config_w, 4, sigmas)
            for s in sigmas[:2]:
                model_call(writer, 4, latent, s, sigmas, run)
            run.writer.commit()
            start = time.perf_counter()
            for first in range(4, 4 + story_len):
                reader = csa.with_bank(model, csa.MODE_READ, bank, first_panel=first)
                config_r = reader.model_options["transformer_options"][csa.CONFIG_KEY]
                run = csa.start_run(config_r, 1, sigmas)
                model_call(reader, 1, latent, sigmas[1], sigmas, run)
            per_panel = (time.perf_counter() - start) / story_len
        rows.append((f"bank, story {story_len}", 1, float("nan"), per_panel, float("nan"), float("nan"),
                     float("nan"), mem.extra / 2**20, float("nan")))

    print(f"{'mode':<16}{'panels':>7}{'plain s':>9}{'CSA s':>9}{'CSA/plain':>10}{'CSA/FLOPest':>12}"
          f"{'plain MiB':>10}{'CSA MiB':>9}{'extra MiB':>10}")
    for r in rows:
        print(f"{r[0]:<16}{r[1]:>7}{r[2]:>9.3f}{r[3]:>9.3f}{r[4]:>10.2f}{r[5]:>12.2f}{r[6]:>10.0f}{r[7]:>9.0f}{r[8]:>10.0f}")
    window_extra = [r[8] for r in rows if r[0].startswith("window")]
    if len(window_extra) >= 2 and window_extra[0] > 0:
        print(f"window mode extra peak, largest/smallest panel count: {window_extra[-1] / window_extra[0]:.2f}")
    bank_rows = [r for r in rows if r[0].startswith("bank")]
    if len(bank_rows) == 2 and bank_rows[0][7] > 0:
        print(f"bank mode peak, long/short story: {bank_rows[1][7] / bank_rows[0][7]:.2f}")


if __name__ == "__main__":
    main()
