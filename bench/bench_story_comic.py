"""Story node encoding cost versus core CLIPTextEncode, and comic page rendering speed.

    .harness/venv/bin/python bench/bench_story_comic.py [--panels 12] [--repeats 3]

Encoding: the story node's positive output for N panels against N separate core CLIPTextEncode calls
on the same styled prompts (what a user would otherwise wire by hand), with a tiny SD1.5 CLIP and the
real tokenizer. Ratio = story node time / core time (the node also parses, styles, encodes the
negative and stacks the batch). Runs are interleaved, best of `--repeats`.

Pages: StoryDiffusionComicPage on N 512x512 panels with captions (classic comic, 2x2, 1536 px wide):
seconds per page, first run (glyph coverage probing) and warm.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--panels", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import comfy_env

    comfy_env.import_comfy()
    pack = comfy_env.import_pack()
    import nodes
    import torch

    import tiny_models
    from comfyui_storydiffusion.story.parse import parse_story
    from comfyui_storydiffusion.story.styles import apply_style

    clip = tiny_models.make_clip("sd15")
    characters = "[Mia] a girl with red hair, green raincoat\n[Leo] an old man with a white beard, blue sweater"
    panels = "\n".join(f"[{'Mia' if i % 3 else 'Leo'}] scene {i}, walking through the city in the rain # Caption "
                       f"number {i}: the story goes on and on." for i in range(args.panels))
    story_node = pack.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]()
    prompts = [apply_style("Comic book", p.prompt) for p in parse_story(characters, panels).panels]

    def ours():
        return story_node.build(clip, characters, panels, "Comic book", "blurry", 3)

    def core():
        return [nodes.CLIPTextEncode().encode(clip, p) for p in prompts]

    best = {"ours": float("inf"), "core": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("core", core)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)

    comic_node = pack.NODE_CLASS_MAPPINGS["StoryDiffusionComicPage"]()
    images = torch.rand(args.panels, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    captions = ours()[2]

    def pages():
        return comic_node.compose(images, captions, "classic comic", 2, 2, 1536, 0, 32, 16, "#ffffff",
                                  "below panel", 0.18, 40, 3, 0)[0]

    start = time.perf_counter()
    count = pages().shape[0]
    first = (time.perf_counter() - start) / count
    warm = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        pages()
        warm = min(warm, (time.perf_counter() - start) / count)

    print(f"| measure ({args.panels} panels) | value |")
    print("| --- | --- |")
    print(f"| story node / N x core CLIPTextEncode (time ratio) | {best['ours'] / best['core']:.2f} |")
    print(f"| story node, ms per panel | {1000 * best['ours'] / args.panels:.1f} |")
    print(f"| comic page, first run, s per page ({count} pages) | {first:.3f} |")
    print(f"| comic page, warm, s per page | {warm:.3f} |")


if __name__ == "__main__":
    main()
