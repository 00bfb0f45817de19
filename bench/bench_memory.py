"""Consistent Self-Attention at real size: extra peak memory and time of ONE attention call.

    .harness/venv/bin/python bench/bench_memory.py [--device cpu|cuda] [--panels 2,4,8] [--quick]
        [--dit-panels 2,4] [--dit-chunks 1,2] [--dit-dtypes float16,bfloat16] [--no-dit | --only-dit]

Two families: UNet (attention/core.py, below) and DiT (attention/dit.py at Flux.1 1024 px: 512 text + 4096
image tokens, 24 heads x 128; bench/bench_dit.py, measured the same way, keys prefixed "flux_").

No ComfyUI: attention/core.py (and dit.py) is imported on its own (the repository is loaded as a bare package,
without its ComfyUI entry point) and given the plain sdpa of common/attention.py as its kernel.

Geometry: the high-resolution self-attention level of SD1.5 at 512 px (4096 tokens x 320 channels,
5 heads) and of SDXL at 1024 px (4096 tokens x 640 channels, 10 heads); random q/k/v, 2 chunks
(cond + uncond), rate 0.5 (2048 sampled tokens per panel), whole batch (window 0), every panel
shares with every other one. fp32 on CPU, fp16 on CUDA.

Memory — "extra peak": the peak memory during the call above the memory before it, minus the
output (which the call returns and must hold in any case).
  - CUDA: torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats().
  - CPU: each panel count runs in a fresh subprocess per method, started with glibc's
    MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB so that every large tensor is its own mmap and freeing
    it returns the pages (RSS then follows live tensors). The process's peak RSS (VmHWM in
    /proc/self/status) is reset just before the call by writing 5 to /proc/self/clear_refs, and
    read after it; extra = VmHWM - VmRSS before - output bytes. Where clear_refs cannot be
    written the baseline is VmHWM before the call (the peak of creating the inputs).
  Compared with a "one-panel loop" written here the way the official StoryDiffusion code does it:
  for each panel, torch.cat of the other panels' sampled tokens and its own tokens, for k and for
  v, then attention for that panel's rows (both chunks). mem ratio = ours / loop.

Time: time(CSA call) / (time(plain attention on the same q, k, v) x L_i / T), L_i = (B-1)*n + T
keys per panel against T: the FLOP estimate, since attention cost is linear in the key count. A
plain warm-up call first; then plain and CSA calls alternate (plain, CSA, plain, ...) so both see
the same machine load, each CSA call compared with the mean of the plain calls around it, median
over repeats. Repeats run in their own process (CPU) and stop at --budget seconds per size; where one CSA
call takes more than half of it (the largest sizes on CPU), the memory call is the one timed repeat. Each method is warmed up on
a small slice first; torch's thread count is left as it is.

Why small sizes scatter (and the old 1.71 at 2 panels in bench_attention.py at a 128 px latent): a
CSA call is many short parallel regions (a gather, two copies and one attention per panel) where
plain attention is one long one. At 1024 tokens, with other processes on a 2-core machine, the same
2-panel call took 0.20 s and then 0.05 s in back-to-back repeats (plain: 0.03-0.08 s); it is load and
first-call noise on a small call, not gather cost: at 4096 tokens the gather is a few % of the time.

The last line of stdout is one JSON object: whole_batch_vs_loop_mem (max mem ratio over panel
counts and geometries), step_vs_flops (max time ratio), per-geometry details, what bank_rows()
adds, and the DiT part: flux_whole_batch_vs_loop_mem, flux_step_vs_flops, flux_geometry (details per
dtype), flux_bank_bytes_per_image_step (fp16, Flux.1 default blocks; _fp8, _per_block variants).
Targets, both families: whole_batch_vs_loop_mem <= 1.1, step_vs_flops <= 1.15 (flux_ keys likewise).

DiT on CPU (one run, 2 threads, fp32, 1 chunk): mem ratio 1.26 (2 panels: 264 vs 210 MiB) and 1.18 (4 panels:
360 vs 306 MiB), time ratio 0.99 and 1.12. The mem ratio misses 1.1 because joint_consistent_attention
allocates its output with new_zeros, whose zero fill touches every page of the output at the first
panel, where the loop's torch.empty output (as core.py's, with one window) is touched panel by panel;
the difference is output/B. With CUDA's caching allocator an untouched empty block counts in full,
so the ratio there is the allocation itself. With new_empty for one window (as core.py) the quick run
gives 0.99 at 2 and 4 panels. --quick: 256 text + 1024 image tokens, DiT panels 2,4.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "storydiffusion_bench_pack"

# name: (tokens, channels) of the high-resolution self-attention level; heads = channels / 64
GEOMETRIES = {
    "sd15-512": (4096, 320),
    "sdxl-1024": (4096, 640),
}
QUICK_GEOMETRIES = {
    "sd15-512 (quick: 1024 tok)": (1024, 320),
    "sdxl-1024 (quick: 1024 tok)": (1024, 640),
}
CHUNKS = 2
RATE = 0.5


def load_pack():
    """attention.core and common.attention without ComfyUI: the repository as a bare package (its
    __init__.py, the ComfyUI entry point, is never run), so the relative imports resolve."""
    if PACK not in sys.modules:
        pack = types.ModuleType(PACK)
        pack.__path__ = [REPO]
        sys.modules[PACK] = pack
    core = importlib.import_module(f"{PACK}.attention.core")
    common = importlib.import_module(f"{PACK}.common.attention")
    return core, common.multihead_attention


# ---------------------------------------------------------------------------------------------------
# the reference: one panel at a time, as the official StoryDiffusion code does it


def loop_attention(q, k, v, heads, chunks, sampled, attention):
    """Each panel: torch.cat([other panels' sampled tokens..., own tokens]) for k and for v, then
    attention for that panel's rows of every chunk; every panel reads every other one."""
    total, tq, dim = q.shape
    panels = total // chunks
    tk = k.shape[1]
    q4, k4, v4 = q.view(chunks, panels, tq, dim), k.view(chunks, panels, tk, dim), v.view(chunks, panels, tk, dim)
    out = torch.empty_like(q)
    out4 = out.view(chunks, panels, tq, dim)
    for i in range(panels):
        others = [j for j in range(panels) if j != i]
        kk = torch.cat([k4[:, j, sampled[j]] for j in others] + [k4[:, i]], dim=1)
        vv = torch.cat([v4[:, j, sampled[j]] for j in others] + [v4[:, i]], dim=1)
        out4[:, i] = attention(q4[:, i], kk, vv, heads)
        del kk, vv
    return out


# ---------------------------------------------------------------------------------------------------
# peak memory


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_call(fn, device):
    """(result, extra peak bytes above the memory before the call, seconds)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status("VmRSS") if _reset_peak_rss() else _status("VmHWM")
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status("VmHWM")
    return result, peak - base, seconds


# ---------------------------------------------------------------------------------------------------
# one measurement: one geometry, one panel count, one method


def make_inputs(tokens, channels, panels, device, dtype, core):
    g = torch.Generator(device=device).manual_seed(panels)
    q, k, v = (torch.randn(CHUNKS * panels, tokens, channels, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    sampled = core.sample_panel_tokens(tokens, RATE, seed=0, step=5, layer=40, panels=range(panels))
    return q, k, v, sampled


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(spec: dict) -> dict:
    """spec: tokens, channels, panels, device, dtype, repeats, budget and method: "ours" (extra peak
    memory of consistent_attention, timed once between two plain calls), "time" (timed repeats of
    consistent_attention alternating with plain attention) or "loop" (extra peak of the reference)."""
    core, attention = load_pack()
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    tokens, channels, panels = spec["tokens"], spec["channels"], spec["panels"]
    heads = channels // 64
    q, k, v, sampled = make_inputs(tokens, channels, panels, device, dtype, core)
    share = torch.ones(panels, panels, dtype=torch.bool)
    keys = (panels - 1) * sampled.shape[1] + tokens  # L_i, the same for every panel here
    out_bytes = q.numel() * q.element_size()

    def plain():
        return attention(q, k, v, heads)

    budget = memory_budget(spec, device, core, panels,
                           core.panel_call_bytes(CHUNKS, tokens, keys, channels, q.element_size(), index_rows=CHUNKS))

    def ours():
        return core.consistent_attention(q, k, v, heads, chunks=CHUNKS, share=share, sampled=sampled,
                                         window=0, attention=attention, budget=budget)

    def loop():
        return loop_attention(q, k, v, heads, CHUNKS, sampled, attention)

    # warm-up of each kernel and of the measured method on a small slice (thread pool, allocator,
    # library code paged in on first use), so that the measurement sees none of it
    small = slice(0, CHUNKS * 2)
    attention(q[small, :256], k[small, :256], v[small, :256], heads)
    method = loop if spec["method"] == "loop" else ours
    if spec["method"] == "loop":
        loop_attention(q[small, :256], k[small, :256], v[small, :256], heads, CHUNKS, sampled[:2] % 256, attention)
    else:
        core.consistent_attention(q[small, :256], k[small, :256], v[small, :256], heads, chunks=CHUNKS,
                                  share=share[:2, :2], sampled=sampled[:2] % 256, attention=attention)
    sync(device)
    result = {"keys": keys, "budget_bytes": budget,
              "group": core.panels_per_call(budget, core.panel_call_bytes(CHUNKS, tokens, keys, channels,
                                                                          q.element_size(), index_rows=CHUNKS), panels)}
    if spec["method"] == "loop":
        out, extra, seconds = peak_call(method, device)
        result.update(extra_bytes=extra - out_bytes, seconds=seconds)
        return result

    timed(plain, device)  # warm-up of the full-size call
    t_plain = [timed(plain, device)]
    if spec["method"] == "ours":  # the memory figure, and one timed repeat between two plain calls
        out, extra, first = peak_call(ours, device)
        del out
        result["extra_bytes"] = extra - out_bytes
        t_csa = [first]
        t_plain.append(timed(plain, device))
    else:  # "time": repeats while they fit the budget (each costs about a CSA call plus a plain call)
        t_csa = []
        while len(t_csa) < spec["repeats"] and (
                not t_csa or sum(t_csa) + sum(t_plain) + t_csa[-1] + t_plain[-1] <= spec["budget"]):
            t_csa.append(timed(ours, device))
            t_plain.append(timed(plain, device))
    ratios = [t_csa[r] / ((t_plain[r] + t_plain[r + 1]) / 2 * keys / tokens) for r in range(len(t_csa))]
    result.update(seconds=statistics.median(t_csa), plain_seconds=statistics.median(t_plain),
                  time_ratio=statistics.median(ratios), repeats=len(t_csa))
    return result


def memory_budget(spec: dict, device, core, panels: int, panel_bytes: int) -> int:
    """The attention memory budget (bytes) of a measurement: spec["memory_budget"] = 0 (one panel per call, the
    default), MiB as an int, "all" (every panel in one call) or "auto" (what the ComfyUI glue takes by default:
    attention/run.py's AUTO_BUDGET_SHARE of the free device memory, here the allocator's, 0 on the CPU)."""
    wanted = spec.get("memory_budget", 0)
    if wanted == "all":
        return panels * panel_bytes
    if wanted == "auto":
        if device.type != "cuda":
            return 0
        run = importlib.import_module(f"{PACK}.attention.run")
        free, _ = torch.cuda.mem_get_info(device)
        return int((free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
                   * run.AUTO_BUDGET_SHARE)
    return int(wanted) * 2**20


def run_measure(spec: dict) -> dict:
    """In a fresh subprocess on CPU (see the module docstring); in this process on CUDA.

    Memory workers ("ours", "loop") run with glibc's mmap threshold fixed; the "time" worker runs with
    the default allocator, which keeps freed blocks up to 32 MiB for reuse (as in real use)."""
    if spec["device"] == "cuda":
        result = dit_module().measure(spec, PACK, sys.modules[__name__]) if spec.get("family") else measure(spec)
        torch.cuda.empty_cache()
        return result
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if spec["method"] != "time":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--panels", default=None,
                   help="comma-separated panel counts (default 2,4,8,16,32; on CPU 2,4,8,16: 32 panels "
                        "of SDXL take several minutes per call there)")
    p.add_argument("--geometries", default=None, help=f"comma-separated subset of {', '.join(GEOMETRIES)}")
    p.add_argument("--repeats", type=int, default=None, help="timed CSA calls per size (default 3 CPU and quick, 5 CUDA)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per size before repeats stop (default 20 CPU, 60 CUDA); "
                        "at least one repeat always runs")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="smoke run: 1024 tokens, 2 and 4 panels")
    p.add_argument("--dit-panels", default=None,
                   help="panel counts of the Flux.1 DiT part (default 2,4 on CPU, 2,4,8 on CUDA; quick 2,4)")
    p.add_argument("--dit-chunks", default=None, help="chunk counts of the DiT part (default 1 on CPU, 1,2 on CUDA)")
    p.add_argument("--dit-dtypes", default=None,
                   help="comma-separated dtypes of the DiT part (default: --dtype), e.g. float16,bfloat16")
    p.add_argument("--no-dit", action="store_true", help="skip the DiT part (bench/bench_dit.py)")
    p.add_argument("--only-dit", action="store_true", help="the DiT part alone (no UNet geometries, no bank rows)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    if args.panels:
        args.panel_counts = [int(x) for x in args.panels.split(",")]
    elif args.quick:
        args.panel_counts = [2, 4]
    else:
        args.panel_counts = [2, 4, 8, 16, 32] if cuda else [2, 4, 8, 16]
    table = QUICK_GEOMETRIES if args.quick else GEOMETRIES
    if args.geometries:
        wanted = args.geometries.split(",")
        table = {name: g for name, g in table.items() if name.split(" ")[0] in wanted}
    args.geometry_table = table
    if args.dit_panels:
        args.dit_panel_counts = [int(x) for x in args.dit_panels.split(",")]
    else:
        args.dit_panel_counts = [2, 4, 8] if cuda and not args.quick else [2, 4]
    args.dit_chunk_counts = ([int(x) for x in args.dit_chunks.split(",")] if args.dit_chunks
                             else [1, 2] if cuda else [1])
    args.dit_dtypes = args.dit_dtypes.split(",") if args.dit_dtypes else [args.dtype]
    if args.only_dit:
        args.geometry_table, args.no_dit = {}, False
    args.repeats = args.repeats or (5 if cuda else 3)
    args.budget = args.budget if args.budget is not None else (60.0 if cuda else 20.0)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        load_pack()
        print(json.dumps(dit_module().measure(spec, PACK, sys.modules[__name__]) if spec.get("family")
                         else measure(spec)))
        return
    mib = 2 ** 20
    lines = [(f"device {args.device}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{CHUNKS} chunks, rate {RATE}, window 0, every panel shares"),
             "",
             "| geometry | panels | keys/panel | extra MiB ours | extra MiB loop | mem ratio | CSA s | plain s | time ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    details: dict = {}
    for name, (tokens, channels) in args.geometry_table.items():
        rows = details.setdefault(name, {"tokens": tokens, "channels": channels, "heads": channels // 64,
                                         "panels": [], "keys_per_panel": [], "extra_mib_ours": [],
                                         "extra_mib_loop": [], "mem_ratio": [], "csa_s": [], "plain_s": [],
                                         "time_ratio": [], "repeats": []})
        for panels in args.panel_counts:
            spec = {"tokens": tokens, "channels": channels, "panels": panels, "device": args.device,
                    "dtype": args.dtype, "repeats": args.repeats, "budget": args.budget}
            ours = run_measure(dict(spec, method="ours"))
            if ours["seconds"] * 2 <= args.budget:  # else one call is the only repeat the budget allows
                ours.update({k: v for k, v in run_measure(dict(spec, method="time")).items() if k != "keys"})
            loop = run_measure(dict(spec, method="loop"))
            mem_ratio = ours["extra_bytes"] / max(loop["extra_bytes"], 1)
            for key, value in (("panels", panels), ("keys_per_panel", ours["keys"]),
                               ("extra_mib_ours", round(ours["extra_bytes"] / mib, 1)),
                               ("extra_mib_loop", round(loop["extra_bytes"] / mib, 1)),
                               ("mem_ratio", round(mem_ratio, 3)), ("csa_s", round(ours["seconds"], 4)),
                               ("plain_s", round(ours["plain_seconds"], 4)),
                               ("time_ratio", round(ours["time_ratio"], 3)), ("repeats", ours["repeats"])):
                rows[key].append(value)
            lines.append(f"| {name} | {panels} | {ours['keys']} | {ours['extra_bytes'] / mib:.0f} | "
                         f"{loop['extra_bytes'] / mib:.0f} | {mem_ratio:.2f} | {ours['seconds']:.3f} | "
                         f"{ours['plain_seconds']:.3f} | {ours['time_ratio']:.2f} |")
            print(f"  measured {name}, {panels} panels", file=sys.stderr, flush=True)
    if details:
        for line in lines:
            print(line)
    summary = {"device": args.device, "dtype": args.dtype}
    if details:  # not with --only-dit
        summary.update(whole_batch_vs_loop_mem=max(r for g in details.values() for r in g["mem_ratio"]),
                       step_vs_flops=max(r for g in details.values() for r in g["time_ratio"]), geometries=details)
    if not args.no_dit:
        load_pack()
        dit_lines, dit_summary = dit_module().dit_rows(args, run_measure, PACK)
        for line in dit_lines:
            print(line)
        summary.update(dit_summary)
    if not args.only_dit:
        bank_lines, bank_summary = bank_rows(args)
        for line in bank_lines:
            print(line)
        summary.update(bank_summary)
    print(json.dumps(summary))  # keep this the last line of stdout


def dit_module():
    """bench/bench_dit.py: the DiT (Flux.1) part, measured with this module's workers and peak_call."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_dit

    return bench_dit


# ---------------------------------------------------------------------------------------------------
# HOOK — identity-bank section (to be filled in by the bank work): measure a read run against the
# bank here and return (Markdown lines printed after the table, dict merged into the final JSON).
# Keep it the last function of the file; main() already prints and merges what it returns.


def bank_rows(args) -> tuple[list[str], dict]:
    """Identity bank bytes per identity image per step vs the official bank (bench/bench_bank.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_bank

    return bench_bank.bank_rows(args)


if __name__ == "__main__":
    main()
