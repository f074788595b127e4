"""Any frame count >= 1 (the next temporal_stride*k+1 generated, the asked frames delivered), and
the size of an image-to-video request that gives none (the image's aspect ratio at the model's
default area, as diffusers' Wan I2V example computes it)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import stages.request as request_module
from engine.registry import get_spec
from stages.request import GenerationRequest, ResolvedRequest, image_video_size, valid_frame_count

TINY = get_spec("tiny-wan")


def diffusers_i2v_size(image: Image.Image, max_area: int, mod_value: int) -> tuple[int, int]:
    """diffusers/pipelines/wan/pipeline_wan_i2v.py, EXAMPLE_DOC_STRING, as written there."""
    aspect_ratio = image.height / image.width
    height = round(np.sqrt(max_area * aspect_ratio)) // mod_value * mod_value
    width = round(np.sqrt(max_area / aspect_ratio)) // mod_value * mod_value
    return height, width


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize("asked, generated", [(1, 1), (2, 5), (4, 5), (5, 5), (16, 17), (24, 25), (81, 81),
                                              (1024, 1025)])
def test_the_next_valid_count_is_generated(asked, generated):
    assert valid_frame_count(TINY, asked) == generated
    r = GenerationRequest(prompt="a", num_frames=asked, height=32, width=32).resolve(TINY)
    assert (r.num_frames, r.kept_frames, r.output_num_frames) == (generated, asked, asked)
    assert r.latent_shape[1] == (generated - 1) // 4 + 1                      # latents hold the generated


def test_initial_noise_follows_the_generated_count():
    GenerationRequest(prompt="a", num_frames=16, height=32, width=32,
                      latents=torch.zeros(16, 5, 4, 4)).resolve(TINY)        # 17 frames -> 5 latent frames
    with pytest.raises(ValueError, match=r"latents: must have shape \(16, 5, 4, 4\) .* for 17 frames"):
        GenerationRequest(prompt="a", num_frames=16, height=32, width=32,
                          latents=torch.zeros(16, 4, 4, 4)).resolve(TINY)


def test_the_rounding_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(request_module, "_warned_frames", False)
    with caplog.at_level(logging.WARNING, logger="stages.request"):
        GenerationRequest(prompt="a", num_frames=9).resolve(TINY)            # valid: no warning
        assert caplog.records == []
        GenerationRequest(prompt="a", num_frames=16).resolve(TINY)
        GenerationRequest(prompt="a", num_frames=24).resolve(TINY)
    assert [r.getMessage() for r in caplog.records] == [
        "num_frames=16 is not 4*k+1 for tiny-wan: 17 frames are generated and the first 16 kept "
        "(logged once per process)"]


def test_kept_frames_defaults_to_num_frames_and_never_exceeds_it():
    base = dict(model="m", prompt="a", negative_prompt="", image=None, num_frames=9, height=32, width=32,
                steps=1, guidance_scale=1.0, shift=1.0, sampler="euler", seed=0, fps=8, output_type="np",
                latents=None, latent_shape=(16, 3, 4, 4))
    assert ResolvedRequest(**base).kept_frames == 9
    with pytest.raises(ValueError, match=r"kept_frames must be in 1..num_frames \(9\), got 10"):
        ResolvedRequest(**base, kept_frames=10)


@pytest.fixture(scope="module")
def model():
    from lightx2v import LightX2V

    return LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32")


def test_the_output_has_exactly_the_frames_asked_the_first_ones(model):
    kw = dict(resolution=(32, 32), steps=2, seed=3)
    full = model.generate("a fox", video_length=17, output_type="np", **kw)
    cut = model.generate("a fox", video_length=16, output_type="np", **kw)   # 17 generated, 16 kept
    assert full.shape == (17, 32, 32, 3) and cut.shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(cut, full[:16])
    assert np.abs(full[1:17] - full[:16]).max() > 1e-3                        # so the first ones, not any
    assert model.generate("a fox", video_length=6, output_type="latent", **kw).shape[1] == 3   # 9 generated
    model.generate("a fox", video_length=6, **kw)                             # mp4: the decode stage checks
    assert model.last_result.output.num_frames == 6 and model.last_result.request.num_frames == 9


def test_http_num_frames_takes_any_count():
    from serving.api import build_request, request_params

    r = build_request({"prompt": "a", "num_frames": 16, "size": "32x32"}, TINY, ("tiny-wan",))
    assert (r.num_frames, r.kept_frames) == (17, 16)
    assert request_params(r)["num_frames"] == 16                             # what the video object reports


# --------------------------------------------------------------------------- image-to-video size


@pytest.mark.parametrize("spec_name, image_wh, expected_hw", [
    ("wan2.1-i2v-14b-480p", (1280, 720), (464, 832)),      # 480*832 area, stride 16
    ("wan2.1-i2v-14b-480p", (720, 1280), (832, 464)),      # portrait
    ("wan2.1-i2v-14b-720p", (1024, 1024), (960, 960)),     # 720*1280 area, square image
    ("wan2.2-ti2v-5b", (1280, 720), (704, 1248)),          # 704*1280 area, stride 32
    ("tiny-wan", (1280, 720), (48, 80)),                   # 64*64 area, stride 16
])
def test_image_to_video_size_is_diffusers_example(spec_name, image_wh, expected_hw):
    spec = get_spec(spec_name)
    image = Image.new("RGB", image_wh)
    d = spec.defaults
    assert diffusers_i2v_size(image, d.height * d.width, spec.spatial_stride) == expected_hw
    assert image_video_size(spec, image) == expected_hw
    r = GenerationRequest(prompt="a", image=image).resolve(spec)
    assert (r.height, r.width) == expected_hw


def test_a_given_resolution_wins_and_extreme_images_stay_in_range():
    spec = get_spec("wan2.1-i2v-14b-480p")
    image = Image.new("RGB", (1280, 720))
    r = GenerationRequest(prompt="a", image=image, height=480, width=480).resolve(spec)
    assert (r.height, r.width) == (480, 480)
    r = GenerationRequest(prompt="a", image=image, height=320).resolve(spec)     # one side: the other default
    assert (r.height, r.width) == (320, spec.defaults.width)
    assert image_video_size(spec, Image.new("RGB", (8000, 2))) == (16, 4096)    # clamped to the limits
    assert image_video_size(get_spec("tiny-wan"), Image.new("RGB", (8000, 2))) == (16, 4048)    # at least one stride


def test_image_to_video_through_the_pipeline(model):
    frames = model.generate("a fox", image=Image.new("RGB", (1280, 720), (200, 30, 30)), video_length=24,
                            steps=1, seed=0, output_type="np")
    assert frames.shape == (24, 48, 80, 3)
