"""Batch Images: join 2 to 8 IMAGE batches into one, in input order (replaces core ImageBatch, which
ComfyUI 0.8 marks deprecated and whose replacement does not exist in 0.3.x)."""
from __future__ import annotations

from ..common.sockets import CATEGORY
from ..story import batch

MAX_INPUTS = 8


class StoryDiffusionBatchImages:
    DESCRIPTION = (
        "Joins 2 to 8 image batches into one batch, in input order (image1's images first). All images take "
        "image1's size: an input of another size is scaled to cover it (aspect ratio kept) and centre-cropped, "
        "with a warning in the log. Use it to join panels from separate runs, or reference photos."
    )
    CATEGORY = f"{CATEGORY}/image"
    FUNCTION = "join"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("All connected images as one batch, in input order, at image1's size.",)

    @classmethod
    def INPUT_TYPES(cls):
        optional = {
            f"image{i}": ("IMAGE", {"tooltip": f"Optional: more images, added after image{i - 1}'s. Resized to "
                                               "image1's size (cover + centre crop) when they differ."})
            for i in range(3, MAX_INPUTS + 1)
        }
        return {
            "required": {
                "image1": ("IMAGE", {"tooltip": "The first images of the batch; they set the size of every image."}),
                "image2": ("IMAGE", {"tooltip": "Images added after image1's. Resized to image1's size (cover + "
                                                "centre crop, with a warning in the log) when they differ."}),
            },
            "optional": optional,
        }

    def join(self, image1, image2, **more):
        inputs = [("image1", image1), ("image2", image2)]
        inputs += [(f"image{i}", more[f"image{i}"]) for i in range(3, MAX_INPUTS + 1)
                   if more.get(f"image{i}") is not None]
        return (batch.join_batches(inputs),)


NODE_CLASS_MAPPINGS = {"StoryDiffusionBatchImages": StoryDiffusionBatchImages}
NODE_DISPLAY_NAME_MAPPINGS = {"StoryDiffusionBatchImages": "Batch Images (StoryDiffusion)"}
