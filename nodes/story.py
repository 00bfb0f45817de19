"""Story node: characters + one line per panel -> batched conditioning, captions and the STORY map."""
from __future__ import annotations

import dataclasses
import logging

from ..common.sockets import CATEGORY, PANELS_TYPE, STORY_TYPE
from ..story import comfy_adapter
from ..story.model import PanelSelection
from ..story.order import in_story_order
from ..story.parse import parse_story
from ..story.share import participant_rows
from ..story.styles import NO_STYLE, STYLE_NAMES, apply_style, style_negative

EXAMPLE_CHARACTERS = "[Mia] a young woman with short red hair, green raincoat\n[Leo] an old man with a white beard, blue sweater"
EXAMPLE_PANELS = (
    "[Mia] waits at a rainy bus stop # Monday, again.\n"
    "[Mia] and [Leo] share an umbrella on the bus # \"Is this seat taken?\"\n"
    "[NC] a bus driving through a rainy city at night\n"
    "[Leo] smiles and waves goodbye # See you tomorrow."
)

log = logging.getLogger(__name__)


class StoryDiffusionStory:
    DESCRIPTION = (
        "Turns a story into one prompt per panel. Define characters as '[Name] description' lines, then "
        "write one panel per line: '[Name]' puts a character in the panel (its description replaces the tag), "
        "'[NC]' marks a panel without characters, and text after '#' is the caption shown on the comic page. "
        "Outputs batched conditioning (one entry per panel, in order) for a latent batch of 'panel_count' "
        "images, and the STORY map the consistent attention node uses to share features between panels "
        "that show the same character."
    )
    CATEGORY = f"{CATEGORY}/story"
    FUNCTION = "build"
    # Whole-batch Consistent Self-Attention samples every panel in one latent batch, so activation memory
    # grows with the panel count; past this many panels the identity-bank route is the one to use.
    BANK_ROUTE_PANELS = 8
    BANK_ROUTE_ADVICE = (
        f"for more than {BANK_ROUTE_PANELS} panels, sample the identity panels with Identity Bank Write and "
        f"the rest with Identity Bank Read (see the story_characters workflow)")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "STRING", STORY_TYPE, "INT")
    RETURN_NAMES = ("positive", "negative", "captions", "story", "panel_count")
    OUTPUT_TOOLTIPS = (
        "One positive prompt per panel, as a batch: connect to the sampler with a latent batch of panel_count.",
        "The style's negative prompt plus yours, repeated for every panel.",
        "The panel captions, one line per panel (blank line = no caption): connect to the comic page node.",
        ("Which characters each panel shows and which panels are identity panels: connect to the consistent "
         "attention node."),
        "The number of panels: connect to the batch_size of Empty Latent Image.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder(s) of your model: a checkpoint's CLIP (SD1.5, "
                                          "SDXL), or a CLIP loader's output for a DiT (Flux, SD3, Chroma, Qwen-Image, "
                                          "Z-Image, Lumina 2). T5/LLM panels are padded the encoder's way."}),
                "characters": ("STRING", {
                    "multiline": True, "default": EXAMPLE_CHARACTERS,
                    "tooltip": "One character per line: '[Name] description'. Any number of characters. "
                               "With a single character, panels that name nobody show that character."}),
                "panels": ("STRING", {
                    "multiline": True, "default": EXAMPLE_PANELS,
                    "tooltip": "One panel per line. '[Name]' is replaced by the character's description; "
                               "'[NC]' = no character; 'what is drawn # caption' adds a caption. "
                               "Prompt weighting like (word:1.2) works as in CLIP Text Encode; \\[ \\] are literal brackets. "
                               "Sampled as one latent batch, every panel adds to the sampler's memory: "
                               + cls.BANK_ROUTE_ADVICE + "."}),
                "style": (list(STYLE_NAMES), {
                    "default": NO_STYLE,
                    "tooltip": "Style preset: wraps every panel prompt in a style template and adds the style's "
                               "negative prompt."}),
                "negative": ("STRING", {
                    "multiline": True, "default": "bad anatomy, deformed, extra limbs, blurry, watermark, text",
                    "tooltip": "Negative prompt for every panel (added after the style's own negative prompt)."}),
                "identity_panels": ("INT", {
                    "default": 3, "min": 1, "max": 64,
                    "tooltip": "Per character, how many of the first panels showing it are identity panels: "
                               "generated together first so the character's look is fixed there and read by "
                               "the other panels."}),
            }
        }

    def build(self, clip, characters, panels, style, negative, identity_panels):
        story = parse_story(characters, panels, identity_panels=identity_panels)
        styled = tuple(dataclasses.replace(p, prompt=apply_style(style, p.prompt)) for p in story.panels)
        story = dataclasses.replace(story, panels=styled)
        prompts = [p.prompt for p in styled]
        if len(prompts) > self.BANK_ROUTE_PANELS:
            log.warning("StoryDiffusion Story: %d panels. Sampled together, whole-batch Consistent Self-Attention "
                        "keeps every panel in one latent batch, so the sampler's memory grows with the panel "
                        "count; %s.", len(prompts), self.BANK_ROUTE_ADVICE)
        positive = comfy_adapter.encode_panels(clip, prompts, lines=[p.line for p in styled],
                                               progress=comfy_adapter.progress_bar(len(prompts)))
        negative_cond = comfy_adapter.repeat_conditioning(
            comfy_adapter.encode_prompt(clip, style_negative(style, negative)), len(prompts))
        captions = "\n".join(p.caption for p in styled)
        return positive, negative_cond, captions, story, len(prompts)


