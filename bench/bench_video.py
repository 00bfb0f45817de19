"""Video Combine encoding speed and memory versus plain PyAV, at 512x512.

    .harness/venv/bin/python bench/bench_video.py [--frames 120] [--memory-frames 240]

Speed: the pack's path (float IMAGE -> uint8 one frame at a time -> temporary file -> rename) against
plain PyAV encoding the same frames already converted to uint8, same codec and options. Runs are
interleaved and the best of `--repeats` is kept, so both see the same machine load. Ratio = ours /
plain fps (target >= 0.9).

Memory: peak resident memory (ru_maxrss) of a fresh process above the float IMAGE it starts with,
for the streaming encoder and for the naive "convert the whole batch to uint8, then encode".
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_core():
    """video/join.py + video/encode.py on their own (they import nothing from ComfyUI or the rest of the pack)."""
    import types

    sys.path.insert(0, REPO)
    from video import encode, join

    return types.SimpleNamespace(**{k: v for module in (join, encode) for k, v in vars(module).items()})


def make_frames(count: int, size: int = 512) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, size // 16, size // 16, 3, generator=generator)
    base = torch.nn.functional.interpolate(base.movedim(-1, 1), size=(size, size), mode="bilinear").movedim(1, -1)
    frames = torch.empty(count, size, size, 3)  # filled in place: the only full-size allocation
    for i in range(count):
        torch.remainder(base[0] + 0.3 * i / max(1, count - 1), 1.0, out=frames[i])
    return frames


def plain_pyav(frames_uint8: list, path: str, codec: str, options: dict, container_format: str, fps: float):
    import av

    with av.open(path, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(round(fps * 1000), 1000))
        stream.width, stream.height = frames_uint8[0].shape[1], frames_uint8[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for frame in frames_uint8:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def speed(core, frame_count: int, repeats: int) -> list[tuple]:
    images = make_frames(frame_count)
    uint8 = [f for f in core.frames_as_uint8(images, range(frame_count))]  # baseline gets them for free
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt in ("mp4", "webm"):
            codec = core.pick_codec(fmt)
            options = core._codec_options(codec, 85)
            ours, plain = [], []
            for r in range(repeats):
                start = time.perf_counter()
                core.write_video(core.frames_as_uint8(images, range(frame_count)),
                                 os.path.join(folder, f"ours{r}.{fmt}"), fmt, 24.0, quality=85)
                ours.append(time.perf_counter() - start)
                start = time.perf_counter()
                plain_pyav(uint8, os.path.join(folder, f"plain{r}.{fmt}"), codec, options, fmt, 24.0)
                plain.append(time.perf_counter() - start)
            ours_fps, plain_fps = frame_count / min(ours), frame_count / min(plain)
            rows.append((f"{fmt} ({codec})", ours_fps, plain_fps, ours_fps / plain_fps))
    return rows


MEMORY_CHILD = r"""
import os, resource, sys, tempfile, torch
sys.path.insert(0, {bench!r})
import bench_video
core = bench_video.load_core()
images = bench_video.make_frames({frames})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "m.mp4")
    if {naive}:
        whole = (images * 255).clamp(0, 255).to(torch.uint8).numpy()
        core.write_video(iter(whole), path, "mp4", 24.0)
    else:
        core.write_video(core.frames_as_uint8(images, range(images.shape[0])), path, "mp4", 24.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


def memory(frame_count: int) -> list[tuple]:
    rows = []
    float_mb = frame_count * 512 * 512 * 3 * 4 / 2**20
    for label, naive in (("streaming (Video Combine)", False), ("whole batch to uint8 first", True)):
        code = MEMORY_CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), frames=frame_count, naive=naive)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append((label, float(out.stdout.strip().splitlines()[-1]), float_mb))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-frames", type=int, default=240)
    args = parser.parse_args()
    core = load_core()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    print(f"Encoding {args.frames} frames of 512x512, best of {args.repeats} (cpu count {os.cpu_count()})")
    print(f"{'format':<22}{'ours fps':>10}{'PyAV fps':>10}{'ratio':>8}")
    for name, ours, plain, ratio in speed(core, args.frames, args.repeats):
        print(f"{name:<22}{ours:>10.1f}{plain:>10.1f}{ratio:>8.2f}")

    print(f"\nPeak memory above a {args.memory_frames}-frame 512x512 float IMAGE (mp4)")
    print(f"{'encoder input':<28}{'extra MiB':>10}{'IMAGE MiB':>10}")
    for label, extra, float_mb in memory(args.memory_frames):
        print(f"{label:<28}{extra:>10.0f}{float_mb:>10.0f}")


if __name__ == "__main__":
    main()
