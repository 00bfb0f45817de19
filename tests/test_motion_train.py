"""Training the motion predictor on synthetic videos: it must learn a nonlinear motion, resume exactly,
and run from the command line."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

import comfy_env
import motion_fixtures


@contextmanager
def one_thread():
    """The tiny models train fastest on one thread (the test box is shared); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train(pack):
    """The training loop (motion/training.py) and the command line's main (motion/train.py)."""
    import types

    import comfyui_storydiffusion.motion.train as cli
    from comfyui_storydiffusion.motion import training

    return types.SimpleNamespace(TrainOptions=training.TrainOptions, train=training.train, main=cli.main)


@pytest.fixture(scope="module")
def clip_vision(pack):
    return motion_fixtures.make_clip_vision(seed=0)


@pytest.fixture(scope="module")
def orbit_videos(tmp_path_factory):
    """20 videos of a disk orbiting the centre: a curved path, so linear interpolation is wrong."""
    folder = tmp_path_factory.mktemp("orbit")
    motion_fixtures.write_orbit_videos(str(folder), count=20, frames=24, size=32, seed=0)
    return str(folder)


def small_options(train, **kw):
    values = dict(kind="pooled", frames=6, steps=1000, batch_size=16, lr=3e-3, warmup=20, max_stride=2,
                  val_clips=64, val_fraction=0.2, checkpoint_every=1000, image_size=32,
                  model={"width": 64, "layers": 2, "heads": 4, "max_frames": 8})
    values.update(kw)
    return train.TrainOptions(**values)


def encoder(pack, clip_vision, kind):
    from comfyui_storydiffusion.motion.comfy_adapter import clip_vision_encoder

    return clip_vision_encoder(clip_vision, kind)


def test_training_learns_a_curved_motion(pack, train, clip_vision, orbit_videos, tmp_path):
    from comfyui_storydiffusion.motion.predictor import load_predictor, read_metadata

    out = str(tmp_path / "orbit.safetensors")
    with one_thread():
        result = train.train(orbit_videos, encoder(pack, clip_vision, "pooled"), out, small_options(train),
                             encoder_tag="tiny-0", log=lambda *a: None)
    assert result.steps == 1000 and result.val_videos == 4 and result.train_videos == 16
    # held-out videos: the trained predictor is far better than the straight line between the panels
    assert result.val_loss <= 0.5 * result.linear_val_loss, result.summary()
    meta = read_metadata(out)
    assert float(meta["linear_val_loss"]) == pytest.approx(result.linear_val_loss, rel=1e-4)
    model = load_predictor(out)
    assert model.config.kind == "pooled" and model.config.tokens == 1 and model.config.embed_dim == 24
    assert len(os.listdir(out + ".cache")) == 20  # embeddings cached once per video


def test_resumed_training_is_bit_identical(pack, train, clip_vision, orbit_videos, tmp_path):
    from comfyui_storydiffusion.motion.predictor import load_predictor

    options = small_options(train, steps=24, checkpoint_every=8, val_clips=8)
    enc = encoder(pack, clip_vision, "pooled")
    cache = str(tmp_path / "cache")
    with one_thread():
        straight = train.train(orbit_videos, enc, str(tmp_path / "a.safetensors"), options, "tiny-0", cache,
                               log=lambda *a: None)
        partial = train.train(orbit_videos, enc, str(tmp_path / "b.safetensors"), options, "tiny-0", cache,
                              stop_after=13, log=lambda *a: None)
        assert partial.steps == 13 and not os.path.exists(tmp_path / "b.safetensors")
        messages = []
        resumed = train.train(orbit_videos, enc, str(tmp_path / "b.safetensors"), options, "tiny-0", cache,
                              log=messages.append)
    assert "resuming from step 13" in messages
    a, b = load_predictor(straight.out).state_dict(), load_predictor(resumed.out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_loss == straight.val_loss

    changed = small_options(train, steps=24, checkpoint_every=8, val_clips=8, lr=1e-3)
    train.train(orbit_videos, enc, str(tmp_path / "c.safetensors"), options, "tiny-0", cache, stop_after=8,
                log=lambda *a: None)
    with pytest.raises(ValueError, match="other settings"):
        train.train(orbit_videos, enc, str(tmp_path / "c.safetensors"), changed, "tiny-0", cache, log=lambda *a: None)


def test_training_input_errors(pack, train, clip_vision, tmp_path):
    enc = encoder(pack, clip_vision, "pooled")
    with pytest.raises(FileNotFoundError, match="Video folder not found"):
        train.train(str(tmp_path / "nope"), enc, str(tmp_path / "x.safetensors"), small_options(train))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No videos"):
        train.train(str(tmp_path / "empty"), enc, str(tmp_path / "x.safetensors"), small_options(train))
    short = tmp_path / "short"
    motion_fixtures.write_orbit_videos(str(short), count=2, frames=4)
    with pytest.raises(ValueError, match="long enough for 6-frame clips"):
        train.train(str(short), enc, str(tmp_path / "x.safetensors"), small_options(train), log=lambda *a: None)


def test_command_line_trains_and_writes_a_loadable_file(pack, train, clip_vision, orbit_videos, tmp_path, monkeypatch):
    """`main()` end to end, except that the CLIP vision file is the in-process tiny model
    (ComfyUI's loader only knows full-size ViT-L/H/G files)."""
    from comfyui_storydiffusion.motion import comfy_adapter
    from comfyui_storydiffusion.motion.predictor import load_predictor

    fake_file = tmp_path / "tiny_clip_vision.safetensors"
    fake_file.write_bytes(b"stand-in")
    monkeypatch.setattr(comfy_adapter, "load_clip_vision_file", lambda path: clip_vision)
    out = tmp_path / "models" / "motion.safetensors"
    with one_thread():
        result = train.main(["--videos", orbit_videos, "--clip-vision", str(fake_file), "--out", str(out),
                             "--kind", "penultimate", "--frames", "5", "--steps", "6", "--batch-size", "4",
                             "--width", "32", "--layers", "1", "--heads", "2", "--max-frames", "8", "--device", "cpu"])
    model = load_predictor(str(out))
    assert result.steps == 6 and model.config.kind == "penultimate"
    assert (model.config.tokens, model.config.embed_dim) == (17, 32)  # the tiny model's penultimate tokens


def test_module_runs_from_the_pack_folder():
    """`python -m motion.train` from the pack root (the pack is not an installed package there)."""
    proc = subprocess.run([sys.executable, "-m", "motion.train", "--help"], cwd=comfy_env.REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--clip-vision" in proc.stdout and "--videos" in proc.stdout


def test_command_line_reports_a_wrong_clip_vision_file_without_a_traceback(tmp_path):
    """The real CLI path: finds ComfyUI, uses its CLIP vision loader, explains a file it does not recognise."""
    from safetensors.torch import save_file

    bogus = tmp_path / "not_clip_vision.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, str(bogus))
    (tmp_path / "videos").mkdir()
    env = dict(os.environ, COMFYUI_PATH=comfy_env.comfy_path())
    proc = subprocess.run([sys.executable, "-m", "motion.train", "--videos", str(tmp_path / "videos"),
                           "--clip-vision", str(bogus), "--out", str(tmp_path / "out.safetensors")],
                          cwd=comfy_env.REPO, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 2
    assert "not a CLIP vision model ComfyUI recognises" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