class StoryDiffusionSelectPanels:
    DESCRIPTION = (
        "Picks some panels out of the Story node's conditioning batches, so a KSampler can sample only those: "
        "the identity panels (for 'Identity Bank Write'), every other panel, or a range of panels (for "
        "'Identity Bank Read', a few panels at a time). Outputs the batch size to use, the story index of the "
        "first panel and which story panels were picked (for 'Panels In Story Order'). Several machines "
        "(ComfyUI-Distributed): participant and participants give each machine its share of the selection, and "
        "the latent output starts every panel from the noise of its story index, so the panels do not depend on "
        "how the story is split."
    )
    CATEGORY = f"{CATEGORY}/story"
    FUNCTION = "select"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "INT", "INT", PANELS_TYPE, "LATENT")
    RETURN_NAMES = ("positive", "negative", "panel_count", "first_panel", "panels", "latent")
    OUTPUT_TOOLTIPS = (
        "The selected panels' positive conditioning, in story order.",
        "The selected panels' negative conditioning.",
        "How many panels were selected: connect to the batch_size of Empty Latent Image.",
        "Story index of the first selected panel: connect to 'first_panel' of Identity Bank Read.",
        ("Which story panel each selected row is: connect to 'Panels In Story Order' next to the images this "
         "run decodes, so runs can be joined back in story order (with several participants: next to the "
         "Distributed Collector's images)."),
        ("One latent per selected panel, each drawing its noise by its story index (needs the latent input): "
         "connect to the KSampler instead of an Empty Latent Image of panel_count."),
    )
    # appended only: saved workflows store these values
    SELECTIONS = ("identity panels", "panel range", "panels that are not identity panels")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The positive output of the Story node."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative output of the Story node."}),
                "story": (STORY_TYPE, {"tooltip": "The story output of the Story node."}),
                "select": (list(cls.SELECTIONS), {
                    "default": cls.SELECTIONS[0],
                    "tooltip": "'identity panels': the panels the story marks as identity panels (sample them with "
                               "the Identity Bank Write model). 'panel range': first_panel and count below. "
                               "'panels that are not identity panels': every other panel, in story order "
                               "(sample them with the Identity Bank Read model)."}),
                "first_panel": ("INT", {"default": 0, "min": 0, "max": 10000,
                                        "tooltip": "For 'panel range': story index (0-based) of the first panel."}),
                "count": ("INT", {"default": 0, "min": 0, "max": 10000,
                                  "tooltip": "For 'panel range': how many panels; 0 = up to the end of the story."}),
            },
            "optional": {
                "participant": ("INT", {
                    "default": 0, "min": 0, "max": 1024,
                    "tooltip": "Several machines (ComfyUI-Distributed): which machine this is. Connect Distributed "
                               "Seed with its seed set to 0: it gives the master 0 and the workers 1, 2, ..."}),
                "participants": ("INT", {
                    "default": 1, "min": 1, "max": 1024,
                    "tooltip": "How many machines share the selection: the master plus every enabled worker (1 = "
                               "this machine samples all of it). Each takes a contiguous share; Panels In Story "
                               "Order puts the Distributed Collector's images back in story order."}),
                "latent": ("LATENT", {
                    "tooltip": "An Empty Latent Image with batch_size 1 (the panel size): the latent output then "
                               "holds one latent per selected panel whose noise is drawn by its story index, so a "
                               "panel is the same whichever machine or batch samples it."}),
            },
        }

    def select(self, positive, negative, story, select, first_panel, count, participant=0, participants=1,
               latent=None):
        total = len(story)
        if select == self.SELECTIONS[0]:
            rows = list(story.identity_rows)
            if not rows:
                raise ValueError("the story has no identity panels: it names no character (only [NC] panels?)")
        elif select == self.SELECTIONS[2]:
            rows = list(story.other_rows)
            if not rows:
                raise ValueError(f"every one of the story's {total} panels is an identity panel, so there are no "
                                 f"other panels to select: lower identity_panels on the Story node, or sample "
                                 f"only the identity panels")
        elif select == self.SELECTIONS[1]:
            if first_panel >= total:
                raise ValueError(f"first_panel {first_panel} is past the end of the story ({total} panels, 0-{total - 1})")
            end = total if count == 0 else first_panel + count
            if end > total:
                raise ValueError(f"panels {first_panel}-{end - 1} were asked for but the story has {total} panels "
                                 f"(0-{total - 1}): lower first_panel or count")
            rows = list(range(first_panel, end))
        else:
            raise ValueError(f"unknown selection {select!r}; choose one of {list(self.SELECTIONS)}")
        selection = PanelSelection(rows=tuple(rows), story_length=total)
        if participants > 1:
            share = participant_rows(rows, participant, participants)
            selection = PanelSelection(share, total, split_rows=tuple(rows), participant=participant,
                                       participants=participants)
        elif participant != 0:
            raise ValueError(f"participant is {participant} but participants is 1: set participants to the number "
                             f"of machines (the master plus the enabled ComfyUI-Distributed workers)")
        rows = list(selection.rows)
        return (comfy_adapter.select_rows(positive, rows), comfy_adapter.select_rows(negative, rows), len(rows),
                rows[0], selection, comfy_adapter.panel_latent(latent, selection.rows))


