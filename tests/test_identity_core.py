"""PhotoMaker v1 core: tokenisation table, fuse vs a reference, weight files in both formats, bad files."""
from __future__ import annotations

import importlib

import pytest
import torch

import identity_fixtures as F


@pytest.fixture(scope="module")
def mods(pack):
    names = ("encoder", "fuse", "tokenize", "weights", "lora")
    return {n: importlib.import_module(f"comfyui_storydiffusion.identity.{n}") for n in names}


@pytest.fixture(scope="module")
def tokenizer():
    """The SDXL tokenizer ComfyUI bundles (CLIP-L + CLIP-G vocabularies)."""
    import comfy.sdxl_clip

    return comfy.sdxl_clip.SDXLTokenizer()


def _trigger_ids(tokenizer, word):
    return tuple(tokenizer.clip_l.tokenizer(word)["input_ids"][1:-1])


def _words(tokenizer, chunk):
    return [tokenizer.clip_l.inv_vocab[t].replace("</w>", "") for t, _, wid in chunk if wid != 0]


@pytest.mark.parametrize("text,trigger,n,words,positions", [
    ("a photo of a man img, smiling", "img", 1, ["a", "photo", "of", "a", "man", ",", "smiling"], [5]),
    ("a photo of a man img, smiling", "img", 3, ["a", "photo", "of", "a", "man", "man", "man", ",", "smiling"], [5, 6, 7]),
    ("portrait of a woman img", "img", 2, ["portrait", "of", "a", "woman", "woman"], [4, 5]),
    ("(man:1.2) img in a park", "img", 2, ["man", "man", "in", "a", "park"], [1, 2]),
    ("a dog photomaker running", "photomaker", 1, ["a", "dog", "running"], [2]),  # two-token trigger
    ("a cat on a mat", "img", 2, ["a", "cat", "on", "a", "mat"], []),  # no trigger: unchanged
])
def test_tokenisation_table(mods, tokenizer, text, trigger, n, words, positions):
    tk = mods["tokenize"]
    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    for key, pad in (("l", 49407), ("g", 0)):
        spec = tk.TriggerSpec(trigger, _trigger_ids(tokenizer, trigger), n)
        out = tk.expand_class_tokens(tokens[key], [spec], pad)
        (chunk,) = out.chunks
        assert len(chunk) == 77
        assert _words(tokenizer, chunk) == words
        assert out.positions == [positions]
        assert chunk[0][0] == 49406 and chunk[1 + len(words)][0] == 49407  # start and end token kept
        assert all(e == (pad, 1.0, 0) for e in chunk[2 + len(words):])  # re-padded with this encoder's pad
    if text.startswith("(man:1.2)"):  # the class copies keep the class word's prompt weight
        assert [chunk[p][1] for p in positions] == [1.2, 1.2]


def test_long_prompt_keeps_end_token_and_reports_cut_class(mods, tokenizer):
    tk = mods["tokenize"]
    filler = " ".join(["red"] * 73)
    tokens = tokenizer.tokenize_with_weights(f"{filler} man img", return_word_ids=True)["l"]
    with pytest.raises(tk.TriggerError, match="too long"):
        tk.expand_class_tokens(tokens, [tk.TriggerSpec("img", _trigger_ids(tokenizer, "img"), 4)], 49407)
    out = tk.expand_class_tokens(tokens, [tk.TriggerSpec("img", _trigger_ids(tokenizer, "img"), 2)], 49407)
    assert len(out.chunks[0]) == 77 and out.chunks[0][-1][0] == 49407 and out.positions == [[74, 75]]


@pytest.mark.parametrize("text,match", [
    ("img a man", "no class word before it"),
    ("a man img and a dog img", "appears 2 times"),
])
def test_tokenisation_errors(mods, tokenizer, text, match):
    tk = mods["tokenize"]
    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)["g"]
    with pytest.raises(tk.TriggerError, match=match):
        tk.expand_class_tokens(tokens, [tk.TriggerSpec("img", _trigger_ids(tokenizer, "img"), 1)], 0)


def test_two_characters_sharing_a_trigger_take_occurrences_in_order(mods, tokenizer):
    tk = mods["tokenize"]
    tokens = tokenizer.tokenize_with_weights("a man img and a woman img", return_word_ids=True)["l"]
    ids = _trigger_ids(tokenizer, "img")
    out = tk.expand_class_tokens(tokens, [tk.TriggerSpec("img", ids, 2), tk.TriggerSpec("img", ids, 1)], 49407)
    assert _words(tokenizer, out.chunks[0]) == ["a", "man", "man", "and", "a", "woman"]
    assert out.positions == [[2, 3], [6]]


def _reference_fuse(sd: dict, class_emb: torch.Tensor, id_emb: torch.Tensor) -> torch.Tensor:
    """PhotoMaker's FuseModule written out from the weights (LN -> fc1 -> GELU -> fc2; mlp2 residual; LN)."""
    def mlp(prefix, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{prefix}.layernorm.weight"], sd[f"{prefix}.layernorm.bias"])
        h = torch.nn.functional.gelu(h @ sd[f"{prefix}.fc1.weight"].T + sd[f"{prefix}.fc1.bias"])
        return h @ sd[f"{prefix}.fc2.weight"].T + sd[f"{prefix}.fc2.bias"]
    x = mlp("fuse_module.mlp1", torch.cat([class_emb, id_emb], -1)) + class_emb
    x = x + mlp("fuse_module.mlp2", x)
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd["fuse_module.layer_norm.weight"], sd["fuse_module.layer_norm.bias"])


