"""Semantic Motion Predictor core: interpolation, the zero-initialised residual, files and their errors."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def mp(pack):
    from comfyui_storydiffusion.motion import interpolate, predictor

    return predictor, interpolate


def tiny_config(mp, **kw):
    values = dict(embed_dim=12, tokens=3, width=16, layers=2, heads=4, max_frames=8, kind="penultimate")
    values.update(kw)
    return mp[0].PredictorConfig(**values)


def randomise_head(model, seed=1):
    """Stand-in for training: a non-zero residual head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.out_proj.weight.copy_(torch.randn(model.out_proj.weight.shape, generator=gen) * 0.5)
        model.embed_mean.copy_(torch.randn(model.embed_mean.shape, generator=gen))
    return model


def test_linear_interpolation_pins_ends_and_is_linear(mp):
    _, interp = mp
    a, b = torch.randn(3, 12), torch.randn(3, 12)
    path = interp.interpolate(a, b, 5, "linear")
    assert path.shape == (5, 3, 12)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert torch.allclose(path[2], (a + b) / 2, atol=1e-6)
    pooled = interp.interpolate(a[0], b[0], 4, "linear")  # a pooled [D] vector is one token
    assert pooled.shape == (4, 1, 12)


def test_slerp_turns_directions_and_blends_lengths(mp):
    _, interp = mp
    a = torch.tensor([[2.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 0.0]])
    path = interp.interpolate(a, b, 3, "slerp")
    mid = path[1, 0]
    assert torch.allclose(mid.norm(), torch.tensor(3.0), atol=1e-5)  # length blended linearly
    assert torch.allclose(mid / mid.norm(), torch.tensor([2 ** -0.5, 2 ** -0.5, 0.0]), atol=1e-5)  # bisector
    assert not torch.allclose(path, interp.interpolate(a, b, 3, "linear"))
    same = interp.interpolate(a, a * 3, 4, "slerp")  # parallel tokens: no NaN, plain scaling
    assert torch.isfinite(same).all() and torch.allclose(same[1, 0], torch.tensor([10 / 3, 0, 0]), atol=1e-5)


@pytest.mark.parametrize("mode", ["linear", "slerp"])
@pytest.mark.parametrize("kind,tokens", [("penultimate", 3), ("pooled", 1)])
def test_untrained_predictor_returns_the_interpolation_exactly(mp, mode, kind, tokens):
    predictor, interp = mp
    torch.manual_seed(0)
    model = predictor.SemanticMotionPredictor(tiny_config(mp, kind=kind, tokens=tokens)).eval()
    a, b = torch.randn(tokens, 12) * 5, torch.randn(tokens, 12) * 5
    expected = interp.interpolate(a, b, 7, mode)
    got = predictor.predict_transition(a, b, 7, mode, model)
    assert torch.equal(got, expected)
    assert torch.equal(predictor.predict_transition(a, b, 7, mode, None), expected)


def test_trained_predictor_changes_only_the_in_betweens(mp):
    predictor, interp = mp
    torch.manual_seed(0)
    model = randomise_head(predictor.SemanticMotionPredictor(tiny_config(mp))).eval()
    a, b = torch.randn(3, 12), torch.randn(3, 12)
    path = interp.interpolate(a, b, 6, "linear")
    out = predictor.predict_transition(a, b, 6, "linear", model)
    assert torch.equal(out[0], a) and torch.equal(out[-1], b)
    assert all(not torch.allclose(out[j], path[j]) for j in range(1, 5))  # every in-between is refined
    # batched and single calls agree; any frame count up to max_frames works
    batched = model(torch.stack([path, path]))
    assert torch.allclose(batched[0], out, atol=1e-6)
    assert predictor.predict_transition(a, b, 8, "linear", model).shape == (8, 3, 12)


def test_frame_count_limits(mp):
    predictor, interp = mp
    model = predictor.SemanticMotionPredictor(tiny_config(mp)).eval()
    a, b = torch.randn(3, 12), torch.randn(3, 12)
    with pytest.raises(ValueError, match="at least 2 frames"):
        interp.interpolate(a, b, 1)
    with pytest.raises(ValueError, match="at most 8 frames"):
        predictor.predict_transition(a, b, 9, "linear", model)
    with pytest.raises(ValueError, match="Unknown interpolation"):
        interp.interpolate(a, b, 4, "cubic")


def test_save_load_round_trip(mp, tmp_path):
    predictor, _ = mp
    torch.manual_seed(0)
    model = randomise_head(predictor.SemanticMotionPredictor(tiny_config(mp, embed_std=0.25))).eval()
    path = str(tmp_path / "motion.safetensors")
    predictor.save_predictor(model, path, {"val_loss": 0.5})
    meta = predictor.read_metadata(path)
    assert json.loads(meta[predictor.CONFIG_KEY])["width"] == 16 and meta["val_loss"] == "0.5"
    loaded = predictor.load_predictor(path)
    assert loaded.config == model.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(5, 3, 12)
    assert torch.equal(loaded(x), model(x))
    assert not (tmp_path / "motion.safetensors.tmp").exists()


def test_load_errors_say_what_to_do(mp, tmp_path):
    predictor, _ = mp
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="not found"):
        predictor.load_predictor(str(tmp_path / "missing.safetensors"))

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(40))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        predictor.load_predictor(str(corrupt))

    ipadapter = tmp_path / "ip-adapter_sd15.safetensors"  # a real file of another kind, in the wrong folder
    save_file({"image_proj.proj.weight": torch.zeros(4, 4)}, str(ipadapter))
    with pytest.raises(ValueError, match="not a StoryDiffusion motion predictor"):
        predictor.load_predictor(str(ipadapter))

    model = predictor.SemanticMotionPredictor(tiny_config(mp))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_json()
    damaged = dict(state)
    del damaged["out_proj.weight"]
    save_file(damaged, str(tmp_path / "damaged.safetensors"), metadata={predictor.CONFIG_KEY: config})
    with pytest.raises(ValueError, match=r"missing keys \['out_proj.weight'\]"):
        predictor.load_predictor(str(tmp_path / "damaged.safetensors"))

    wrong = dict(state, **{"in_proj.weight": torch.zeros(16, 99)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata={predictor.CONFIG_KEY: config})
    with pytest.raises(ValueError, match="in_proj.weight"):
        predictor.load_predictor(str(tmp_path / "wrong.safetensors"))

    bad_config = json.dumps(dict(json.loads(config), heads=5))
    save_file(state, str(tmp_path / "badcfg.safetensors"), metadata={predictor.CONFIG_KEY: bad_config})
    with pytest.raises(ValueError, match="divisible by heads"):
        predictor.load_predictor(str(tmp_path / "badcfg.safetensors"))


def test_mismatched_clip_vision_is_a_clear_error(mp):
    predictor, _ = mp
    model = predictor.SemanticMotionPredictor(tiny_config(mp)).eval()
    with pytest.raises(ValueError, match=r"expects penultimate embeddings of 3 token\(s\) x 12 .* gives 3 x 20"):
        predictor.predict_transition(torch.randn(3, 20), torch.randn(3, 20), 4, "linear", model)
    with pytest.raises(ValueError, match="trained on penultimate embeddings but pooled"):
        predictor.check_compatible(model.config, 3, 12, "pooled")
