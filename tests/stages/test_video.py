"""MP4 encoding: H.264, yuv420p, the asked fps, every frame, pixels close to the input."""
from __future__ import annotations

import numpy as np
import pytest

from stages.video import encode_mp4, frames_to_uint8, read_mp4


def smooth_frames(num: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.stack([(x * 4 + 20 * f) % 256, (y * 4) % 256, np.full_like(x, 40 * f % 256)], -1)
              for f in range(num)]
    return np.stack(frames).astype(np.uint8)


@pytest.mark.parametrize("num, height, width, fps", [(1, 16, 16, 16), (5, 32, 48, 8), (9, 64, 32, 24)])
def test_mp4_roundtrip(num, height, width, fps, tmp_path):
    frames = smooth_frames(num, height, width)
    data = encode_mp4(frames, fps)
    assert data[4:8] == b"ftyp"
    for source in (data, str(_write(tmp_path / "v.mp4", data))):
        video = read_mp4(source)
        assert video.frames.shape == (num, height, width, 3)
        assert video.fps == pytest.approx(fps)
        assert video.codec == "h264" and video.pix_fmt == "yuv420p"
        # Lossy, but close: mean abs error of a few levels on smooth content.
        assert np.abs(video.frames.astype(int) - frames.astype(int)).mean() < 8


def test_frames_to_uint8_rounds_and_clips():
    f = np.array([[[[-0.1, 0.0, 0.5], [1.0, 1.2, 0.998]]]], dtype=np.float32)
    assert frames_to_uint8(f).tolist() == [[[[0, 0, 128], [255, 255, 254]]]]


@pytest.mark.parametrize("frames", [np.zeros((2, 16, 16, 3), np.float32), np.zeros((2, 15, 16, 3), np.uint8),
                                    np.zeros((0, 16, 16, 3), np.uint8), np.zeros((2, 16, 16), np.uint8)])
def test_bad_frames_refused(frames):
    with pytest.raises(ValueError, match="frame"):
        encode_mp4(frames, 8)


def _write(path, data):
    path.write_bytes(data)
    return path
