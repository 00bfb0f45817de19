"""Identity bank bytes per identity image per step at real geometry, against the official StoryDiffusion bank.

The official code stores, for every step and every patched (up-block) attn1, the sampled hidden states
entering attn1 (rate 0.5, fp16, cond + uncond). This bench writes one step of real-size random hidden
states through the pack's own BankWriter for every output-block layer of SD1.5 512 px, SDXL 768 px and
SDXL 1024 px, reads the stored bytes back from the bank, and divides by the official figure. It also
counts how many (step, layer) pairs a 30-step write keeps under the "official random" schedule (the
bank stores only pairs a read can use) and prints the real size of a 4-image, 30-step bank.

    python bench/bench_bank.py            # Markdown table, then one JSON line (the last line)

No ComfyUI needed: the pack is imported as a bare package.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 0.5
STEPS = 30
IDENTITY_IMAGES = 4

# output-block (official) self-attention layers: (layers, tokens, channels)
GEOMETRIES = {
    "SD1.5 512px": [(3, 16 * 16, 1280), (3, 32 * 32, 640), (3, 64 * 64, 320)],
    "SDXL 768px": [(30, 24 * 24, 1280), (6, 48 * 48, 640)],
    "SDXL 1024px": [(30, 32 * 32, 1280), (6, 64 * 64, 640)],
}
OFFICIAL_MB_SDXL_768 = 62.0  # DESIGN.md §4: ≈ 62 MB per identity image per step


def import_pack():
    if "sdpack" not in sys.modules:
        pack = types.ModuleType("sdpack")
        pack.__path__ = [REPO]
        sys.modules["sdpack"] = pack
    from sdpack.attention import bank, schedule

    return bank, schedule


def layers_of(geometry):
    out = []
    for count, tokens, channels in GEOMETRIES[geometry]:
        out += [(tokens, channels)] * count
    return out


def official_bytes(geometry) -> int:
    """Sampled hidden states, fp16 (2 bytes), cond + uncond (2 chunks), one identity image, one step."""
    return sum(round(tokens * RATE) * channels * 2 * 2 for tokens, channels in layers_of(geometry))


def measured_bytes(bank_mod, geometry, dtype: str) -> int:
    """Write one step for one identity image through the real BankWriter and read the bank's size."""
    bank = bank_mod.IdentityBank(dtype=dtype)
    writer = bank.begin_write([0], [("A",)], [1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    for index, (tokens, channels) in enumerate(layers_of(geometry)):
        hidden = torch.randn(2, 1, round(tokens * RATE), channels, generator=g)
        writer.put(0, ("output", index, 0), ["positive", "negative"], hidden, tokens)
    writer.commit()
    return bank.nbytes()


def official_schedule_fraction(schedule_mod, layer_count: int) -> float:
    """Share of (step, layer) pairs of a 30-step run at which the 'official random' schedule shares."""
    s = schedule_mod.Schedule(official=True, seed=0)
    used = sum(s.active(step, 1.0, ("output", layer, 0)) for step in range(STEPS) for layer in range(layer_count))
    return used / (STEPS * layer_count)


def read_peak_mib(steps: int, folder: str) -> float:
    """Peak RSS growth (MiB) of a fresh process that loads a saved SD1.5 512 px bank of `steps` steps
    (one identity image, fp16) and reads every step's tensors for every layer, as a read run does."""
    path = os.path.join(folder, f"bank_{steps}.safetensors")
    if not os.path.exists(path):
        bank_mod, _ = import_pack()
        bank = bank_mod.IdentityBank(dtype="fp16")
        writer = bank.begin_write([0], [("A",)], [float(steps - i) for i in range(steps + 1)])
        g = torch.Generator().manual_seed(0)
        for step in range(steps):
            for index, (tokens, channels) in enumerate(layers_of("SD1.5 512px")):
                hidden = torch.randn(2, 1, round(tokens * RATE), channels, generator=g)
                writer.put(step, ("output", index, 0), ["positive", "negative"], hidden, tokens)
        writer.commit()
        bank.save(path)
    body = f"""
layers = {[t for t, _ in layers_of("SD1.5 512px")]!r}
bank = bank_mod.IdentityBank.load({path!r})
before = hwm()
for step in range({steps}):
    for index, tokens in enumerate(layers):
        bank.stored_tokens(step, ("output", index, 0), ["positive", "negative"], tokens)
print((hwm() - before) / 1024)
"""
    return float(run_child(body)[0])


CHILD_PREAMBLE = f"""
import sys, types, torch
sys.path.insert(0, {REPO!r})
pack = types.ModuleType("sdpack"); pack.__path__ = [{REPO!r}]; sys.modules["sdpack"] = pack
from sdpack.attention import bank as bank_mod
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
"""


def run_child(body: str) -> list[str]:
    """The words of the last line `body` prints, run after CHILD_PREAMBLE in a fresh process (peak RSS = its own)."""
    import subprocess

    # a fixed mmap threshold: glibc's dynamic one otherwise keeps freed step tensors in the heap, and RSS
    # would measure the allocator, not the bank (the same setting as bench_memory.py)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", CHILD_PREAMBLE + body], capture_output=True, text=True, check=True,
                         env=env)
    return out.stdout.strip().splitlines()[-1].split()


WRITE_GEOMETRY = "SDXL 1024px"


def write_peak_mib(steps: int, keep: str, folder: str) -> tuple[float, float]:
    """(peak RSS growth MiB, bank MiB) of a fresh process writing an SDXL 1024 px bank of `steps` steps (one
    identity image, fp16, cond + uncond) through the real BankWriter, kept in memory or on disk (`keep`)."""
    body = f"""
layers = {layers_of(WRITE_GEOMETRY)!r}
g = torch.Generator().manual_seed(0)
hidden = {{tokens: torch.randn(2, 1, round(tokens * {RATE}), channels, generator=g) for tokens, channels in set(layers)}}
bank = bank_mod.IdentityBank(dtype="fp16", keep={keep!r})
writer = bank.begin_write([0], [("A",)], [float({steps} - i) for i in range({steps} + 1)],
                          planned_steps=lambda layer: {steps}, spill_parent={folder!r})
before = hwm()
for step in range({steps}):
    for index, (tokens, channels) in enumerate(layers):
        writer.put(step, ("output", index, 0), ["positive", "negative"], hidden[tokens], tokens)
writer.commit()
print((hwm() - before) / 1024, bank.nbytes() / 2**20)
"""
    peak, size = run_child(body)
    return float(peak), float(size)


def bank_rows(args=None):
    """(Markdown lines, JSON dict) for bench_memory.py and this script."""
    bank_mod, schedule_mod = import_pack()
    lines = [("| geometry | official MB/img/step | fp16 | fp8 | fp8 + official schedule | old K/V format | "
              "4 images x 30 steps, fp16 / fp8 |"),
             "|---|---|---|---|---|---|---|"]
    result = {}
    for geometry in GEOMETRIES:
        official = official_bytes(geometry)
        fp16 = measured_bytes(bank_mod, geometry, "fp16") / official
        fp8 = measured_bytes(bank_mod, geometry, "fp8") / official
        fraction = official_schedule_fraction(schedule_mod, len(layers_of(geometry)))
        total16 = official * fp16 * IDENTITY_IMAGES * STEPS / 2**30
        total8 = official * fp8 * IDENTITY_IMAGES * STEPS / 2**30
        lines.append(f"| {geometry} | {official / 1e6:.1f} | {fp16:.2f} | {fp8:.2f} | {fp8 * fraction:.2f} | 2.00 | "
                     f"{total16:.2f} / {total8:.2f} GiB |")
        result[geometry] = {"official_mb": round(official / 1e6, 2), "fp16": round(fp16, 4), "fp8": round(fp8, 4),
                            "fp8_official_schedule": round(fp8 * fraction, 4),
                            "bank_gib_4_images_30_steps_fp16": round(total16, 3),
                            "bank_gib_4_images_30_steps_fp8": round(total8, 3)}
    sdxl768 = result["SDXL 768px"]["official_mb"]
    lines.append(f"\nOfficial SDXL 768 px figure recomputed: {sdxl768:.1f} MB (DESIGN.md: ≈{OFFICIAL_MB_SDXL_768:.0f} MB).")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        peaks = {steps: read_peak_mib(steps, folder) for steps in (10, 30)}
    growth = peaks[30] / max(peaks[10], 1e-6)
    lines.append(f"Read run of a saved SD1.5 512 px bank (1 image, fp16): peak RSS growth {peaks[10]:.0f} MiB "
                 f"for 10 steps, {peaks[30]:.0f} MiB for 30 steps (ratio {growth:.2f}; the bank files are "
                 f"{10 * official_bytes('SD1.5 512px') / 2**20:.0f} and {30 * official_bytes('SD1.5 512px') / 2**20:.0f} MiB).")
    result["read_peak_mib"] = {"10_steps": round(peaks[10], 1), "30_steps": round(peaks[30], 1)}
    with tempfile.TemporaryDirectory() as folder:
        writes = {(keep, steps): write_peak_mib(steps, keep, folder) for keep in ("memory", "disk") for steps in (10, 30)}
    for keep in ("memory", "disk"):
        (p10, s10), (p30, s30) = writes[(keep, 10)], writes[(keep, 30)]
        lines.append(f"Write run of an {WRITE_GEOMETRY} bank (1 image, fp16), keep {keep}: peak RSS growth {p10:.0f} MiB for 10 steps, {p30:.0f} MiB "
                     f"for 30 steps (ratio {p30 / max(p10, 1e-6):.2f}; banks of {s10:.0f} and {s30:.0f} MiB).")
        result[f"write_peak_mib_{keep}"] = {"10_steps": round(p10, 1), "30_steps": round(p30, 1)}
    disk_growth = writes[("disk", 30)][0] / max(writes[("disk", 10)][0], 1e-6)
    best = max(r["fp8"] for k, r in result.items() if k in GEOMETRIES)
    return lines, {"bank_read_peak_30_vs_10_steps": round(growth, 3),
                   "bank_disk_write_peak_30_vs_10_steps": round(disk_growth, 3), "bank_vs_official": best, "bank_vs_official_fp16": max(r["fp16"] for k, r in result.items() if k in GEOMETRIES),
                   "bank": result}


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    lines, figures = bank_rows()
    print("\n".join(lines))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
