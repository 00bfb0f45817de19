"""Consistent Self-Attention with query panels grouped under a memory budget: ONE attention call, G = 1 vs grouped.

    .harness/venv/bin/python bench/bench_grouping.py [--device cpu|cuda] [--panels 2,4,8,16,32]
        [--budgets 0,auto] [--geometries sd15-512,sdxl-1024,flux1-1024] [--quick]

Each call is measured exactly as in bench/bench_memory.py (UNet geometries: SD1.5 512 px 4096 tokens x 320,
SDXL 1024 px 4096 x 640, 2 chunks; bench/bench_dit.py: Flux.1 1024 px joint attention, 512 text + 4096 image
tokens, 24 heads x 128, 1 chunk; random q/k/v, rate 0.5, whole batch, every panel shares; fp16 on CUDA, fp32 on
CPU): extra peak memory of the call above its inputs and output (CPU: a fresh process per measurement, peak
RSS; CUDA: max_memory_allocated), and time / FLOP estimate = CSA call / (plain attention on the same q/k/v x
keys per panel / tokens), plain and CSA calls alternating, median.

Budgets (`--budgets`, MiB or a word): 0 = one query panel per attention call (G = 1, the pack's behaviour before
grouping); "auto" = the ComfyUI default (attention/run.py AUTO_BUDGET_SHARE of the free device memory; 0 on the
CPU); "all" = every panel in one call; a number = that many MiB. G = core.panels_per_call(budget, per-panel
bytes). Printed per row: G, the budget, the extra memory and extra / budget (grouped rows: <= 1 is the promise),
time / FLOP estimate, and grouped time / G = 1 time of the same size (measured in the same run).
Default budgets: "0,auto" on CUDA, "0,all" on the CPU (whose default is G = 1: this shows why).
The last line of stdout is one JSON object (grouping_vs_flops: the worst grouped time / FLOP estimate;
grouping_mem_vs_budget: the worst grouped extra / budget; rows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_dit
import bench_memory

GEOMETRIES = {"sd15-512": ("unet", 4096, 320), "sdxl-1024": ("unet", 4096, 640), "flux1-1024": ("dit", 4096, 3072)}


def spec_for(name: str, args, panels: int, budget) -> dict:
    family, tokens, channels = GEOMETRIES[name]
    spec = {"panels": panels, "device": args.device, "dtype": args.dtype, "repeats": args.repeats,
            "budget": args.seconds, "memory_budget": budget}
    if args.quick:
        tokens = 1024
    if family == "unet":
        spec.update(tokens=tokens, channels=channels)
    else:
        geometry = bench_dit.FLUX_QUICK if args.quick else bench_dit.FLUX
        spec.update(family="flux", text=geometry["text"], image=geometry["image"], heads=geometry["heads"],
                    dim=geometry["dim"], chunks=1)
    return spec


def measure(spec: dict, seconds: float) -> dict:
    ours = bench_memory.run_measure(dict(spec, method="ours"))
    if ours["seconds"] * 2 <= seconds:  # else the memory call is the one timed repeat
        ours.update({k: v for k, v in bench_memory.run_measure(dict(spec, method="time")).items() if k != "keys"})
    return ours


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--panels", default=None, help="default 2,4,8,16,32 (CUDA), 2,4 (CPU)")
    p.add_argument("--budgets", default=None, help="default 0,auto (CUDA), 0,all (CPU)")
    p.add_argument("--geometries", default=",".join(GEOMETRIES))
    p.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed CSA calls per size (default 5 CUDA, 3 CPU)")
    p.add_argument("--seconds", type=float, default=None, help="seconds of timed calls per size (default 30 CUDA, 20 CPU)")
    p.add_argument("--quick", action="store_true", help="1024 image tokens per panel (a smoke run)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.panel_counts = [int(x) for x in (args.panels or ("2,4,8,16,32" if cuda else "2,4")).split(",")]
    args.budget_list = [b if b in ("auto", "all") else int(b) for b in (args.budgets or ("0,auto" if cuda else "0,all")).split(",")]
    args.repeats = args.repeats or (5 if cuda else 3)
    args.seconds = args.seconds if args.seconds is not None else (30.0 if cuda else 20.0)
    return args


def main(argv=None):
    args = parse_args(argv)
    bench_memory.load_pack()
    mib = 2 ** 20
    print(f"device {args.device}{' (' + torch.cuda.get_device_name(0) + ')' if args.device == 'cuda' else ''}, "
          f"{args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; rate 0.5, whole batch, "
          f"every panel shares; UNet 2 chunks, Flux 1 chunk{' (quick: 1024 tokens)' if args.quick else ''}")
    print()
    print("| geometry | panels | budget | budget MiB | G | keys/panel | CSA s | plain s | time / FLOP est | "
          "extra MiB | extra / budget | grouped / G=1 time |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.geometries.split(","):
        for panels in args.panel_counts:
            first = None
            for budget in args.budget_list:
                r = measure(spec_for(name, args, panels, budget), args.seconds)
                if first is None:
                    first = r
                extra = r["extra_bytes"]
                grouped = r["group"] > 1
                vs_budget = extra / r["budget_bytes"] if grouped and r["budget_bytes"] > 0 else float("nan")
                vs_first = r["seconds"] / first["seconds"] if r is not first else 1.0
                row = {"geometry": name, "panels": panels, "budget": budget, "budget_mib": round(r["budget_bytes"] / mib, 1),
                       "group": r["group"], "keys": r["keys"], "csa_s": round(r["seconds"], 4),
                       "plain_s": round(r["plain_seconds"], 4), "time_vs_flops": round(r["time_ratio"], 3),
                       "extra_mib": round(extra / mib, 1),
                       "extra_vs_budget": round(vs_budget, 3) if not math.isnan(vs_budget) else None,
                       "vs_first_budget": round(vs_first, 3), "repeats": r.get("repeats", 1)}
                rows.append(row)
                print(f"| {name} | {panels} | {budget} | {row['budget_mib']:.0f} | {r['group']} | {r['keys']} | "
                      f"{r['seconds']:.4f} | {r['plain_seconds']:.4f} | {r['time_ratio']:.2f} | {extra / mib:.0f} | "
                      f"{vs_budget:.2f} | {vs_first:.2f} |", flush=True)
    grouped = [r for r in rows if r["group"] > 1]
    summary = {"device": args.device, "dtype": args.dtype,
               "grouping_vs_flops": max((r["time_vs_flops"] for r in grouped), default=None),
               "ungrouped_vs_flops": max((r["time_vs_flops"] for r in rows if r["group"] == 1), default=None),
               "grouping_mem_vs_budget": max((r["extra_vs_budget"] for r in grouped), default=None),
               "rows": rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
