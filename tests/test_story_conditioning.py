"""The story node's conditioning: one batch row per panel, each exactly what core CLIPTextEncode gives."""
from __future__ import annotations

import pytest
import torch

import tiny_models

CHARACTERS = "[Mia] a girl with red hair, (green raincoat:1.3)\n[Leo] an old man with a white beard"
PANELS = ("[Mia] waits at a bus stop # Monday.\n"
          "[Mia] and [Leo] on the bus # \"Is this seat taken?\"\n"
          "[NC] a bus in the rain at night")
LONG = "[Leo] " + ", ".join(f"detail number {i}" for i in range(22))  # > 77 tokens: two chunks


@pytest.fixture(scope="module")
def clips(pack):
    return {"sd15": tiny_models.make_clip("sd15", seed=1), "sdxl": tiny_models.make_clip("sdxl", seed=1)}


@pytest.fixture(scope="module")
def story_node(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]()


def core_encode(comfy_nodes, clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


@pytest.mark.parametrize("family,width,pooled", [("sd15", 64, 64), ("sdxl", 112, 48)])
def test_outputs_have_one_row_per_panel(story_node, clips, family, width, pooled):
    positive, negative, captions, story, count = story_node.build(
        clips[family], CHARACTERS, PANELS, "Comic book", "blurry", 2)
    assert count == 3 and len(story) == 3
    assert captions == "Monday.\n\"Is this seat taken?\"\n"
    assert [p.characters for p in story.panels] == [("Mia",), ("Mia", "Leo"), ()]
    assert story.identity_panels == {"Mia": (0, 1), "Leo": (1,)}
    assert all(p.prompt.startswith("comic book panel, ") for p in story.panels)  # styled prompts in the STORY
    for conditioning in (positive, negative):
        ((cond, extras),) = conditioning
        assert cond.shape == (3, 77, width)
        assert extras["pooled_output"].shape == (3, pooled)
        assert torch.isfinite(cond).all()
    assert not torch.equal(positive[0][0][0], positive[0][0][1])  # panels differ


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_each_row_is_core_clip_text_encode(comfy_nodes, story_node, clips, family):
    """Bit-identical to CLIPTextEncode per panel: weighting, pooled output and (absent) size keys alike."""
    clip = clips[family]
    positive, negative, _, story, _ = story_node.build(clip, CHARACTERS, PANELS, "Japanese Anime", "blurry", 3)
    ((cond, extras),) = positive
    for i, panel in enumerate(story.panels):
        ((core_cond, core_extras),) = core_encode(comfy_nodes, clip, panel.prompt)
        assert torch.equal(cond[i:i + 1], core_cond)
        assert set(extras) == set(core_extras)  # SDXL: no width/height added, as in core
        assert torch.equal(extras["pooled_output"][i:i + 1], core_extras["pooled_output"])
    from comfyui_storydiffusion.story.styles import style_negative

    ((core_neg, _),) = core_encode(comfy_nodes, clip, style_negative("Japanese Anime", "blurry"))
    assert all(torch.equal(negative[0][0][i:i + 1], core_neg) for i in range(3))
    # prompt weighting reaches the encoder: the same panel without the weight encodes differently
    ((unweighted, _),) = core_encode(comfy_nodes, clip, story.panels[0].prompt.replace("(green raincoat:1.3)",
                                                                                        "green raincoat"))
    assert not torch.equal(cond[0:1], unweighted)


def test_long_prompts_are_tiled_not_padded(comfy_nodes, story_node, clips):
    clip = clips["sd15"]
    positive, _, _, story, _ = story_node.build(clip, CHARACTERS, PANELS + "\n" + LONG, "(No style)", "", 3)
    ((cond, extras),) = positive
    assert cond.shape == (4, 154, 64)
    ((long_core, long_extras),) = core_encode(comfy_nodes, clip, story.panels[3].prompt)
    assert long_core.shape[1] == 154
    assert torch.equal(cond[3:4], long_core)
    assert torch.equal(extras["pooled_output"][3:4], long_extras["pooled_output"])
    ((short_core, _),) = core_encode(comfy_nodes, clip, story.panels[0].prompt)
    assert torch.equal(cond[0:1, :77], short_core) and torch.equal(cond[0:1, 77:], short_core)


def test_tiling_leaves_cross_attention_unchanged(pack):
    """Why tiling is the right padding: duplicated keys/values give the same attention output exactly
    (up to float rounding), while padding with other tokens (e.g. an empty prompt) changes it."""
    import comfy.ops
    from comfy.ldm.modules.attention import CrossAttention

    attention = CrossAttention(query_dim=32, context_dim=64, heads=2, dim_head=16,
                               operations=comfy.ops.disable_weight_init)
    tiny_models.init_weights(attention, seed=5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 32, generator=gen)
    context = torch.randn(1, 77, 64, generator=gen)
    other = torch.randn(1, 77, 64, generator=gen)
    with torch.no_grad():
        alone = attention(x, context=context)
        tiled = attention(x, context=context.repeat(1, 2, 1))
        padded = attention(x, context=torch.cat([context, other], dim=1))
    assert torch.allclose(alone, tiled, atol=1e-5)
    assert (alone - padded).abs().max() > 1e-2


def test_chunk_counts_without_a_reasonable_common_length_are_refused(pack):
    from comfyui_storydiffusion.story import comfy_adapter

    assert comfy_adapter.common_token_length([77, 154, 231]) == 462
    assert comfy_adapter.common_token_length([77 * 20, 77 * 20]) == 77 * 20  # equal lengths: no limit
    with pytest.raises(comfy_adapter.ConditioningError, match=r"line 4: 385 tokens.*line 9: 539 tokens"):
        comfy_adapter.common_token_length([385, 539], lines=[4, 9])


def test_each_latent_gets_its_own_panel_prompt(comfy_nodes, story_node, pack):
    """Sampling a 2-latent batch: row 0 matches sampling with panel 0's prompt alone; row 1 does not."""
    clip = tiny_models.make_clip("sd15", seed=2)
    model = tiny_models.make_model("sd15", seed=2)
    positive, negative, _, story, count = story_node.build(
        clip, "[Mia] a girl", "[Mia] swims in the sea\n[NC] a red car on fire, explosion", "(No style)", "", 1)
    latent = {"samples": torch.zeros(count, 4, 8, 8)}

    def sample(pos):
        return comfy_nodes.common_ksampler(model, 11, 1, 4.0, "euler", "normal", pos, negative, latent)[0]["samples"]

    batched = sample(positive)
    first_only = sample(core_encode(comfy_nodes, clip, story.panels[0].prompt))
    assert torch.allclose(batched[0], first_only[0], atol=1e-5)
    assert (batched[1] - first_only[1]).abs().max() > 1e-3
    assert torch.equal(batched, sample(positive))  # deterministic


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_select_panels_picks_story_rows(comfy_nodes, story_node, clips, family):
    """Identity panels / a panel range: exactly those rows of every batched tensor, other keys kept."""
    select = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionSelectPanels"]()
    panels = PANELS + "\n[Leo] reads a newspaper\n[Mia] runs in the rain"
    positive, negative, _, story, _ = story_node.build(clips[family], CHARACTERS, panels, "(No style)", "", 1)
    assert story.identity_panels == {"Mia": (0,), "Leo": (1,)}
    ((cond, extras),) = positive
    for choice, first, n, rows in [("identity panels", 0, 0, [0, 1]), ("panel range", 2, 0, [2, 3, 4]),
                                   ("panel range", 3, 1, [3])]:
        pos, neg, picked, first_out, *_ = select.select(positive, negative, story, choice, first, n)
        assert (picked, first_out) == (len(rows), rows[0])
        ((p_cond, p_extras),), ((n_cond, _),) = pos, neg
        assert torch.equal(p_cond, cond[rows]) and torch.equal(p_extras["pooled_output"], extras["pooled_output"][rows])
        assert set(p_extras) == set(extras) and n_cond.shape[0] == len(rows)
    with pytest.raises(ValueError, match="past the end of the story"):
        select.select(positive, negative, story, "panel range", 5, 0)
    with pytest.raises(ValueError, match="panels 3-5 were asked for but the story has 5 panels"):
        select.select(positive, negative, story, "panel range", 3, 3)


@pytest.mark.parametrize("count,warns", [(8, False), (9, True), (12, True)])
def test_long_stories_point_to_the_identity_bank(story_node, clips, caplog, count, warns):
    """Whole-batch CSA keeps every panel in one latent batch: above 8 panels the node says to use the bank."""
    panels = "\n".join(f"[Mia] panel {i}" for i in range(count))
    with caplog.at_level("WARNING"):
        *_, panel_count = story_node.build(clips["sd15"], "[Mia] a girl", panels, "(No style)", "", 2)
    assert panel_count == count
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    advice = "Identity Bank Write and the rest with Identity Bank Read (see the story_characters workflow)"
    assert [w for w in warnings if advice in w and f"{count} panels" in w] == ([warnings[0]] if warns else [])
    tooltip = type(story_node).INPUT_TYPES()["required"]["panels"][1]["tooltip"]
    assert "for more than 8 panels, sample the identity panels with " + advice in tooltip
