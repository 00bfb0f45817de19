"""DiT part of bench/bench_memory.py: Consistent Self-Attention on ONE joint-attention call of Flux.1 at 1024 px.

Run through bench_memory.py (one JSON last line for every family; keys of this part start with "flux_"):

    .harness/venv/bin/python bench/bench_memory.py [--device cpu|cuda] [--dit-panels 2,4] [--dit-chunks 1,2] [--no-dit]

attention/dit.py's joint_consistent_attention (plain torch, imported from the repository as a bare package,
no ComfyUI) with its reference kernel sdpa_joint (torch scaled_dot_product_attention, output [rows, N, H*D]).

Geometry — Flux.1 dev at 1024 x 1024 px: 512 text tokens (T5 length) + 4096 image tokens (64 x 64 patches of
the 128 x 128 latent), 24 heads x 128 = 3072 channels; q/k/v [chunks*B, 24, 4608, 128], random; rate 0.5
(2048 sampled image tokens per panel), whole batch, every panel shares with every other one. Flux is
cfg-distilled: 1 chunk; 2 chunks (true CFG) on CUDA by default. fp32 on CPU, fp16 on CUDA. Every block of
Flux (double or single stream) attends over the same 4608 tokens with the same heads, so one call stands for
any selected block. --quick: 256 text + 1024 image tokens (512 px).

Memory and time are measured exactly as for the UNet geometries (see bench_memory.py): extra peak memory of
the call (CPU: a fresh subprocess per method with MALLOC_MMAP_THRESHOLD_ and /proc/self/clear_refs; CUDA:
max_memory_allocated) minus its output, against a one-panel loop written here the official-code way (per
panel torch.cat of its own k/v and the other panels' sampled image tokens, then attention on that panel);
time = CSA call / (plain joint attention on the same q/k/v x L_i / N), L_i = N + (B-1)*n keys per panel,
plain and CSA calls alternating, median.

Bank bytes: the DiT identity bank stores the sampled post-RoPE keys and values of the image tokens of each
identity image: n_sampled x 2 (k, v) x 3072 channels x bytes per value for each selected block and each stored
chunk (Flux: 1). Reported per block and for DiTFamily.default_blocks of Flux.1 (attention/comfy/dit_families.py:
double 10-18 and single 0-37, 47 blocks), fp16 and fp8; and per 30-step run.
"""
from __future__ import annotations

import importlib
import statistics
import sys
from types import SimpleNamespace

import torch

FLUX = {"name": "flux1-1024", "text": 512, "image": 4096, "heads": 24, "dim": 128, "double": 19, "single": 38}
FLUX_QUICK = dict(FLUX, name="flux1-512 (quick)", text=256, image=1024)
RATE = 0.5
STEPS = 30


def load(pack: str):
    core = importlib.import_module(f"{pack}.attention.core")
    dit = importlib.import_module(f"{pack}.attention.dit")
    return core, dit


def loop_joint(q, k, v, chunks, text, sampled, attention):
    """The reference: one panel at a time, as the official StoryDiffusion code does for a UNet: for panel i,
    torch.cat of its own k (v) and the other panels' sampled image tokens, then joint attention on its rows."""
    total, heads, tokens, dim = q.shape
    panels = total // chunks
    q5, k5, v5 = (t.reshape(chunks, panels, heads, tokens, dim) for t in (q, k, v))
    positions = [text + sampled[j].to(k.device) for j in range(panels)]
    out = None
    for i in range(panels):
        others = [j for j in range(panels) if j != i]
        kk = torch.cat([k5[:, i]] + [k5[:, j][:, :, positions[j]] for j in others], dim=2)
        vv = torch.cat([v5[:, i]] + [v5[:, j][:, :, positions[j]] for j in others], dim=2)
        result = attention(q5[:, i], kk, vv, None)
        if out is None:
            out = result.new_empty((chunks, panels) + tuple(result.shape[1:]))
        out[:, i] = result
        del kk, vv, result
    return out.reshape((total,) + tuple(out.shape[2:]))


