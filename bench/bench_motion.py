"""Semantic Motion Predictor speed on the CPU: inference for one transition, training throughput.

    .harness/venv/bin/python bench/bench_motion.py [--frames 16] [--repeats 3] [--threads 0] [--full]

Inference: one L-frame transition with the paper-size predictor (width 1024, 8 layers, 16 heads), for
ViT-H pooled image_embeds (1 x 1024) and ViT-H penultimate hidden states (257 x 1280), against the
training-free linear interpolation of the same embeddings. Ratio = predictor time / interpolation time.

Training: optimizer steps of `train.py`'s loop (interpolate, forward, MSE + cosine, backward, AdamW) on
random embeddings, reported as clips/s, for the paper-size pooled model and the tiny model of the tests.
`--full` adds the paper-size penultimate model (minutes per step on a small CPU).
Best of `--repeats`; all rows come from one run on one machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="clips per training step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--full", action="store_true", help="also train the paper-size penultimate model")
    args = parser.parse_args()

    sys.path.insert(0, REPO)  # the pack's core is plain torch: import it as `motion` like the training CLI
    import torch
    from motion.interpolate import interpolate
    from motion.predictor import PredictorConfig, SemanticMotionPredictor
    from motion.training import clip_loss

    def predict(model, a, b, frames):
        return model(interpolate(a, b, frames))

    def train_step(model, optimizer, clips):
        path = interpolate(clips[:, 0], clips[:, -1], clips.shape[1])
        loss = clip_loss(model(path), clips, 1.0, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paper = {"width": 1024, "layers": 8, "heads": 16, "max_frames": 64}
    tiny = {"width": 64, "layers": 2, "heads": 4, "max_frames": max(8, args.frames)}
    L = args.frames

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {L} frames per transition\n")
    print("| inference (one transition) | tokens x dim | interpolation ms | predictor ms | ratio |")
    print("|---|---|---|---|---|")
    for label, tokens, dim, kind in (("paper size, ViT-H pooled", 1, 1024, "pooled"),
                                     ("paper size, ViT-H penultimate", 257, 1280, "penultimate")):
        model = SemanticMotionPredictor(PredictorConfig(embed_dim=dim, tokens=tokens, kind=kind, **paper)).eval()
        a, b = torch.randn(tokens, dim), torch.randn(tokens, dim)
        interp_s = best_time(partial(interpolate, a, b, L), args.repeats)
        with torch.no_grad():
            model(interpolate(a, b, L))  # warm-up
            pred_s = best_time(partial(predict, model, a, b, L), args.repeats)
        print(f"| {label} | {tokens} x {dim} | {interp_s * 1e3:.3f} | {pred_s * 1e3:.1f} | {pred_s / interp_s:.0f}x |")

    print("\n| training | tokens x dim | clips/step | s/step | clips/s |")
    print("|---|---|---|---|---|")
    runs = [("paper size, ViT-H pooled", 1, 1024, "pooled", paper, args.batch),
            ("test size (tiny CLIP, pooled)", 1, 24, "pooled", tiny, 16)]
    if args.full:
        runs.append(("paper size, ViT-H penultimate", 257, 1280, "penultimate", paper, 1))
    for label, tokens, dim, kind, size, batch in runs:
        model = SemanticMotionPredictor(PredictorConfig(embed_dim=dim, tokens=tokens, kind=kind, **size))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        clips = torch.randn(batch, L, tokens, dim)

        step = partial(train_step, model, optimizer, clips)
        step()  # warm-up (allocates AdamW state)
        seconds = best_time(step, max(1, args.repeats if tokens == 1 else 1))
        print(f"| {label} | {tokens} x {dim} | {batch} | {seconds:.3f} | {batch / seconds:.1f} |")


if __name__ == "__main__":
    main()
