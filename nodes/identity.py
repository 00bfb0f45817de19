"""PhotoMaker v1 nodes: load the file, apply its LoRA, bind characters' photos, fuse them into prompts."""
from __future__ import annotations

from ..common.sockets import CATEGORY, CHARACTERS_TYPE, PHOTOMAKER_TYPE, STORY_TYPE
from ..identity import comfy_adapter

SUBCATEGORY = f"{CATEGORY}/identity"

TRIGGER_TOOLTIP = ("The word written right after the class word in the prompt ('a man img'). It is removed from the "
                   "prompt; the class word before it carries the identity. PhotoMaker's default is 'img'.")


class PhotoMakerLoader:
    DESCRIPTION = ("Loads a PhotoMaker v1 file (photomaker-v1.bin or .safetensors) from models/photomaker: the ID "
                   "encoder (CLIP ViT-L/14 + fuse MLP) and its UNet LoRA. Nothing is downloaded.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = (PHOTOMAKER_TYPE,)
    RETURN_NAMES = ("photomaker",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"photomaker_name": (comfy_adapter.photomaker_files(), {
            "tooltip": "A PhotoMaker v1 file in ComfyUI/models/photomaker (e.g. photomaker-v1.bin)."})}}

    def load(self, photomaker_name):
        return (comfy_adapter.load_from_folder(photomaker_name),)


class PhotoMakerApplyLoRA:
    DESCRIPTION = ("Patches the LoRA stored inside the PhotoMaker file into an SDXL MODEL (no conversion step). "
                   "PhotoMaker's identity fuse was trained with it; strength 1 is the reference setting.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SDXL model; it is cloned, never modified."}),
            "photomaker": (PHOTOMAKER_TYPE, {"tooltip": "From the StoryDiffusion PhotoMaker Loader."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "LoRA strength: 1 as trained, 0 leaves the model unchanged."}),
        }}

    def apply(self, model, photomaker, strength):
        if strength == 0:
            return (model,)
        return (comfy_adapter.apply_lora(model, photomaker, strength),)


class PhotoMakerCharacter:
    DESCRIPTION = ("Binds one story character's reference photos and trigger word. Chain several for a story with "
                   "several people; the Fuse node gives each panel the photos of the characters it names.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = (CHARACTERS_TYPE,)
    RETURN_NAMES = ("characters",)
    FUNCTION = "bind"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "name": ("STRING", {"default": "", "tooltip": "The character's name exactly as in the story's characters "
                                                          "text ([Tom] …). Leave empty to use it for every prompt."}),
            "images": ("IMAGE", {"tooltip": "1..N photos of this one person (any size; resized and centre-cropped "
                                            "to 224 px). Each photo adds one copy of the class word."}),
            "trigger_word": ("STRING", {"default": "img", "tooltip": TRIGGER_TOOLTIP + " This node owns the trigger word "
                                                                "of this person; PhotoMaker Fuse's trigger_word only "
                                                                "applies to photos linked straight to its 'images'."}),
        }, "optional": {
            "characters": (CHARACTERS_TYPE, {"tooltip": "Characters bound so far (chain the nodes)."}),
        }}

    def bind(self, name, images, trigger_word, characters=None):
        name = name.strip()
        if images is None or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"character {name or '(unnamed)'}: the reference IMAGE batch is empty.")
        previous = tuple(characters or ())
        if any(r.name == name for r in previous):
            raise ValueError(f"character {name or '(unnamed)'} is bound twice: each PhotoMaker Character node "
                             "needs its own name.")
        if not trigger_word.strip() or len(trigger_word.split()) != 1:
            raise ValueError(f"character {name or '(unnamed)'}: the trigger word must be one word, got {trigger_word!r}.")
        return (previous + (comfy_adapter.Reference(name, images, trigger_word.strip()),),)