def measure(spec: dict, pack: str, bench) -> dict:
    """One (geometry, chunks, panels, method) measurement; bench is the bench_memory module (peak_call, timed,
    sync). Methods as in bench_memory.measure: "ours", "time", "loop"."""
    core, dit = load(pack)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    text, image, heads, dim = spec["text"], spec["image"], spec["heads"], spec["dim"]
    chunks, panels = spec["chunks"], spec["panels"]
    tokens = text + image
    g = torch.Generator(device=device).manual_seed(panels)
    q, k, v = (torch.randn(chunks * panels, heads, tokens, dim, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    sampled = core.sample_panel_tokens(image, RATE, seed=0, step=5, layer=40, panels=range(panels))
    share = torch.ones(panels, panels, dtype=torch.bool)
    keys = tokens + (panels - 1) * sampled.shape[1]
    attention = dit.sdpa_joint
    out_bytes = q.numel() * q.element_size()

    def plain():
        return attention(q, k, v, None)

    panel_bytes = core.panel_call_bytes(chunks, tokens, keys, heads * dim, q.element_size(), index_rows=chunks * heads)
    budget = bench.memory_budget(spec, device, core, panels, panel_bytes)

    def ours():
        return dit.joint_consistent_attention(q, k, v, chunks=chunks, text_tokens=text, image_tokens=image,
                                              share=share, sampled=sampled, attention=attention, budget=budget)

    def loop():
        return loop_joint(q, k, v, chunks, text, sampled, attention)

    # warm-up of the kernels and of the measured method on a small slice (see bench_memory.measure)
    small_image = min(256, image)
    sq, sk, sv = (t[:chunks * 2, :, :text + small_image] for t in (q, k, v))
    attention(sq, sk, sv, None)
    if spec["method"] == "loop":
        loop_joint(sq, sk, sv, chunks, text, sampled[:2] % small_image, attention)
    else:
        dit.joint_consistent_attention(sq, sk, sv, chunks=chunks, text_tokens=text, image_tokens=small_image,
                                       share=share[:2, :2], sampled=sampled[:2] % small_image, attention=attention)
    bench.sync(device)
    result = {"keys": keys, "budget_bytes": budget, "group": core.panels_per_call(budget, panel_bytes, panels)}
    if spec["method"] == "loop":
        out, extra, seconds = bench.peak_call(loop, device)
        result.update(extra_bytes=extra - out_bytes, seconds=seconds)
        return result

    bench.timed(plain, device)  # warm-up of the full-size call
    t_plain = [bench.timed(plain, device)]
    if spec["method"] == "ours":
        out, extra, first = bench.peak_call(ours, device)
        del out
        result["extra_bytes"] = extra - out_bytes
        t_csa = [first]
        t_plain.append(bench.timed(plain, device))
    else:
        t_csa = []
        while len(t_csa) < spec["repeats"] and (
                not t_csa or sum(t_csa) + sum(t_plain) + t_csa[-1] + t_plain[-1] <= spec["budget"]):
            t_csa.append(bench.timed(ours, device))
            t_plain.append(bench.timed(plain, device))
    ratios = [t_csa[r] / ((t_plain[r] + t_plain[r + 1]) / 2 * keys / tokens) for r in range(len(t_csa))]
    result.update(seconds=statistics.median(t_csa), plain_seconds=statistics.median(t_plain),
                  time_ratio=statistics.median(ratios), repeats=len(t_csa))
    return result


def default_flux_blocks(pack: str) -> list:
    """DiTFamily.default_blocks of Flux.1 (19 double, 38 single blocks); importable without ComfyUI."""
    adapter = importlib.import_module(f"{pack}.attention.comfy")
    model = SimpleNamespace(double_blocks=[None] * FLUX["double"], single_blocks=[None] * FLUX["single"])
    return adapter.FLUX1.default_blocks(model)


def bank_figures(pack: str, geometry: dict) -> tuple[list[str], dict]:
    core, _ = load(pack)
    n = core.sampled_count(geometry["image"], RATE)
    channels = geometry["heads"] * geometry["dim"]
    blocks = default_flux_blocks(pack)
    doubles = sum(1 for b in blocks if b[0] == "double")
    per_block = {name: n * 2 * channels * size for name, size in (("fp16", 2), ("fp8", 1))}
    per_default = {name: b * len(blocks) for name, b in per_block.items()}
    mb = 1e6
    lines = [(f"\nFlux.1 DiT identity bank ({geometry['name']}: {n} sampled image tokens x (k + v) x {channels} "
              f"channels, 1 chunk): per identity image per step {per_block['fp16'] / mb:.1f} MB fp16 / "
              f"{per_block['fp8'] / mb:.1f} MB fp8 per block; default blocks (double {doubles} + single "
              f"{len(blocks) - doubles} = {len(blocks)}): {per_default['fp16'] / mb:.0f} MB fp16 / "
              f"{per_default['fp8'] / mb:.0f} MB fp8; a {STEPS}-step bank: {per_default['fp16'] * STEPS / 2**30:.1f} "
              f"GiB fp16 / {per_default['fp8'] * STEPS / 2**30:.1f} GiB fp8 per identity image.")]
    figures = {
        "flux_bank_bytes_per_image_step": per_default["fp16"],
        "flux_bank_bytes_per_image_step_fp8": per_default["fp8"],
        "flux_bank_bytes_per_image_step_per_block": per_block["fp16"],
        "flux_bank_bytes_per_image_step_per_block_fp8": per_block["fp8"],
        "flux_bank_default_blocks": len(blocks),
        "flux_bank_default_blocks_double_single": [doubles, len(blocks) - doubles],
    }
    return lines, figures


def dit_rows(args, run_measure, pack: str) -> tuple[list[str], dict]:
    """(Markdown lines, JSON dict with "flux_" keys) for bench_memory.main. run_measure(spec) runs one
    measurement the bench_memory way (a fresh subprocess per method on CPU)."""
    geometry = FLUX_QUICK if args.quick else FLUX
    mib = 2 ** 20
    lines = ["", (f"DiT joint attention, {geometry['name']}: {geometry['text']} text + {geometry['image']} image tokens, "
              f"{geometry['heads']} heads x {geometry['dim']}; rate {RATE}, whole batch, every panel shares; "
              f"attention/dit.py + sdpa_joint"),
             "",
             "| geometry | dtype | chunks | panels | keys/panel | extra MiB ours | extra MiB loop | mem ratio | CSA s | loop s | plain s | time ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    details = {}
    for dtype in args.dit_dtypes:
        rows = details.setdefault(f"{geometry['name']} {dtype}", {
            "text": geometry["text"], "image": geometry["image"], "heads": geometry["heads"], "dim": geometry["dim"],
            "dtype": dtype, "chunks": [], "panels": [], "keys_per_panel": [], "extra_mib_ours": [],
            "extra_mib_loop": [], "mem_ratio": [], "csa_s": [], "loop_s": [], "plain_s": [], "time_ratio": [],
            "repeats": []})
        for chunks in args.dit_chunk_counts:
            for panels in args.dit_panel_counts:
                spec = {"family": "flux", "text": geometry["text"], "image": geometry["image"],
                        "heads": geometry["heads"], "dim": geometry["dim"], "chunks": chunks, "panels": panels,
                        "device": args.device, "dtype": dtype, "repeats": args.repeats, "budget": args.budget}
                ours = run_measure(dict(spec, method="ours"))
                if ours["seconds"] * 2 <= args.budget:  # else the memory call is the one timed repeat
                    ours.update({k: v for k, v in run_measure(dict(spec, method="time")).items() if k != "keys"})
                loop = run_measure(dict(spec, method="loop"))
                mem_ratio = ours["extra_bytes"] / max(loop["extra_bytes"], 1)
                for key, value in (("chunks", chunks), ("panels", panels), ("keys_per_panel", ours["keys"]),
                                   ("extra_mib_ours", round(ours["extra_bytes"] / mib, 1)),
                                   ("extra_mib_loop", round(loop["extra_bytes"] / mib, 1)),
                                   ("mem_ratio", round(mem_ratio, 3)), ("csa_s", round(ours["seconds"], 4)),
                                   ("loop_s", round(loop["seconds"], 4)),
                                   ("plain_s", round(ours["plain_seconds"], 4)),
                                   ("time_ratio", round(ours["time_ratio"], 3)), ("repeats", ours["repeats"])):
                    rows[key].append(value)
                lines.append(f"| {geometry['name']} | {dtype} | {chunks} | {panels} | {ours['keys']} | "
                             f"{ours['extra_bytes'] / mib:.0f} | {loop['extra_bytes'] / mib:.0f} | {mem_ratio:.2f} | "
                             f"{ours['seconds']:.3f} | {loop['seconds']:.3f} | {ours['plain_seconds']:.3f} | "
                             f"{ours['time_ratio']:.2f} |")
                print(f"  measured {geometry['name']} {dtype}, {chunks} chunk(s), {panels} panels", file=sys.stderr,
                      flush=True)
    every = [g for g in details.values()]
    summary = {"flux_whole_batch_vs_loop_mem": max((r for g in every for r in g["mem_ratio"]), default=None),
               "flux_step_vs_flops": max((r for g in every for r in g["time_ratio"]), default=None),
               "flux_geometry": details}
    bank_lines, bank = bank_figures(pack, FLUX)  # a formula: always at the real geometry
    summary.update(bank)
    return lines + bank_lines, summary
