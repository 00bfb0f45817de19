"""The story node's per-panel conditioning for the DiT families' text encoders (issue 13), HiDream's four included.

Tiny random encoders (tests/tiny_text_encoders.py) loaded as ComfyUI's CLIP loader nodes load them, with
the real tokenizers ComfyUI ships (Gemma-2: a small SentencePiece model in the file, as the real file
carries its own). Every row is compared with core CLIPTextEncode / core tokenize+encode *exactly*
(torch.equal): the story node makes the same encoder calls on the same CPU float32 weights, so any
difference would be the pack's batching, not rounding.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models
import tiny_text_encoders

CHARACTERS = "[Mia] a girl with red hair, green raincoat\n[Leo] an old man with a white beard"
PANELS = ("[Mia] waits at a bus stop\n"
          "[Mia] and [Leo] on the bus, is this seat taken, comic book panel, cinematic lighting\n"
          "[NC] a car on fire at night")
SAME_LENGTH = "[Mia] a red car\n[Mia] a white car"

# family -> tokenizer key of its token-level encoder and that tokenizer's option prefix (None: CLIP only)
FAMILIES = {
    "flux": "t5xxl", "chroma": "t5xxl", "sd3_t5": "t5xxl", "sd3_lg": None,
    "qwen_image": "qwen25_7b", "z_image": "qwen3_4b", "lumina2": "gemma2_2b",
}
MASKED = {"qwen_image", "z_image", "lumina2"}  # encoders that return an attention mask


@pytest.fixture(scope="module")
def clips(pack, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("text_encoders"))
    made = {}

    def get(family):
        if family not in made:
            made[family] = tiny_text_encoders.load(family, None, directory=directory)
        return made[family]

    return get


@pytest.fixture(scope="module")
def story_node(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]()


def core_encode(comfy_nodes, clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def core_padded(clip, text, key, length):
    """Core tokenize + encode of `text` with the tokenizer padding it to a cond of `length` tokens."""
    tokens = clip.tokenize(text)
    ((cond, _),) = clip.encode_from_tokens_scheduled(tokens)
    missing = length - cond.shape[1]
    options = {f"{key}_min_length": len(tokens[key][0]) + missing}
    return clip.encode_from_tokens_scheduled(clip.tokenize(text, tokenizer_options=options))


def assert_same_extras(extras, row, core_extras, length):
    for key, value in core_extras.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(extras[key][row:row + 1], value), key
        else:
            assert extras[key] == value, key
    for key in set(extras) - set(core_extras):
        # only an all-ones mask that the encoder itself dropped may be added back
        assert key == "attention_mask" and bool(extras[key][row].all()), key


def test_tiny_files_use_the_real_key_names_and_stay_small(pack, tmp_path):
    from safetensors import safe_open

    expected = {"clip_l": "text_model.encoder.layers.0.self_attn.q_proj.weight",
                "clip_g": "text_model.encoder.layers.31.mlp.fc1.weight",
                "t5xxl": "encoder.block.0.layer.0.SelfAttention.q.weight",
                "qwen25_7b": "model.layers.0.self_attn.k_proj.bias",
                "qwen3_4b": "model.layers.0.self_attn.q_norm.weight",
                "gemma2_2b": "model.layers.0.post_feedforward_layernorm.weight",
                "mistral3_24b": "model.layers.29.self_attn.q_proj.weight",
                "llama3_8b": "model.layers.0.post_attention_layernorm.weight"}
    embeddings = {"clip_l": ("text_model.embeddings.token_embedding.weight", 49408),
                  "t5xxl": ("shared.weight", 32128), "qwen25_7b": ("model.embed_tokens.weight", 152064),
                  "qwen3_4b": ("model.embed_tokens.weight", 151936),
                  "mistral3_24b": ("model.embed_tokens.weight", 131072),
                  "llama3_8b": ("model.embed_tokens.weight", 128256)}
    for kind, key in expected.items():
        path = tiny_text_encoders.write(kind, str(tmp_path / f"{kind}.safetensors"))
        assert (tmp_path / f"{kind}.safetensors").stat().st_size < 30 * 2 ** 20
        with safe_open(path, "pt") as f:
            assert key in f.keys()
            if kind in embeddings:
                name, rows = embeddings[kind]
                assert f.get_slice(name).get_shape()[0] == rows  # every id of the real tokenizer has a row


@pytest.mark.parametrize("family", sorted(FAMILIES) + ["hidream"])
def test_equal_length_panels_are_exactly_core_clip_text_encode(comfy_nodes, story_node, clips, family):
    clip = clips(family)
    positive, negative, _, story, _ = story_node.build(clip, CHARACTERS, SAME_LENGTH, "(No style)", "blurry", 1)
    ((cond, extras),) = positive
    cores = [core_encode(comfy_nodes, clip, p.prompt)[0] for p in story.panels]
    assert cores[0][0].shape == cores[1][0].shape  # the precondition of this test
    for i, (core_cond, core_extras) in enumerate(cores):
        assert torch.equal(cond[i:i + 1], core_cond)
        assert set(extras) == set(core_extras)
        assert_same_extras(extras, i, core_extras, core_cond.shape[1])
    assert not torch.equal(cond[0], cond[1])
    from comfyui_storydiffusion.story.styles import style_negative

    ((core_neg, _),) = core_encode(comfy_nodes, clip, style_negative("(No style)", "blurry"))
    assert all(torch.equal(negative[0][0][i:i + 1], core_neg) for i in range(2))


@pytest.mark.parametrize("family", sorted(k for k, v in FAMILIES.items() if v))
def test_panels_of_different_lengths_are_padded_by_the_encoder_not_tiled(comfy_nodes, story_node, clips, family):
    """The longest panel is core CLIPTextEncode; shorter ones are core tokenize+encode with the tokenizer
    padding them to that length (pad tokens, masked where the encoder gives a mask) -- never tiled."""
    clip = clips(family)
    # Flux / SD3 pad T5 to 256 / 77 tokens themselves: only a longer panel makes lengths differ
    panels = PANELS + ("\n[Leo] " + ", ".join(f"detail {i}" for i in range(120)) if family in ("flux", "sd3_t5") else "")
    positive, _, _, story, _ = story_node.build(clip, CHARACTERS, panels, "(No style)", "", 1)
    ((cond, extras),) = positive
    cores = [core_encode(comfy_nodes, clip, p.prompt)[0] for p in story.panels]
    lengths = [c[0].shape[1] for c in cores]
    assert len(set(lengths)) > 1  # the precondition of this test
    longest = max(lengths)
    if family == "z_image":  # Z-Image pads captions to 32 tokens itself, without their mask: the batch is a multiple
        longest += (-longest) % 32
    assert cond.shape[1] == longest  # not the lcm of the lengths
    key = FAMILIES[family]
    if family == "z_image":  # sent without a mask (ComfyUI's Z-Image cannot take one): the pad tokens stay visible
        assert "attention_mask" not in extras
    unmasked = (lambda e: {k: v for k, v in e.items() if k != "attention_mask"}) if family == "z_image" else (lambda e: e)
    for i, (core_cond, core_extras) in enumerate(cores):
        n = core_cond.shape[1]
        if n == longest:
            assert torch.equal(cond[i:i + 1], core_cond)
            assert_same_extras(extras, i, unmasked(core_extras), n)
            continue
        ((ref_cond, ref_extras),) = core_padded(clip, story.panels[i].prompt, key, longest)
        assert torch.equal(cond[i:i + 1], ref_cond)
        assert_same_extras(extras, i, unmasked(ref_extras), longest)
        if family in MASKED and family != "z_image":
            mask = extras["attention_mask"][i]
            assert int(mask.sum()) == n and mask.shape[0] == longest  # exactly the padding is masked
            assert torch.equal(mask[:n], torch.ones(n, dtype=mask.dtype))  # right padding


def test_hidream_rows_are_core_encodes_with_the_llama_tokens_padded_to_the_longest_panel(comfy_nodes, story_node, clips):
    """HiDream I1 (CLIP-L + CLIP-G + T5-XXL + Llama-3.1 8B): T5 always gives 128 tokens (the cond), the Llama
    states (conditioning_llama3) one per token from 128 up. A panel past 128 Llama tokens makes them differ: the
    longest panel is core CLIPTextEncode, the others are core tokenize+encode with each tokenizer padding to
    the longest panel's token counts (never tiled, never refused). ComfyUI 0.8.0 cuts the Llama tokens at 128 as
    well: there every panel has the same shapes and every row is core CLIPTextEncode."""
    clip = clips("hidream")
    long = "\n[Leo] " + ", ".join(f"detail {i}" for i in range(80))
    positive, _, _, story, _ = story_node.build(clip, CHARACTERS, PANELS + long, "(No style)", "", 1)
    ((cond, extras),) = positive
    cores = [core_encode(comfy_nodes, clip, p.prompt)[0] for p in story.panels]
    llama = [c[1]["conditioning_llama3"].shape[2] for c in cores]
    counts = [len(clip.tokenize(p.prompt)["llama"][0]) for p in story.panels]
    assert len({c[0].shape[1] for c in cores}) == 1  # T5: 128 tokens for every panel
    assert (len(set(llama)) > 1) == (max(counts) > 128)  # one length where this ComfyUI cuts the Llama tokens
    target = {"t5xxl_min_length": 128, "llama_min_length": max(counts)}
    assert extras["conditioning_llama3"].shape[2] == max(llama)
    for i, (core_cond, core_extras) in enumerate(cores):
        if core_extras["conditioning_llama3"].shape[2] == max(llama):
            expected = (core_cond, core_extras)
        else:
            ((ref_cond, ref_extras),) = clip.encode_from_tokens_scheduled(clip.tokenize(story.panels[i].prompt,
                                                                                        tokenizer_options=target))
            expected = (ref_cond, ref_extras)
            # right padding of a causal model: the panel's own token states are those of its unpadded encoding
            n = core_extras["conditioning_llama3"].shape[2]
            torch.testing.assert_close(ref_extras["conditioning_llama3"][:, :, :n], core_extras["conditioning_llama3"],
                                       atol=1e-5, rtol=1e-5)
        assert torch.equal(cond[i:i + 1], expected[0])
        assert_same_extras(extras, i, expected[1], expected[0].shape[1])


def test_sd3_clip_only_long_prompts_still_tile(comfy_nodes, story_node, clips):
    """CLIP conds (77-token chunks) keep the tiling rule of the SD1.5/SDXL story (comfy.conds.CONDCrossAttn)."""
    clip = clips("sd3_lg")
    long = "[Leo] " + ", ".join(f"detail number {i}" for i in range(22))
    positive, _, _, story, _ = story_node.build(clip, CHARACTERS, "[Mia] waits\n" + long, "(No style)", "", 1)
    ((cond, _),) = positive
    ((short, _),) = core_encode(comfy_nodes, clip, story.panels[0].prompt)
    ((full, _),) = core_encode(comfy_nodes, clip, story.panels[1].prompt)
    assert cond.shape[1] == 154 and full.shape[1] == 154
    assert torch.equal(cond[1:2], full)
    assert torch.equal(cond[0:1, :77], short) and torch.equal(cond[0:1, 77:], short)


def test_flux2_text_encoder_loads_or_is_a_known_version_mismatch(pack):
    """ComfyUI 0.3.75 builds the Flux.2 (Mistral-3) tokenizer with an older transformers API."""
    try:
        clip = tiny_text_encoders.load("flux2", None)
    except TypeError as error:
        assert "MistralConverter" in str(error)
        pytest.skip("ComfyUI's Flux.2 tokenizer needs an older transformers (MistralConverter(vocab=...))")
    ((cond, _),) = clip.encode_from_tokens_scheduled(clip.tokenize("a girl waits at a bus stop"))
    assert cond.shape[-1] == 3 * tiny_text_encoders.WIDTH


def test_flux_batch_of_different_lengths_samples_each_panel_as_its_own_cond(comfy_nodes, story_node, clips):
    """A Flux KSampler call over the story batch (T5 conds of 256 and >256 tokens): every latent row is
    what sampling that row's own conditioning alone gives."""
    clip = clips("flux")
    model = tiny_models.make_dit("flux", seed=3, context_dim=tiny_text_encoders.WIDTH,
                                 pooled_dim=tiny_text_encoders.WIDTH)
    long = "[Leo] " + ", ".join(f"detail {i}" for i in range(120))
    positive, negative, _, story, count = story_node.build(clip, CHARACTERS, "[Mia] waits at a bus stop\n" + long,
                                                           "(No style)", "", 1)
    assert positive[0][0].shape[1] > 256
    latent = {"samples": torch.zeros(count, 16, 8, 8)}

    def sample(pos, neg):
        return comfy_nodes.common_ksampler(model, 5, 1, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    from comfyui_storydiffusion.story import comfy_adapter

    batched = sample(positive, negative)
    for i in range(count):
        alone = sample(comfy_adapter.select_rows(positive, [i] * count), comfy_adapter.select_rows(negative, [i] * count))
        assert torch.allclose(batched[i], alone[i], atol=1e-5)
    ((long_core, _),) = core_encode(comfy_nodes, clip, story.panels[1].prompt)
    assert torch.equal(positive[0][0][1:2], long_core)
