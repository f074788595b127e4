"""The MP4 encoder registry of stages/video.py (added for the GPU machine, which has OpenCV but
no imageio-ffmpeg binary)."""
from __future__ import annotations

import numpy as np
import pytest

from stages.video import Mp4Encoder, encode_mp4, get_mp4_encoder, list_mp4_encoders, read_mp4


def _frames(n=5, h=32, w=48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(x * 5 + 30 * f) % 256, (y * 5) % 256, np.full_like(x, 50 * f % 256)], -1)
                     for f in range(n)]).astype(np.uint8)


def test_registry_lists_both_and_default_is_usable():
    assert list_mp4_encoders()[:2] == ["imageio-ffmpeg", "opencv"]
    assert get_mp4_encoder().requirement() is None


def test_unknown_encoder_names_the_known_ones():
    with pytest.raises(ValueError, match="imageio-ffmpeg, opencv"):
        encode_mp4(_frames(), 8, encoder="gstreamer")


def test_env_var_selects_the_encoder(monkeypatch):
    monkeypatch.setenv("LIGHTX2V_MP4_ENCODER", "nope")
    with pytest.raises(ValueError, match="unknown MP4 encoder 'nope'"):
        get_mp4_encoder()


def test_unusable_encoder_is_refused_with_its_reason(monkeypatch):
    import stages.video as video

    monkeypatch.setitem(video._ENCODERS, "broken", Mp4Encoder("broken", lambda f, fps, crf: b"",
                                                               lambda: "no such library"))
    with pytest.raises(ValueError, match="no such library"):
        encode_mp4(_frames(), 8, encoder="broken")


def test_opencv_encoder_roundtrip():
    pytest.importorskip("cv2")
    frames = _frames()
    video = read_mp4(encode_mp4(frames, 12, encoder="opencv"))
    assert video.frames.shape == frames.shape and video.fps == pytest.approx(12)
    assert video.codec in ("h264", "mpeg4") and video.pix_fmt == "yuv420p"
    assert np.abs(video.frames.astype(int) - frames.astype(int)).mean() < 12
