"""Nodes: load or train a Semantic Motion Predictor; predict the CLIP image embeddings of every in-between frame."""
from __future__ import annotations

from ..common.sockets import CATEGORY, EMBEDS_TYPE, PREDICTOR_TYPE
from ..motion import comfy_adapter
from ..motion.training import TrainOptions

MAX_FRAMES = 1024


class MotionPredictorLoader:
    DESCRIPTION = ("Loads a Semantic Motion Predictor (.safetensors, trained with `python -m motion.train`) from "
                   "models/storydiffusion, or 'none' for training-free interpolation between the panels' embeddings.")
    CATEGORY = f"{CATEGORY}/motion"
    RETURN_TYPES = (PREDICTOR_TYPE,)
    RETURN_NAMES = ("predictor",)
    OUTPUT_TOOLTIPS = ("The predictor (or 'none'), for the Semantic Motion Predictor node.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"predictor_name": ([comfy_adapter.NONE] + comfy_adapter.predictor_filenames(), {
            "tooltip": "A predictor file in models/storydiffusion (its config is stored in the file). "
                       "'none' = plain interpolation, no weights needed."})}}

    def load(self, predictor_name):
        return (comfy_adapter.load_predictor_by_name(predictor_name),)


class SemanticMotionPredictor:
    DESCRIPTION = ("StoryDiffusion stage 2: encodes the start and end frame with the CLIP vision model, interpolates "
                   "their embeddings to `frames` frames and refines them with the motion predictor. With no end image, "
                   "every adjacent pair of panels in the start batch becomes a transition; transitions are joined "
                   "(frames each). Feed the outputs to per-frame semantic conditioning (this pack's, or "
                   "IPAdapter_plus's 'IPAdapter Embeds Batch').")
    CATEGORY = f"{CATEGORY}/motion"
    RETURN_TYPES = ("CLIP_VISION_OUTPUT", EMBEDS_TYPE, "INT")
    RETURN_NAMES = ("clip_vision_output", "embeds", "total_frames")
    OUTPUT_TOOLTIPS = (
        ("Per-frame CLIP vision output (batch = total frames): the chosen embeddings are predicted, the other fields "
         "are interpolated the same way."),
        "The predicted embeddings in IPAdapter_plus's EMBEDS layout: [frames, D] pooled or [frames, tokens, D] penultimate.",
        "Number of frames produced (transitions x frames): the latent batch size to sample.",
    )
    FUNCTION = "predict"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model of the IP-Adapter that will use the "
                                                           "embeddings (ViT-H for most SD1.5 and 'vit-h' SDXL adapters)."}),
                "start": ("IMAGE", {"tooltip": "Start frame(s). With no end image: a batch of story panels, one "
                                               "transition per adjacent pair."}),
                "frames": ("INT", {"default": 16, "min": 2, "max": MAX_FRAMES,
                                   "tooltip": "Frames per transition, including its start and end frame (at least 2)."}),
                "interpolation": (["linear", "slerp"], {
                    "default": "linear",
                    "tooltip": "How embeddings are blended between start and end before the predictor refines them: "
                               "linear (the paper) or slerp (keeps each token's length and turns its direction)."}),
                "embeddings": (["penultimate", "pooled"], {
                    "default": "penultimate",
                    "tooltip": "penultimate_hidden_states for IP-Adapter plus/full-face; pooled image_embeds for plain "
                               "IP-Adapter. A loaded predictor must have been trained on the same kind."}),
            },
            "optional": {
                "end": ("IMAGE", {"tooltip": "End frame(s): start[i] -> end[i]; a single image pairs with all. Any size "
                                             "(each is resized and center-cropped by the CLIP preprocessing)."}),
                "predictor": (PREDICTOR_TYPE, {"tooltip": "From the Motion Predictor Loader. Not connected = "
                                                          "training-free interpolation."}),
                "crop": (["center", "none"], {"default": "center",
                                              "tooltip": "center: crop to a square before encoding (like CLIP Vision "
                                                         "Encode); none: squash the whole frame."}),
            },
        }

    def predict(self, clip_vision, start, frames, interpolation, embeddings, end=None, predictor=None, crop="center"):
        if frames < 2:
            raise ValueError(f"frames must be at least 2 (the start and the end frame), got {frames}.")
        output, embeds, transitions = comfy_adapter.predict_motion(clip_vision, start, end, int(frames), interpolation, embeddings,
                                                                   predictor, crop=crop == "center")
        return (output, embeds, transitions * int(frames))