class PhotoMakerFuse:
    DESCRIPTION = ("Encodes a prompt (or every panel of a STORY) with an SDXL CLIP and fuses the reference photos "
                   "into the class word before the trigger ('a man img'), as PhotoMaker v1 does. Several photos "
                   "repeat the class word. 'start_merge' keeps the plain prompt for the first part of the steps "
                   "(as conditioning timestep ranges). Panels without a trigger word pass through unchanged.")
    CATEGORY = SUBCATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "An SDXL CLIP (PhotoMaker v1 is SDXL-only)."}),
            "photomaker": (PHOTOMAKER_TYPE, {"tooltip": "From the StoryDiffusion PhotoMaker Loader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "a photo of a man img",
                                "tooltip": "The prompt, with the trigger word right after the class word. Ignored "
                                           "when a story is connected (its panels are the prompts)."}),
            "trigger_word": ("STRING", {"default": "img", "tooltip": TRIGGER_TOOLTIP + " Only used with 'images' "
                                                                "(disabled otherwise): PhotoMaker Character nodes carry "
                                                                "their own trigger word."}),
            "start_merge": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Fraction of the steps that use the text-only prompt before the "
                                                 "fused one (PhotoMaker's start_merge_step / steps; its demo uses "
                                                 "0.2 for stylised images). 0 = fused from the first step."}),
        }, "optional": {
            "images": ("IMAGE", {"tooltip": "Reference photos of one person, used with 'trigger_word' in every "
                                            "prompt. Use PhotoMaker Character nodes for several people."}),
            "characters": (CHARACTERS_TYPE, {"tooltip": "Characters bound with PhotoMaker Character nodes."}),
            "story": (STORY_TYPE, {"tooltip": "A story: one conditioning row per panel; each panel gets the photos "
                                              "of the characters it names."}),
        }}

    def fuse(self, clip, photomaker, text, trigger_word, start_merge, images=None, characters=None, story=None):
        references = tuple(characters or ())
        if images is not None:
            if images.ndim != 4 or images.shape[0] == 0:
                raise ValueError("the reference IMAGE batch is empty: connect 1 or more photos of the person.")
            references = (comfy_adapter.Reference("", images, trigger_word.strip()),) + references
        if not references:
            raise ValueError("no reference photos: connect 'images' or PhotoMaker Character nodes.")
        if story is None:
            jobs = [comfy_adapter.PromptJob(text, "the prompt", references, require_trigger=True)]
        else:
            jobs = _story_jobs(story, references)
        return (comfy_adapter.encode(clip, photomaker, jobs, start_merge),)


def _story_jobs(story, references) -> list:
    """One job per panel: unnamed references apply to every panel, named ones to panels naming them."""
    known = {c.name for c in story.characters}
    unknown = sorted(r.name for r in references if r.name and r.name not in known)
    if unknown:
        raise ValueError(f"PhotoMaker characters {unknown} are not in the story (its characters: {sorted(known)}): "
                         "use the names of the story's characters text.")
    if not story.panels:
        raise ValueError("the story has no panels.")
    jobs = []
    for index, panel in enumerate(story.panels):
        refs = [r for r in references if not r.name]
        refs += sorted((r for r in references if r.name in panel.characters),
                       key=lambda r: panel.characters.index(r.name))
        where = f"panel {index + 1}" + (f" (line {panel.line})" if panel.line else "")
        jobs.append(comfy_adapter.PromptJob(panel.prompt, where, tuple(refs), require_trigger=False))
    return jobs


NODE_CLASS_MAPPINGS = {
    "StoryDiffusionPhotoMakerLoader": PhotoMakerLoader,
    "StoryDiffusionPhotoMakerApplyLoRA": PhotoMakerApplyLoRA,
    "StoryDiffusionPhotoMakerCharacter": PhotoMakerCharacter,
    "StoryDiffusionPhotoMakerFuse": PhotoMakerFuse,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "StoryDiffusionPhotoMakerLoader": "PhotoMaker Loader (StoryDiffusion)",
    "StoryDiffusionPhotoMakerApplyLoRA": "PhotoMaker Apply LoRA (StoryDiffusion)",
    "StoryDiffusionPhotoMakerCharacter": "PhotoMaker Character (StoryDiffusion)",
    "StoryDiffusionPhotoMakerFuse": "PhotoMaker Fuse (StoryDiffusion)",
}