def test_fuse_matches_reference_and_touches_only_class_rows(mods):
    sd = F.photomaker_state_dict(seed=3)["id_encoder"]
    encoder = mods["encoder"].PhotoMakerIDEncoder.from_state_dict(sd)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(154, 112, generator=gen)  # two 77-token chunks
    ids = torch.randn(3, 112, generator=gen)
    where = [80, 81, 82]
    out = mods["fuse"].fuse_into_prompt(encoder.fuse_module, prompt, where, ids)
    torch.testing.assert_close(out[where], _reference_fuse(sd, prompt[where], ids), rtol=1e-5, atol=1e-5)
    keep = [i for i in range(154) if i not in where]
    assert torch.equal(out[keep], prompt[keep]) and not torch.equal(out[where], prompt[where])
    with pytest.raises(ValueError, match="2 class-word positions for 3"):
        mods["fuse"].fuse_into_prompt(encoder.fuse_module, prompt, where[:2], ids)
    with pytest.raises(ValueError, match="SDXL CLIP"):
        mods["fuse"].fuse_into_prompt(encoder.fuse_module, prompt[:, :64], where, ids[:, :64])


def test_id_embeddings_preprocess_and_projections(mods):
    sd = F.photomaker_state_dict(seed=4)["id_encoder"]
    encoder = mods["encoder"].PhotoMakerIDEncoder.from_state_dict(sd)
    images = F.reference_images(2, seed=1)
    pixels = encoder.preprocess(images)
    assert pixels.shape == (2, 3, 224, 224)
    emb = encoder.encode_images(images)
    assert emb.shape == (2, 112) and torch.isfinite(emb).all()
    assert not torch.equal(emb[0], emb[1])  # one embedding per photo
    pooled = encoder.vision_model(pixels).pooler_output
    torch.testing.assert_close(emb[:, 64:], pooled @ sd["visual_projection_2.weight"].T)
    assert torch.equal(encoder.encode_images(images), emb)  # deterministic
    with pytest.raises(ValueError, match="1 or more reference photos"):
        encoder.encode_images(images[:0])


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_state_dict_round_trips_through_both_formats(mods, tmp_path, suffix):
    sd = F.photomaker_state_dict(seed=5)
    path = F.write_photomaker(str(tmp_path / f"pm{suffix}"), sd)
    model = mods["weights"].load_photomaker(path)
    loaded = model.encoder.state_dict()
    assert set(loaded) == set(sd["id_encoder"])  # the public key set, nothing more or less
    assert all(torch.equal(loaded[k], sd["id_encoder"][k]) for k in loaded)
    assert set(model.lora) == {k.rsplit("_lora.", 1)[0] for k in sd["lora_weights"]}
    pair = model.lora["unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.processor.to_k"]
    assert pair.down.shape == (4, 112) and pair.up.shape == (128, 4)


def test_full_size_shapes_give_vit_l14_config(mods):
    shapes = F.id_encoder_shapes(hidden=1024, layers=24, intermediate=4096, patch=14, image=224, proj=768, proj2=1280)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = mods["encoder"].config_from_state_dict(sd)
    assert {k: config[k] for k in mods["encoder"].VIT_L14} == mods["encoder"].VIT_L14
    assert config["projection_dim"] + config["projection_2_dim"] == 2048


def test_bad_files_give_clear_errors(mods, tmp_path):
    w = mods["weights"]
    sd = F.photomaker_state_dict(seed=6)
    broken = {"id_encoder": dict(sd["id_encoder"]), "lora_weights": sd["lora_weights"]}
    del broken["id_encoder"]["visual_projection_2.weight"]
    broken["id_encoder"]["fuse_module.extra.weight"] = torch.zeros(1)
    with pytest.raises(w.PhotoMakerFileError, match="missing keys visual_projection_2.weight; unexpected keys fuse_module.extra.weight"):
        w.load_photomaker(F.write_photomaker(str(tmp_path / "keys.bin"), broken))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(w.PhotoMakerFileError, match="corrupt.safetensors is corrupt, incomplete or not a PhotoMaker v1 file"):
        w.load_photomaker(str(corrupt))
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "other.bin")
    with pytest.raises(w.PhotoMakerFileError, match="no 'id_encoder' section"):
        w.load_photomaker(str(tmp_path / "other.bin"))
    bad_lora = {"id_encoder": sd["id_encoder"], "lora_weights": {"unet.x.processor.to_k_lora.down.weight": torch.zeros(4, 8)}}
    with pytest.raises(w.PhotoMakerFileError, match="lacks its up half"):
        w.load_photomaker(F.write_photomaker(str(tmp_path / "lora.bin"), bad_lora))