class TrainMotionPredictor:
    DESCRIPTION = ("Trains a Semantic Motion Predictor on a folder of videos (the same as `python -m motion.train`) and "
                   "saves it to models/storydiffusion. Frames are encoded once with the CLIP vision model and cached; "
                   "an interrupted run resumes from its checkpoint. Reports validation loss next to the "
                   "linear-interpolation baseline.")
    CATEGORY = f"{CATEGORY}/motion"
    RETURN_TYPES = (PREDICTOR_TYPE, "STRING")
    RETURN_NAMES = ("predictor", "report")
    OUTPUT_TOOLTIPS = ("The trained predictor, ready for the Semantic Motion Predictor node.",
                       "Validation loss versus the linear-interpolation baseline.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the predictor will be used with."}),
            "videos_folder": ("STRING", {"default": "", "tooltip": "Absolute path of a folder of videos (.mp4, .avi, "
                                                                   ".mov, .mkv, .webm…), searched recursively."}),
            "predictor_name": ("STRING", {"default": "motion_predictor", "tooltip": "File name to write in "
                                                                                    "models/storydiffusion (.safetensors added)."}),
            "embeddings": (["penultimate", "pooled"], {"default": "penultimate", "tooltip": "Which CLIP output to "
                           "predict: penultimate for IP-Adapter plus, pooled for plain IP-Adapter."}),
            "clip_frames": ("INT", {"default": 16, "min": 3, "max": 256, "tooltip": "Frames per training clip "
                                                                                  "(start, in-betweens, end)."}),
            "steps": ("INT", {"default": 2000, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps."}),
            "batch_size": ("INT", {"default": 16, "min": 1, "max": 4096, "tooltip": "Clips per step."}),
            "learning_rate": ("FLOAT", {"default": 3e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                        "tooltip": "Peak AdamW learning rate (warm-up, then cosine decay)."}),
            "width": ("INT", {"default": 1024, "min": 8, "max": 8192, "tooltip": "Transformer width (paper: 1024)."}),
            "layers": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Transformer layers (paper: 8)."}),
            "heads": ("INT", {"default": 16, "min": 1, "max": 128, "tooltip": "Attention heads (must divide width)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Seed for initialisation and "
                                                                                    "clip sampling."}),
        }}

    def train(self, clip_vision, videos_folder, predictor_name, embeddings, clip_frames, steps, batch_size,
              learning_rate, width, layers, heads, seed):
        options = TrainOptions(kind=embeddings, frames=clip_frames, steps=steps, batch_size=batch_size,
                               lr=learning_rate, warmup=min(100, max(1, steps // 10)), seed=seed,
                               model={"width": width, "layers": layers, "heads": heads,
                                      "max_frames": max(64, clip_frames)})
        loaded, result = comfy_adapter.train_into_model_folder(clip_vision, videos_folder.strip(), predictor_name, options)
        report = result.summary()
        return {"ui": {"text": [report]}, "result": (loaded, report)}


NODE_CLASS_MAPPINGS = {
    "StoryDiffusionMotionPredictorLoader": MotionPredictorLoader,
    "StoryDiffusionSemanticMotionPredictor": SemanticMotionPredictor,
    "StoryDiffusionTrainMotionPredictor": TrainMotionPredictor,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StoryDiffusionMotionPredictorLoader": "Motion Predictor Loader (StoryDiffusion)",
    "StoryDiffusionSemanticMotionPredictor": "Semantic Motion Predictor (StoryDiffusion)",
    "StoryDiffusionTrainMotionPredictor": "Train Motion Predictor (StoryDiffusion)",
}
