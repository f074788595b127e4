"""Frame interpolation to a request's target_fps (issue 21) through the library facade and the
CLI on tiny-wan with the tiny RIFE interpolator (CPU, float32)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightx2v import LightX2V
from stages.request import RequestError
from stages.video import read_mp4

torch.set_num_threads(1)
SMALL = dict(resolution=(32, 48), steps=2, seed=7)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model(tiny_wan_dir):
    return LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32", interpolator="tiny")


def test_generate_mp4_at_target_fps(model, tmp_path):
    path = model.generate("a fox", video_length=17, target_fps=32, fps=16,
                          output_path=str(tmp_path / "fox.mp4"), **SMALL)
    video = read_mp4(path)
    assert video.frames.shape == (33, 32, 48, 3) and video.fps == 32          # (17 - 1) * 2 + 1
    # the model's own fps (8) to 32: four times the frames
    video = read_mp4(model.generate("a fox", video_length=17, target_fps=32,
                                    output_path=str(tmp_path / "x4.mp4"), **SMALL))
    assert video.frames.shape == (65, 32, 48, 3) and video.fps == 32
    assert model.last_result.request.output_num_frames == 65


def test_interpolated_frames_keep_the_decoded_ones(model, monkeypatch):
    """Every second frame is the decoded frame itself. tiny-wan's random-weight frames are
    unrelated noise, so every pair is a scene cut and the frames between repeat the earlier one
    (as Practical-RIFE does); with cut detection off they are new pictures."""
    interp = model.pipeline.decode.interpolator
    assert interp is model.pipeline.decode_frames.interpolator          # loaded once, shared
    base = model.generate("a fox", video_length=9, fps=16, output_type="np", **SMALL)
    up = model.generate("a fox", video_length=9, fps=16, target_fps=32, output_type="np", **SMALL)
    assert base.shape == (9, 32, 48, 3) and up.shape == (17, 32, 48, 3)
    np.testing.assert_array_equal(up[::2], base)
    np.testing.assert_array_equal(up[1::2], base[:-1])                 # all cuts: copies
    monkeypatch.setattr(interp, "scene_threshold", None)
    up = model.generate("a fox", video_length=9, fps=16, target_fps=32, output_type="np", **SMALL)
    np.testing.assert_array_equal(up[::2], base)
    for k in range(1, 17, 2):
        assert np.abs(up[k] - up[k - 1]).max() > 1e-2 and np.abs(up[k] - up[k + 1]).max() > 1e-2
    # same fps: nothing to make, the decoded frames as they are
    np.testing.assert_array_equal(
        model.generate("a fox", video_length=9, fps=16, target_fps=16, output_type="np", **SMALL), base)


def test_target_below_fps_is_a_clear_error(model):
    with pytest.raises(RequestError, match=r"target_fps: must be at least the video's fps \(16\)"):
        model.generate("a fox", video_length=9, fps=16, target_fps=12, **SMALL)


def test_without_an_interpolator_target_fps_is_refused_before_any_work(tiny_wan_dir):
    plain = LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32")
    steps = []
    with pytest.raises(RequestError, match="target_fps: needs a frame interpolator.*interpolator"):
        plain.generate("a fox", video_length=9, target_fps=32, progress=lambda i, n: steps.append(i), **SMALL)
    assert steps == []  # refused before denoising, never a silent no-op


def test_cli_target_fps(tiny_wan_dir, tmp_path):
    out = tmp_path / "cli.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "lightx2v.cli", "generate", "--model", "tiny-wan", "--prompt", "a fox",
                        "--video-length", "9", "--size", "48x32", "--steps", "2", "--fps", "16",
                        "--target-fps", "32", "--interpolator", "tiny", "--device", "cpu", "-o", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    video = read_mp4(str(out))
    assert video.frames.shape == (17, 32, 48, 3) and video.fps == 32