class StoryDiffusionStoryOrder:
    DESCRIPTION = (
        "Joins the images of panels sampled in separate runs (for example the identity panels, then the other "
        "panels) into one batch in story order. Connect each run's decoded images with the 'panels' output of "
        "the Select Story Panels node that picked its conditioning. Every story panel must be given exactly "
        "once (or turn on allow_gaps), and all images must have the same size. A selection split among "
        "machines (participants > 1) takes the Distributed Collector's images, every machine's share; if a "
        "share is missing (a worker offline at the start) it stops and names the missing panels."
    )
    CATEGORY = f"{CATEGORY}/story"
    FUNCTION = "join"
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("images", "count")
    OUTPUT_TOOLTIPS = (
        "Every image at its story index (panel 0 first): connect to the comic page node or Save Image.",
        "How many images the batch has (the story's panel count unless allow_gaps left some out).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        def pair(name, run):
            return {
                f"images_{name}": ("IMAGE", {"tooltip": f"The decoded images of the {run} run, one per selected panel."}),
                f"panels_{name}": (PANELS_TYPE, {
                    "tooltip": f"The 'panels' output of the Select Story Panels node that picked the {run} run's "
                               f"conditioning."}),
            }

        return {
            "required": {
                **pair("a", "first (e.g. identity panels)"),
                **pair("b", "second (e.g. the other panels)"),
                "allow_gaps": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: every story panel must be in one of the inputs, and a missing one is an error "
                               "naming it. On: join only the panels given, in story order."}),
            },
            "optional": pair("c", "optional third"),
        }

    def join(self, images_a, panels_a, images_b, panels_b, allow_gaps, images_c=None, panels_c=None):
        parts = [("a", images_a, panels_a), ("b", images_b, panels_b)]
        if (images_c is None) != (panels_c is None):
            given, absent = ("images_c", "panels_c") if panels_c is None else ("panels_c", "images_c")
            raise ValueError(f"{given} is connected but {absent} is not: connect both or neither")
        if images_c is not None:
            parts.append(("c", images_c, panels_c))
        images, rows = in_story_order(parts, allow_gaps=allow_gaps)
        return images, len(rows)


NODE_CLASS_MAPPINGS = {"StoryDiffusionStory": StoryDiffusionStory, "StoryDiffusionSelectPanels": StoryDiffusionSelectPanels,
                       "StoryDiffusionStoryOrder": StoryDiffusionStoryOrder}
NODE_DISPLAY_NAME_MAPPINGS = {"StoryDiffusionStory": "Story: panels + captions (StoryDiffusion)",
                              "StoryDiffusionSelectPanels": "Select Story Panels (StoryDiffusion)",
                              "StoryDiffusionStoryOrder": "Panels In Story Order (StoryDiffusion)"}
