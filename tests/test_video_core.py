"""video/join.py and video/encode.py: joining arithmetic, streaming encoder, every written file decoded back."""
from __future__ import annotations

import logging
import os
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def video(pack):
    import types

    from comfyui_storydiffusion.video import encode, join

    names = {k: v for module in (join, encode) for k, v in vars(module).items() if not k.startswith("__")}
    return types.SimpleNamespace(**names, encode_module=encode)


def constant(value: float, frames: int, size=(4, 6)) -> torch.Tensor:
    return torch.full((frames, *size, 3), value)


def ramp(frames: int, height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    """Frames that differ from each other and are smooth (lossy codecs keep them close)."""
    y = torch.linspace(0, 1, height)[:, None, None]
    x = torch.linspace(0, 1, width)[None, :, None]
    base = torch.cat([y.expand(height, width, 1), x.expand(height, width, 1), (x * y).expand(height, width, 1)], -1)
    return torch.stack([(base * 0.6 + 0.4 * t / max(1, frames - 1)).clamp(0, 1) for t in range(frames)])


def values(frames) -> list[float]:
    return [float(f.mean()) for f in frames]


# ---------------------------------------------------------------------------------------------------
# joining


def test_crossfade_arithmetic_is_linear_and_exact(video):
    segments = [constant(0.0, 5), constant(1.0, 7), constant(0.0, 4)]
    frames = list(video.join_segments(segments, overlap=3))
    assert values(frames) == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert len(frames) == video.joined_frame_count([5, 7, 4], overlap=3) == 5 + 7 + 4 - 2 * 3


def test_overlap_one_shows_the_shared_panel_frame_once(video):
    panels = [0.1, 0.5, 0.9]
    segments = [torch.stack([constant(a, 1)[0], constant((a + b) / 2, 1)[0], constant(b, 1)[0]])
                for a, b in pairwise(panels)]
    frames = values(video.join_segments(segments, overlap=1))
    assert frames == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    hard_cut = values(video.join_segments(segments, overlap=0))
    assert hard_cut == pytest.approx([0.1, 0.3, 0.5, 0.5, 0.7, 0.9])


@pytest.mark.parametrize("overlap,expected", [
    (0, [0, 0, 0, 1, 2, 2, 2, 10, 11, 12, 12, 12]),
    (1, [0, 0, 0, 1, 6, 6, 6, 11, 12, 12, 12]),                   # junction frame (2+10)/2 = 6 held
    (3, None),  # computed from the weights below
])
def test_hold_repeats_first_last_and_junction_panel(video, overlap, expected):
    a = torch.stack([constant(v, 1)[0] for v in (0.0, 1.0, 2.0)])
    b = torch.stack([constant(v, 1)[0] for v in (10.0, 11.0, 12.0)])
    got = values(video.join_segments([a, b], overlap=overlap, hold=2))
    if overlap == 3:  # cross-fade of all 3 frames; the middle one (k = 1, w = 0.5) is held
        fade = [0.0 * 0.75 + 10 * 0.25, 1.0 * 0.5 + 11 * 0.5, 2.0 * 0.25 + 12 * 0.75]
        expected = [0, 0] + fade[:2] + [fade[1]] * 2 + fade[2:] + [12.0, 12.0]
    assert got == pytest.approx(expected)
    assert len(got) == video.joined_frame_count([3, 3], overlap=overlap, hold=2)


def test_frame_blending_multiplies_frames_at_same_duration(video):
    frames = values(video.blend_frames(iter([constant(0.0, 1)[0], constant(1.0, 1)[0], constant(4.0, 1)[0]]), 3))
    assert frames == pytest.approx([0, 1 / 3, 2 / 3, 1, 2, 3, 4, 4, 4])
    assert len(frames) == 3 * 3
    assert values(video.blend_frames(iter([constant(0.5, 1)[0]]), 1)) == [0.5]


def test_assemble_fills_one_tensor_matching_the_generators(video):
    segments = [ramp(5, 8, 10), ramp(7, 8, 10) * 0.5, ramp(4, 8, 10)]
    out = video.assemble_story_video(segments, overlap=2, hold=1, blend_factor=2)
    expected = torch.stack(list(video.blend_frames(video.join_segments(segments, 2, 1), 2)))
    assert out.shape == (video.joined_frame_count([5, 7, 4], 2, 1, 2), 8, 10, 3) == expected.shape
    assert torch.equal(out, expected)
    assert torch.equal(out[0], segments[0][0]) and torch.equal(out[-1], segments[-1][-1])


def test_segments_of_another_size_are_resized_to_the_first_with_a_warning(video, caplog):
    with caplog.at_level(logging.WARNING):
        out = video.assemble_story_video([constant(0.2, 3, (8, 12)), constant(0.6, 3, (5, 7))], overlap=1)
    assert out.shape == (5, 8, 12, 3)
    assert torch.allclose(out[-1], torch.full((8, 12, 3), 0.6))
    assert "segment 2 is 7x5, resized to 12x8" in caplog.text


@pytest.mark.parametrize("segments,overlap,message", [
    ([], 0, "No segments"),
    ([constant(0, 3), constant(0, 0)], 0, "segment 2 is empty"),
    ([constant(0, 3), constant(0, 3), constant(0, 3)], 2, "segment 2 has 3 frames, but an overlap of 2"),
    ([torch.zeros(3, 4, 4)], 0, "segment 1 is not an IMAGE batch"),
])
def test_bad_segments_say_what_to_do(video, segments, overlap, message):
    with pytest.raises(video.VideoError, match=message):
        video.assemble_story_video(segments, overlap=overlap)


def test_frames_as_uint8_rounds_clamps_and_follows_playback_order(video):
    images = torch.tensor([-0.5, 0.4 / 255, 0.6 / 255, 1.6 / 255, 2.0]).view(5, 1, 1, 1).expand(5, 1, 1, 4)
    got = [f for f in video.frames_as_uint8(images, [0, 1, 2, 3, 4])]
    assert [int(f[0, 0, 0]) for f in got] == [0, 0, 1, 2, 255]
    assert all(f.shape == (1, 1, 3) and f.dtype == np.uint8 for f in got)  # alpha dropped
    assert len({id(f) for f in got}) == 5  # every yielded frame is its own array
    half = torch.full((1, 2, 2, 3), 0.5, dtype=torch.float16)
    assert int(next(video.frames_as_uint8(half, [0]))[0, 0, 0]) == 128
    assert video.playback_order(4, pingpong=True) == [0, 1, 2, 3, 2, 1]
    assert video.playback_order(2, pingpong=True) == [0, 1]


# ---------------------------------------------------------------------------------------------------
# encoding: decode every written file


def decode(path: str, format_name: str):
    """(frames as float [N,H,W,3], fps) read back from the file."""
    if format_name == "webp":  # FFmpeg cannot decode animated webp; Pillow can
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
            fps = 1000.0 / im.info["duration"]
    else:
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            fps = float(stream.average_rate)
    return torch.from_numpy(np.stack(frames)).float() / 255.0, fps


@pytest.mark.parametrize("format_name,fps,tolerance", [("mp4", 12.0, 0.03), ("webm", 10.0, 0.03),
                                                       ("gif", 10.0, 0.03), ("webp", 8.0, 0.03)])
def test_written_file_decodes_to_the_input_frames(video, tmp_path, format_name, fps, tolerance):
    images = ramp(9, 32, 48)
    path = str(tmp_path / f"clip.{format_name}")
    result = video.write_video(video.frames_as_uint8(images, range(9)), path, format_name, fps, quality=90)
    frames, decoded_fps = decode(path, format_name)
    assert result.frame_count == 9 and frames.shape == (9, 32, 48, 3)
    assert decoded_fps == pytest.approx(fps, rel=1e-3)
    assert (frames[0] - images[0]).abs().mean() < tolerance
    assert (frames[-1] - images[-1]).abs().mean() < tolerance
    assert (frames[-1] - images[0]).abs().mean() > 5 * tolerance  # the frames really differ
    assert os.listdir(tmp_path) == [f"clip.{format_name}"]  # no temporary left behind


def test_mp4_uses_h264_and_pads_odd_sizes_to_even(video, tmp_path):
    import av

    images = ramp(3, 31, 45)
    result = video.write_video(video.frames_as_uint8(images, range(3)), str(tmp_path / "odd.mp4"), "mp4", 8)
    with av.open(result.path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (46, 32)
    frames, _ = decode(result.path, "mp4")
    assert (frames[1, :31, :45] - images[1]).abs().mean() < 0.03


@pytest.mark.parametrize("format_name", ["mp4", "webm", "gif", "webp"])
def test_odd_sizes_are_padded_with_one_warning_per_file(video, tmp_path, caplog, format_name):
    images = ramp(4, 65, 63)
    with caplog.at_level(logging.WARNING):
        result = video.write_video(video.frames_as_uint8(images, range(4)), str(tmp_path / f"o.{format_name}"),
                                   format_name, 8)
    padded = [r for r in caplog.records if "padded" in r.getMessage()]
    if format_name in ("mp4", "webm"):
        assert (result.width, result.height) == (64, 66)
        assert len(padded) == 1 and padded[0].levelno == logging.WARNING
        message = padded[0].getMessage()
        assert "63x65, padded to 64x66" in message and "yuv420p" in message and "even" in message
        assert f"o.{format_name}" in message
    else:  # gif/webp keep any size
        assert (result.width, result.height) == (63, 65) and padded == []


def test_even_sizes_log_no_padding_warning(video, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        video.write_video(video.frames_as_uint8(ramp(2, 32, 48), range(2)), str(tmp_path / "e.mp4"), "mp4", 8)
    assert "padded" not in caplog.text


@pytest.mark.parametrize("format_name", ["gif", "webp"])
def test_loop_count_and_pingpong_are_stored(video, tmp_path, format_name):
    from PIL import Image

    images = torch.stack([constant(v, 1, (16, 16))[0] for v in (0.0, 0.5, 1.0, 0.25)])
    order = video.playback_order(4, pingpong=True)
    path = str(tmp_path / f"pp.{format_name}")
    video.write_video(video.frames_as_uint8(images, order), path, format_name, 10, loop=3)
    with Image.open(path) as im:
        assert im.n_frames == 6 and im.info["loop"] == 3
    frames, _ = decode(path, format_name)
    assert values(frames) == pytest.approx([0.0, 0.5, 1.0, 0.25, 1.0, 0.5], abs=0.02)


def test_encoder_streams_one_frame_at_a_time(video, tmp_path):
    """The frame source is pulled lazily: frame n is requested only after frame n-1 went into the encoder."""
    encoded = []
    lag = []

    def source():
        for i in range(12):
            lag.append(i - len(encoded))
            yield np.full((16, 16, 3), i * 20, np.uint8)

    video.write_video(source(), str(tmp_path / "s.mp4"), "mp4", 8, on_frame=encoded.append)
    assert encoded == list(range(1, 13))
    assert max(lag) <= 1


def test_failure_mid_encoding_leaves_no_file(video, tmp_path):
    def broken():
        for i in range(5):
            if i == 3:
                raise RuntimeError("sampler ran out of memory")
            yield np.zeros((16, 16, 3), np.uint8)

    with pytest.raises(RuntimeError, match="out of memory"):
        video.write_video(broken(), str(tmp_path / "x.mp4"), "mp4", 8)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o027, 0o640)])
