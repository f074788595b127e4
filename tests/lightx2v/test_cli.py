"""`lightx2v generate` end to end in a subprocess on tiny-wan (CPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stages.video import read_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lightx2v(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "lightx2v.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_writes_mp4_with_timings(tiny_wan_dir, tmp_path):
    out = tmp_path / "x.mp4"
    r = lightx2v("generate", "--model", "tiny-wan", "--prompt", "a red fox", "--video-length", "9",
                 "--size", "48x32", "--steps", "3", "--fps", "12", "--seed", "5", "--device", "cpu",
                 "-o", str(out))
    assert r.returncode == 0, r.stderr
    video = read_mp4(str(out))
    assert video.frames.shape == (9, 32, 48, 3) and video.fps == 12
    assert video.codec == "h264" and video.pix_fmt == "yuv420p"
    assert "seed 5" in r.stdout and "3 steps" in r.stdout
    for stage in ("load", "text_encode", "denoise", "decode", "total"):
        assert stage in r.stdout
    assert "denoising" in r.stderr and "3/3" in r.stderr  # tqdm bar over the steps


def test_generate_image_to_video(tiny_wan_dir, tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "i2v.mp4"
    r = lightx2v("generate", "--prompt", "a red fox", "--image", str(img), "--video-length", "5",
                 "--size", "32x32", "--steps", "2", "--device", "cpu", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert read_mp4(str(out)).frames.shape == (5, 32, 32, 3)
    assert "image_encode" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--video-length", "0"], "num_frames must be in 1..1025"),
    (["--steps", "0"], "steps must be in 1..1000"),
    (["--size", "40x32"], "width: must be a multiple of 16"),
    (["--sampler", "ddim"], "sampler must be one of unipc, euler"),  # the registry's names follow
])
def test_bad_values_exit_2_before_loading(args, message, tmp_path, capsys, monkeypatch):
    from lightx2v import LightX2V
    from lightx2v.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded for an invalid request")

    monkeypatch.setattr(LightX2V, "from_pretrained", no_loading)
    code = main(["generate", "--prompt", "x", *args, "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "x.mp4").exists()


def test_models_lists_registry(capsys):
    from lightx2v.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-wan", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"):
        assert name in out


def test_generate_does_not_import_ray_serve():
    code = ("import sys; from lightx2v.cli import build_parser; build_parser(); "
            "import lightx2v.api, stages.pipeline, engine.loading, engine.families; "
            "print('ray.serve' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    from lightx2v.cli import main

    code = main(["generate", "--prompt", "x", "--device", "cuda", "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "cpu" in err, err
