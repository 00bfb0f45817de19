"""Consistent Self-Attention in a full-size Flux.1 dev model: time per sampling step and extra peak memory.

    python bench/bench_flux_model.py [--panels 2,4,8] [--small]        (CUDA; --small: a 2+2-block model for a CPU smoke run)

The real Flux.1 dev layout (19 double + 38 single blocks, 3072 wide, 24 heads, T5 context 4096, CLIP pooled 768,
guidance embedding; 11.9 B parameters) with random bf16 weights, at 1024 px (a 128x128 latent: 4096 image tokens)
with 512 text tokens, one chunk per call (Flux dev samples at cfg 1). One "step" is one model call through
BaseModel.apply_model with the pack's wrappers, as the sampler makes it. Modes: plain; CSA on the default blocks
(double 10-18 + single 0-37) at rate 0.5, whole batch; CSA with window 4; each CSA mode once with one query panel
per attention call (G=1, attention memory budget 0) and once grouped (--budget, default the node's automatic
budget: a share of the free GPU memory at the run's first call, resolved budget printed).

Printed per mode and panel count: step seconds (best of --repeats after a warm-up), CSA / plain, CSA / FLOP
estimate (plain time x (model FLOPs + the extra attention FLOPs of the longer K/V) / model FLOPs; model FLOPs
counted by torch's FlopCounterMode on the plain call), and the extra peak memory of the call above the weights
(torch.cuda.max_memory_allocated after reset). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import comfy_env

comfy_env.import_comfy()

TEXT, CONTEXT, POOLED = 512, 4096, 768


def flux_dev_config(small: bool) -> dict:
    """Flux.1 dev's published layout (ComfyUI's detection fixes the same values); --small keeps the widths
    and cuts the blocks to 2 + 2 for a CPU smoke run."""
    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED,
              "context_in_dim": CONTEXT, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
              "depth": 2 if small else 19, "depth_single_blocks": 2 if small else 38, "axes_dim": [16, 56, 56],
              "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    import tiny_models

    config.update(tiny_models._newer_flux_params(txt_ids_dims=[]))
    return config


def make_flux(device, dtype, small: bool):
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(flux_dev_config(small))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith(("scale", "norm.weight")) else 0.0)
            else:
                std = 0.02 if "embed" in name else 0.7 / math.sqrt(p[0].numel())
                p.normal_(0.0, std, generator=gen)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def model_call(patcher, panels, latent, sigma, sample_sigmas, run=None):
    """One model call of `panels` rows (one chunk), with the patcher's wrappers and transformer options."""
    import comfy.patcher_extension

    from comfyui_storydiffusion.attention import comfy as csa

    model = patcher.model
    device = next(model.diffusion_model.parameters()).device
    dtype = next(model.diffusion_model.parameters()).dtype
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(panels, 16, latent, latent, generator=g, device=device)
    context = torch.randn(panels, TEXT, CONTEXT, generator=g, device=device).to(dtype)
    pooled = torch.randn(panels, POOLED, generator=g, device=device).to(dtype)
    options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    options.update({"cond_or_uncond": [0], "sigmas": torch.full((panels,), sigma, device=device),
                    "sample_sigmas": sample_sigmas})
    if run is not None:
        options[csa.RUN_KEY] = run
        run.start_evaluation(sigma)  # what the sampler's PREDICT_NOISE wrapper does once per evaluation
    with torch.inference_mode():
        return model.apply_model(x, torch.full((panels,), sigma, device=device), c_crossattn=context, y=pooled,
                                 guidance=torch.full((panels,), 3.5, device=device), transformer_options=options)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_extra(fn, device) -> float:
    """MiB allocated at the peak of the call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def extra_attention_flops(config, panels, image, window) -> float:
    """QK^T and AV FLOPs (4 x queries x added keys x width) of the longer K/V over the selected blocks."""
    from comfyui_storydiffusion.attention import core

    n = core.sampled_count(image, config.rate)
    tokens = TEXT + image
    extra = 0.0
    for _ in config.layers:
        for i in range(panels):
            if window and window < panels:
                inside = sum(1 for s in range(panels - window + 1) if s <= i < s + window)
                added = inside * (tokens + (window - 1) * n) - tokens
            else:
                added = (panels - 1) * n
            extra += 4 * tokens * added * 3072
    return extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--panels", default="2,4,8")  # flux_model_grouped_step_vs_flops: the grouped rows' worst
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="2 double + 2 single blocks, 256 px (CPU smoke run)")
    parser.add_argument("--budget", type=int, default=-1,
                        help="attention memory budget (MiB) of the grouped rows; -1 (default): the node's automatic "
                             "budget (a share of the free GPU memory at the run's first call; 0 on the CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        parser.error("the full-size model (11.9 B parameters) needs a CUDA device; on the CPU use --small")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent = 32 if args.small else 128
    image = (latent // 2) ** 2
    comfy_env.import_pack()
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_storydiffusion.attention import comfy as csa

    start = time.perf_counter()
    flux = make_flux(device, dtype, args.small)
    params = sum(p.numel() for p in flux.model.diffusion_model.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"Flux.1 dev layout {params / 1e9:.2f} B parameters (random), {latent * 8} px: {image} image + {TEXT} text "
          f"tokens, one chunk; built in {time.perf_counter() - start:.0f} s", flush=True)
    sigmas = [float(s) for s in torch.linspace(1.0, 0.0, 21)]
    sigma = sigmas[5]

    def patched(window, budget):
        return csa.patch_model(flux, rate=0.5, rate_high_res=0.5, window=window,
                                       layer_choice="output blocks (official)", custom_layers="", start_percent=0.0,
                                       end_percent=1.0, official_schedule=False, seed=0, memory_budget_mib=budget)

    rows, summary = [], {}
    for panels in [int(p) for p in args.panels.split(",")]:
        plain_call = partial(model_call, flux, panels, latent, sigma, sigmas)
        t_plain = timed(plain_call, device, args.repeats)
        m_plain = peak_extra(plain_call, device)
        counter = FlopCounterMode(display=False)
        with counter:
            model_call(flux, panels, latent, sigma, sigmas)
        base = counter.get_total_flops()
        for mode, window, budget in (("whole batch, G=1", 0, 0), ("whole batch, grouped", 0, args.budget),
                                     ("window 4, G=1", 4, 0), ("window 4, grouped", 4, args.budget)):
            if window and panels <= window:
                continue
            model = patched(window, budget)
            config = model.model_options["transformer_options"][csa.CONFIG_KEY]
            run = csa.start_run(config, panels, sigmas)
            difference = (model_call(model, panels, latent, sigma, sigmas, run).float()
                          - model_call(flux, panels, latent, sigma, sigmas).float()).abs().max()
            if not float(difference) > 0:  # the override must have run, or the figures measure nothing
                raise RuntimeError("Consistent Self-Attention did not change the model call")
            csa_call = partial(model_call, model, panels, latent, sigma, sigmas, run)
            t_csa = timed(csa_call, device, args.repeats)
            m_csa = peak_extra(csa_call, device)
            extra = extra_attention_flops(config, panels, image, window)
            estimate = t_plain * (base + extra) / base
            budget_mib = max(run.budgets.values(), default=0) / 2**20  # what the run resolved at its first call
            rows.append((mode, panels, t_plain, t_csa, t_csa / t_plain, t_csa / estimate, m_plain, m_csa,
                         m_csa / m_plain if not math.isnan(m_plain) and m_plain > 0 else float("nan"), len(config.layers),
                         budget_mib))
            print(f"  measured {mode}, {panels} panels", file=sys.stderr, flush=True)

    print()
    print("| mode | panels | budget MiB | plain s | CSA s | CSA / plain | CSA / FLOP estimate | plain extra MiB | "
          "CSA extra MiB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[10]:.0f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0f} | "
              f"{r[7]:.0f} | {r[8]:.2f} |")
    summary = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "params_b": round(params / 1e9, 2),
               "pixels": latent * 8, "blocks_with_csa": rows[0][9] if rows else 0,
               "flux_model_step_vs_plain": max((round(r[4], 3) for r in rows), default=None),
               "flux_model_step_vs_flops": max((round(r[5], 3) for r in rows), default=None),
               "flux_model_grouped_step_vs_flops": max((round(r[5], 3) for r in rows if "grouped" in r[0]), default=None),
               "flux_model_mem_vs_plain": max((round(r[8], 3) for r in rows if r[8] == r[8]), default=None),
               "rows": [dict(zip(("mode", "panels", "plain_s", "csa_s", "csa_vs_plain", "csa_vs_flops",
                                  "plain_extra_mib", "csa_extra_mib", "mem_ratio", "budget_mib"),
                                 [r[0], r[1]] + [round(v, 4) for v in r[2:9]] + [round(r[10], 1)])) for r in rows]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
