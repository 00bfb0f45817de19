"""Story consistency (plain torch + Pillow): per-character self/cross cosine similarity of image embeddings,
the readable report and the panel x panel heatmap. consistency/comfy_adapter.py encodes the images with a
ComfyUI CLIP_VISION model."""
