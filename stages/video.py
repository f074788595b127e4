"""MP4 encoding and reading (H.264, yuv420p, the request's fps).

Encoders form a small registry: "imageio-ffmpeg" (H.264 via the ffmpeg binary imageio-ffmpeg
bundles; the default) and "opencv" (OpenCV's VideoWriter: H.264 when its FFMPEG build has an
encoder, else MPEG-4 part 2), for machines without the imageio-ffmpeg binary (the GPU machine).
`encode_mp4` uses the encoder named by `LIGHTX2V_MP4_ENCODER`, else the first usable one.
"""
from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 (rounded); uint8 frames pass through."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18, encoder: str | None = None) -> bytes:
    """Encode (F, H, W, 3) uint8 frames as an MP4 and return its bytes.

    Height and width must be even (yuv420p); the request's size rules guarantee it.
    `encoder`: a registered name; None = `$LIGHTX2V_MP4_ENCODER`, else the first usable one.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    num, height, width, _ = frames.shape
    if num < 1 or height % 2 or width % 2:
        raise ValueError(f"need >= 1 frame with even height and width, got {num} x {height}x{width}")
    return get_mp4_encoder(encoder).encode(frames, fps, crf)


@dataclass(frozen=True)
class Mp4Encoder:
    """One way to write MP4 bytes from uint8 frames."""

    name: str
    encode: Callable[[np.ndarray, int, int], bytes]
    """(frames (F, H, W, 3) uint8, fps, crf) -> MP4 bytes."""
    requirement: Callable[[], str | None]
    """None when usable here, else the reason it is not."""


_ENCODERS: dict[str, Mp4Encoder] = {}


def register_mp4_encoder(encoder: Mp4Encoder) -> None:
    _ENCODERS[encoder.name] = encoder


def list_mp4_encoders() -> list[str]:
    return list(_ENCODERS)


def get_mp4_encoder(name: str | None = None) -> Mp4Encoder:
    """The named encoder (ValueError naming the known ones / why it cannot run), or the first
    usable one when `name` and `$LIGHTX2V_MP4_ENCODER` are unset."""
    name = name or os.environ.get("LIGHTX2V_MP4_ENCODER") or None
    if name is not None:
        if name not in _ENCODERS:
            raise ValueError(f"unknown MP4 encoder {name!r}; known: {', '.join(_ENCODERS)}")
        reason = _ENCODERS[name].requirement()
        if reason is not None:
            raise ValueError(f"MP4 encoder {name!r} cannot run here: {reason}")
        return _ENCODERS[name]
    reasons = {}
    for encoder in _ENCODERS.values():
        reasons[encoder.name] = encoder.requirement()
        if reasons[encoder.name] is None:
            return encoder
    raise RuntimeError("no MP4 encoder can run here: "
                       + "; ".join(f"{k}: {v}" for k, v in reasons.items()))


def temp_mp4() -> str:
    """A new empty .mp4 file in the temp dir (the caller owns it)."""
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="lightx2v-")
    os.close(fd)
    return path


# -- imageio-ffmpeg: H.264 (libx264), yuv420p -------------------------------------------------
@functools.lru_cache(maxsize=None)
def _imageio_ffmpeg_requirement() -> str | None:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # ImportError, or RuntimeError when the binary is missing
        return f"imageio-ffmpeg or its ffmpeg binary is missing ({e})"
    return None


def _imageio_ffmpeg_encode(frames: np.ndarray, fps: int, crf: int) -> bytes:
    import imageio_ffmpeg

    num, height, width, _ = frames.shape
    path = temp_mp4()
    try:
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=fps,
            codec="libx264", quality=None, macro_block_size=1,
            output_params=["-crf", str(crf), "-movflags", "+faststart"],
        )
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


# -- OpenCV: H.264 ("avc1") when its FFMPEG build can, else MPEG-4 part 2 ("mp4v") ------------
_OPENCV_FOURCCS = ("avc1", "mp4v")


@functools.lru_cache(maxsize=None)
def _opencv_fourcc() -> str | None:
    """The first fourcc this OpenCV can write to .mp4 (probed once with a tiny file)."""
    import cv2

    for fourcc in _OPENCV_FOURCCS:
        path = temp_mp4()
        try:
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 8, (16, 16))
            ok = writer.isOpened()
            writer.release()
        finally:
            os.unlink(path)
        if ok:
            return fourcc
    return None


@functools.lru_cache(maxsize=None)
def _opencv_requirement() -> str | None:
    try:
        import cv2  # noqa: F401
    except ImportError as e:
        return f"OpenCV (cv2) is not installed ({e})"
    if _opencv_fourcc() is None:
        return f"this OpenCV cannot write MP4 with any of {_OPENCV_FOURCCS}"
    return None


def _opencv_encode(frames: np.ndarray, fps: int, crf: int) -> bytes:
    import cv2

    num, height, width, _ = frames.shape
    path = temp_mp4()
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*_opencv_fourcc()), fps, (width, height))
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
        writer.release()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


register_mp4_encoder(Mp4Encoder("imageio-ffmpeg", _imageio_ffmpeg_encode, _imageio_ffmpeg_requirement))
register_mp4_encoder(Mp4Encoder("opencv", _opencv_encode, _opencv_requirement))


@dataclass
class DecodedMP4:
    """What `read_mp4` found in a file."""

    frames: np.ndarray
    """(F, H, W, 3) uint8."""
    fps: float
    codec: str
    pix_fmt: str


def read_mp4(source: str | bytes) -> DecodedMP4:
    """Read every frame of an MP4 (a path or its bytes) with its fps, codec and pixel format."""
    path, tmp = source, None
    if isinstance(source, (bytes, bytearray)):
        fd, tmp = tempfile.mkstemp(suffix=".mp4", prefix="lightx2v-read-")
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        path = tmp
    try:
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        meta = reader.__next__()
        width, height = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
        codec = str(meta.get("codec", ""))
        pix_fmt = str(meta.get("pix_fmt", "")).split("(", 1)[0]
        return DecodedMP4(np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8),
                          float(meta["fps"]), codec, pix_fmt)
    finally:
        if tmp is not None:
            os.unlink(tmp)