@pytest.mark.parametrize("format_name", ["mp4", "gif"])
def test_written_file_gets_the_mode_of_a_new_file_under_the_umask(video, tmp_path, umask, expected, format_name):
    """Like ComfyUI's PNGs (typically 0644), not the 0600 of a mkstemp temporary."""
    previous = os.umask(umask)
    try:
        path = str(tmp_path / "sub" / f"m.{format_name}")
        video.write_video(iter([np.zeros((8, 8, 3), np.uint8)] * 2), path, format_name, 8)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == expected
    assert os.listdir(tmp_path / "sub") == [f"m.{format_name}"]


def test_atomic_path_helper_replaces_or_leaves_nothing(pack, tmp_path):
    from comfyui_storydiffusion.common.files import atomic_path

    target = tmp_path / "bank.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(str(target)) as temporary:
        Path(temporary).write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["bank.safetensors"]
    previous = os.umask(0o022)
    try:
        with atomic_path(str(target)) as temporary:
            Path(temporary).write_bytes(b"new")
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["bank.safetensors"]
    if os.name == "posix":
        assert os.stat(target).st_mode & 0o777 == 0o644


def test_unwritable_folder_is_a_clear_error(video, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(video.VideoError, match="cannot write into the folder"):
        video.write_video(iter([np.zeros((8, 8, 3), np.uint8)]), str(blocker / "v.mp4"), "mp4", 8)


def test_empty_input_and_bad_fps_are_clear_errors(video, tmp_path):
    with pytest.raises(video.VideoError, match="No frames to encode"):
        video.write_video(iter([]), str(tmp_path / "e.mp4"), "mp4", 8)
    with pytest.raises(video.VideoError, match="fps must be above 0"):
        video.write_video(iter([np.zeros((8, 8, 3), np.uint8)]), str(tmp_path / "e.mp4"), "mp4", 0)
    assert os.listdir(tmp_path) == []


def test_unsupported_format_lists_the_encoders_that_exist(video, monkeypatch):
    monkeypatch.setattr(video.encode_module, "_encoder_exists", lambda codec: codec in ("gif", "libvpx"))
    with pytest.raises(video.VideoError) as error:
        video.pick_codec("mp4")
    message = str(error.value)
    assert "libx264, libopenh264, mpeg4" in message and "gif: gif" in message and "webm: libvpx" in message
    assert video.pick_codec("webm") == "libvpx"
    with pytest.raises(video.VideoError, match="unknown video format 'avi'"):
        video.pick_codec("avi")


def test_mp4_falls_back_to_mpeg4_without_h264(video, tmp_path, monkeypatch):
    import av

    real = video._encoder_exists
    monkeypatch.setattr(video.encode_module, "_encoder_exists", lambda codec: codec == "mpeg4" and real(codec))
    result = video.write_video(video.frames_as_uint8(ramp(4), range(4)), str(tmp_path / "f.mp4"), "mp4", 8)
    assert result.codec == "mpeg4"
    with av.open(result.path) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    frames, _ = decode(result.path, "mp4")
    assert frames.shape[0] == 4 and (frames[-1] - ramp(4)[-1]).abs().mean() < 0.03


def test_core_imports_neither_comfyui_nor_pyav_at_import_time():
    import subprocess
    import sys

    import comfy_env

    code = (f"import sys; sys.path.insert(0, {comfy_env.REPO!r}); import video.encode, video.join; "
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('comfy', 'folder_paths', 'av', 'PIL', 'cv2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
