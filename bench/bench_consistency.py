"""Story Consistency speed: one batched encode of every panel against one encode per panel, at real size.

    .harness/venv/bin/python bench/bench_consistency.py [--model vit-l|vit-h] [--panels 40] [--size 512] [--quick]

The encoder is core's ClipVisionModel built from ComfyUI's own ViT-L/14 (or ViT-H/14) config with random weights
(tiny_models.init_weights): the real widths and depth, so the same work as a downloaded file. Panels are
`--size` px squares (core's preprocessing resizes them to 224 px in both paths). Rows:
- batched: the node's encode (consistency.comfy_adapter.encode: every panel in one encode_image call);
- single: one encode_image call per panel, what a graph of one CLIP Vision Encode per panel does;
- scoring: the similarity matrix, per-character scores, report and heatmap from the embeddings (no encoder).
Ratios are from one run on one machine: `--rounds` rounds, the order of the two paths alternating from round to round
(batched first, then single first, ...) so drifting machine load hits both; each path's best round counts.
`--quick` = 8 panels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import comfy_env

comfy_env.import_comfy()
import tiny_models

CONFIGS = {"vit-l": "clip_vision_config_vitl.json", "vit-h": "clip_vision_config_h.json"}


def make_encoder(model: str):
    import comfy.clip_model
    import comfy.clip_vision

    path = os.path.join(os.path.dirname(comfy.clip_model.__file__), CONFIGS[model])
    encoder = comfy.clip_vision.ClipVisionModel(path)
    with torch.no_grad():
        tiny_models.init_weights(encoder.model, 0)
    return encoder


def story_of(panels: int):
    """Two characters taking turns, every fifth panel without a character."""
    from comfyui_storydiffusion.story.parse import parse_story

    lines = ["[NC] a street" if i % 5 == 4 else f"[{'Mia' if i % 2 == 0 else 'Leo'}] panel {i}" for i in range(panels)]
    return parse_story("[Mia] a woman\n[Leo] a man", "\n".join(lines))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="vit-l")
    parser.add_argument("--panels", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both paths (best round counts)")
    parser.add_argument("--quick", action="store_true", help="8 panels")
    args = parser.parse_args()
    panels_n = 8 if args.quick else args.panels
    comfy_env.import_pack()
    from comfyui_storydiffusion.consistency import comfy_adapter
    from comfyui_storydiffusion.consistency.heatmap import Group, render_heatmap
    from comfyui_storydiffusion.consistency.score import format_report, score_story

    encoder = make_encoder(args.model)
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(panels_n, 3, 6, 6, generator=g)
    panels = torch.nn.functional.interpolate(grid, size=(args.size, args.size), mode="bilinear").movedim(1, -1)
    story = story_of(panels_n)

    def batched():
        return comfy_adapter.encode(encoder, [panels], True)

    def single():
        return [encoder.encode_image(panels[i:i + 1])["image_embeds"] for i in range(panels_n)]

    times: dict = {"batched": [], "single": []}
    with torch.no_grad():
        encoder.encode_image(panels[:1])  # warm-up
        for r in range(args.rounds):
            for name in (("batched", "single") if r % 2 == 0 else ("single", "batched")):
                seconds, value = timed(batched if name == "batched" else single)
                times[name].append(seconds)
                if name == "batched":
                    vectors, _, calls = value
                else:
                    singles = value
    batched_s, single_s = min(times["batched"]), min(times["single"])
    drift = float((torch.cat(singles).double() - vectors[0]).abs().max())

    def scoring():
        characters = [p.characters for p in story.panels]
        scores = score_story(vectors[0], characters, ["Mia", "Leo"])
        report = format_report(scores, "bench", panels_n)
        groups = [Group(c.name, c.rows, c.name) for c in scores.characters]
        picture = render_heatmap(scores.matrix.numpy(), panels.numpy(), [str(i) for i in range(panels_n)], groups,
                                 "bench")
        return report, picture

    scoring_s, (_, picture) = timed(scoring)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.model} random weights, "
          f"{panels_n} panels of {args.size} px, best of {args.rounds} round(s)\n")
    print("| path | encode calls | s | ratio to batched |")
    print("|---|---:|---:|---:|")
    print(f"| batched (the node) | {calls} | {batched_s:.2f} | 1.00 |")
    print(f"| one encode per panel | {panels_n} | {single_s:.2f} | {single_s / batched_s:.2f} |")
    print(f"| scoring + report + heatmap ({picture.shape[1]}x{picture.shape[0]} px) | 0 | {scoring_s:.2f} | "
          f"{scoring_s / batched_s:.3f} |")
    print(f"\nrounds (s): batched {', '.join(f'{t:.1f}' for t in times['batched'])}; "
          f"single {', '.join(f'{t:.1f}' for t in times['single'])}")
    print(f"largest difference between batched and single embeddings: {drift:.2e}")
    print(json.dumps({"model": args.model, "panels": panels_n, "single_vs_batched": round(single_s / batched_s, 3),
                      "scoring_vs_batched": round(scoring_s / batched_s, 4), "embedding_drift": drift,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
