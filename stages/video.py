"""MP4 encoding and reading with imageio-ffmpeg (H.264, yuv420p, the request's fps)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import imageio_ffmpeg
import numpy as np


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 (rounded); uint8 frames pass through."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """Encode (F, H, W, 3) uint8 frames as an H.264 / yuv420p MP4 and return its bytes.

    Height and width must be even (yuv420p); the request's size rules guarantee it.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    num, height, width, _ = frames.shape
    if num < 1 or height % 2 or width % 2:
        raise ValueError(f"need >= 1 frame with even height and width, got {num} x {height}x{width}")
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="lightx2v-")
    os.close(fd)
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

