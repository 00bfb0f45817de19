"""Command line: train a Semantic Motion Predictor on a folder of videos.

    python -m motion.train --videos DIR --clip-vision FILE --out FILE [--kind pooled] [--steps 2000]

Run it from the pack folder (ComfyUI/custom_nodes/<pack>). ComfyUI is needed only to load the CLIP
vision file with its own loader, so the embeddings match what the nodes see; the training loop itself
is training.py (plain torch).
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import torch

if __package__ in (None, "", "motion"):
    # Run from the pack folder, the pack is no package: load it as one (without its ComfyUI entry point)
    # so that the relative imports below, and those of the modules they import, resolve.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _pack = types.ModuleType("storydiffusion_pack")
    _pack.__path__ = [_root]
    sys.modules.setdefault("storydiffusion_pack", _pack)
    __package__ = "storydiffusion_pack.motion"

from . import comfy_adapter
from .training import TrainOptions, TrainResult, train


def parse_args(argv=None) -> argparse.Namespace:
    d = TrainOptions()
    p = argparse.ArgumentParser(prog="python -m motion.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, help="folder of training videos (searched recursively)")
    p.add_argument("--clip-vision", required=True, help="CLIP vision .safetensors (the one the nodes will use)")
    p.add_argument("--out", required=True, help="predictor file to write, e.g. models/storydiffusion/motion.safetensors")
    p.add_argument("--kind", choices=("penultimate", "pooled"), default=d.kind,
                   help="penultimate hidden states (IP-Adapter plus) or pooled image_embeds (plain IP-Adapter)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per training clip")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--min-stride", type=int, default=d.min_stride)
    p.add_argument("--max-stride", type=int, default=d.max_stride)
    p.add_argument("--frame-step", type=int, default=d.frame_step, help="keep every n-th video frame")
    p.add_argument("--max-video-frames", type=int, default=d.max_video_frames)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--width", type=int, default=d.model["width"])
    p.add_argument("--layers", type=int, default=d.model["layers"])
    p.add_argument("--heads", type=int, default=d.model["heads"])
    p.add_argument("--max-frames", type=int, default=d.model["max_frames"])
    p.add_argument("--cache", default=None, help="embedding cache folder (default: <out>.cache)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing <out>.ckpt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or the one holding this pack)")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(kind=args.kind, frames=args.frames, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup, seed=args.seed, min_stride=args.min_stride, max_stride=args.max_stride,
                        frame_step=args.frame_step, max_video_frames=args.max_video_frames,
                        checkpoint_every=args.checkpoint_every, device=args.device,
                        model={"width": args.width, "layers": args.layers, "heads": args.heads,
                               "max_frames": args.max_frames})


def _tqdm_progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None, None
    bar = tqdm(total=total, desc="training", unit="step")

    def update(step, _total, loss):
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.refresh()

    return update, bar


def main(argv=None) -> TrainResult:
    args = parse_args(argv)
    comfy_adapter.import_comfy(args.comfyui, cpu=args.device == "cpu")
    clip_vision = comfy_adapter.load_clip_vision_file(args.clip_vision)
    stat = os.stat(args.clip_vision)
    tag = f"{os.path.abspath(args.clip_vision)}:{stat.st_size}:{int(stat.st_mtime)}"
    options = options_from_args(args)
    progress, bar = _tqdm_progress(options.steps)
    try:
        return train(args.videos, comfy_adapter.clip_vision_encoder(clip_vision, options.kind), args.out, options,
                     encoder_tag=tag, cache_dir=args.cache, resume=not args.no_resume, progress=progress)
    finally:
        if bar is not None:
            bar.close()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # user errors: the message, not a stack trace
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
