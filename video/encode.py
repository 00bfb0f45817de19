"""Encode a story video: uint8 frames from any iterator go one at a time into a file.

PyAV (mp4, webm, animated webp) or a per-frame-palette gif (Pillow); both are imported only when a
file is written. The file is written to a temporary name and renamed into place only when the
encoder finished: a failure never leaves a partial file behind.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

try:
    from ..common.files import temporary_beside
except ImportError:  # video/ imported as a top-level package (bench/bench_video.py puts the repository on sys.path)
    from common.files import temporary_beside

from .join import VideoError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# frames to uint8, one at a time


def playback_order(frame_count: int, pingpong: bool = False) -> list[int]:
    """Frame indices in playback order; ping-pong plays forward then back without repeating the ends."""
    order = list(range(frame_count))
    if pingpong and frame_count > 2:
        order += list(range(frame_count - 2, 0, -1))
    return order


def frames_as_uint8(images: torch.Tensor, order: Iterable[int]) -> Iterator[np.ndarray]:
    """Yield frames as HxWx3 uint8 arrays (rounded half up), one frame at a time, never the whole batch.

    One float scratch frame is reused for the arithmetic (numpy, in place: ~1 ms per 512x512 frame,
    about a tenth of what fresh torch temporaries cost); each yielded array is a new uint8 frame.
    """
    scratch = np.empty((*images.shape[1:3], 3), dtype=np.float32)
    for index in order:
        frame = images[index, ..., :3].detach()
        if frame.device.type != "cpu" or frame.dtype != torch.float32:
            frame = frame.to("cpu", torch.float32)
        np.multiply(frame.numpy(), 255.0, out=scratch)
        np.add(scratch, 0.5, out=scratch)
        np.clip(scratch, 0.0, 255.0, out=scratch)
        yield scratch.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# encoding


@dataclass(frozen=True)
class VideoFormat:
    name: str
    container: str  # PyAV/FFmpeg muxer name
    codecs: tuple  # preferred encoder first
    even_size: bool  # yuv420p needs even width and height
    # (quality 1..100) -> encoder options; the codec name picks the scale
    quality_note: str


FORMATS = {
    "mp4": VideoFormat("mp4", "mp4", ("libx264", "libopenh264", "mpeg4"), True,
                       "H.264: crf 51-0.4*quality (85 -> 17); mpeg4 fallback: qscale"),
    "webm": VideoFormat("webm", "webm", ("libvpx-vp9", "libvpx"), True, "VP9: crf 63-0.5*quality (85 -> 20)"),
    "gif": VideoFormat("gif", "gif", ("gif",), False, "palette size: 2..256 colours per frame"),
    "webp": VideoFormat("webp", "webp", ("libwebp_anim",), False, "libwebp quality 1..100"),
}


def _encoder_exists(codec: str) -> bool:
    import av

    try:
        av.codec.Codec(codec, "w")
        return True
    except ValueError:  # av.codec.codec.UnknownCodecError: this build has no such encoder
        return False


def available_encoders() -> dict[str, list[str]]:
    """Which of the encoders each format can use are present in this PyAV build."""
    return {name: [c for c in fmt.codecs if _encoder_exists(c)] for name, fmt in FORMATS.items()}


def pick_codec(format_name: str) -> str:
    """The first available encoder for a format, or an error that lists what this machine has."""
    if format_name not in FORMATS:
        raise VideoError(f"unknown video format {format_name!r}; choose one of {', '.join(FORMATS)}.")
    for codec in FORMATS[format_name].codecs:
        if _encoder_exists(codec):
            return codec
    have = {name: codecs for name, codecs in available_encoders().items() if codecs}
    listing = "; ".join(f"{name}: {', '.join(codecs)}" for name, codecs in have.items()) or "none"
    raise VideoError(
        f"format {format_name!r} needs one of the encoders {', '.join(FORMATS[format_name].codecs)}, but the "
        f"installed PyAV/FFmpeg has none of them. Encoders available here: {listing}. Choose another format, "
        f"or install a PyAV wheel built with them (pip install --upgrade av)."
    )


def _codec_options(codec: str, quality: int) -> dict:
    q = max(1, min(100, int(quality)))
    if codec == "libx264":
        return {"crf": str(round(51 - 0.4 * q)), "preset": "medium"}
    if codec in ("libvpx-vp9", "libvpx"):
        return {"crf": str(round(63 - 0.5 * q)), "b": "0", "row-mt": "1"}
    if codec == "libopenh264":
        return {"b": str(int(200_000 + 80_000 * q))}
    if codec == "mpeg4":
        return {"qscale": str(max(1, round(31 - 0.3 * q)))}
    if codec == "libwebp_anim":
        return {"quality": str(q), "lossless": "0"}
    return {}


@dataclass(frozen=True)
class WrittenVideo:
    path: str
    codec: str
    frame_count: int
    width: int
    height: int
    fps: float


def _pad_even(frame: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frame


def _gif_frame(frame: np.ndarray, colours: int):
    """A pal8 frame with its own adaptive palette (PyAV wants the palette as A, R, G, B rows)."""
    import av
    from PIL import Image

    paletted = Image.fromarray(frame).quantize(colours)
    indices = np.asarray(paletted)
    rgb = np.asarray(paletted.getpalette()[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    palette = np.full((256, 4), 255, dtype=np.uint8)
    palette[: len(rgb), 1:] = rgb
    return av.VideoFrame.from_ndarray((indices, palette), format="pal8")


def _open_temporary(path: str) -> str:
    """A hidden temporary file next to `path`, with the mode any new file gets under the umask (0644 under
    the usual 022, like ComfyUI's PNGs; mkstemp would make it 0600), so the renamed video keeps it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        temporary = temporary_beside(path)
    except OSError as e:
        raise VideoError(
            f"cannot write into the folder {folder!r}: {e.strerror or e}. Check that it exists and is writable, "
            f"or change filename_prefix / ComfyUI's --output-directory."
        ) from e
    return temporary


def write_video(frames: Iterable[np.ndarray], path: str, format_name: str, fps: float, quality: int = 85,
                loop: int = 0, metadata: dict | None = None,
                on_frame: Callable[[int], None] | None = None) -> WrittenVideo:
    """Encode uint8 HxWx3 frames into `path`, streaming: each frame is handed to the encoder as it arrives.

    Written to a hidden temporary file in the same folder and renamed with os.replace when complete,
    so `path` either holds the whole video or does not exist. `loop` (gif/webp only): 0 = forever.
    `on_frame(n)` is called after n frames went into the encoder (progress bars).
    """
    import av

    fmt = FORMATS.get(format_name)
    codec = pick_codec(format_name)
    if not fps or fps <= 0:
        raise VideoError(f"fps must be above 0 (got {fps}).")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise VideoError("No frames to encode: the IMAGE batch is empty.")
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise VideoError(f"frames must be HxWx3 uint8 (got {first.dtype} {first.shape}).")
    height, width = first.shape[:2]
    if fmt.even_size and (height % 2 or width % 2):
        # once per file: every frame gets the same padding
        log.warning("StoryDiffusion Video Combine: the frames are %dx%d, padded to %dx%d for %s (%s encodes "
                    "yuv420p, which needs an even width and height; the last column/row is repeated). "
                    "Use even sizes (e.g. multiples of 8) to avoid it.", width, height, width + width % 2,
                    height + height % 2, os.path.basename(path), codec)
        height, width = height + height % 2, width + width % 2
    rate = Fraction(round(fps * 1000), 1000)

    temporary = _open_temporary(path)
    count = 0
    try:
        container_options = {}
        if fmt.container == "mp4":
            container_options["movflags"] = "+faststart+use_metadata_tags"
        if fmt.container in ("gif", "webp"):
            container_options["loop"] = str(max(0, int(loop)))
        with av.open(temporary, mode="w", format=fmt.container, options=container_options) as container:
            for key, value in (metadata or {}).items():
                if fmt.container in ("mp4", "webm"):
                    container.metadata[key] = value
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height = width, height
            if codec == "gif":
                stream.pix_fmt = "pal8"
                colours = max(2, min(256, round(256 * max(1, min(100, quality)) / 100)))
            elif codec != "libwebp_anim":
                stream.pix_fmt = "yuv420p"
            stream.options = _codec_options(codec, quality)

            frame = first
            while frame is not None:
                if frame.shape[:2] != first.shape[:2]:
                    raise VideoError(f"frame {count + 1} is {frame.shape[1]}x{frame.shape[0]}, the first frame "
                                     f"{first.shape[1]}x{first.shape[0]}: all frames must have one size.")
                if codec == "gif":
                    av_frame = _gif_frame(frame, colours)
                else:
                    av_frame = av.VideoFrame.from_ndarray(_pad_even(frame) if fmt.even_size else frame, format="rgb24")
                for packet in stream.encode(av_frame):
                    container.mux(packet)
                count += 1
                if on_frame is not None:
                    on_frame(count)
                frame = next(frames, None)
            for packet in stream.encode(None):
                container.mux(packet)
        os.replace(temporary, path)
    except BaseException as e:
        try:
            os.remove(temporary)
        except OSError:
            pass
        if isinstance(e, VideoError):
            raise
        if isinstance(e, (av.error.FFmpegError, OSError)):
            raise VideoError(f"writing {format_name} with {codec} to {path!r} failed after {count} frames: {e}. "
                             f"No file was written.") from e
        raise
    return WrittenVideo(path, codec, count, width, height, float(rate))
