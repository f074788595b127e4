"""Request rules of target_fps (frame interpolation, issue 21) and the decode stage applying it."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError

from engine.options import EngineOptions
from engine.registry import ModelSpec, SamplingDefaults
from stages.request import GenerationRequest, RequestError

DEFAULTS = SamplingDefaults(num_frames=17, height=32, width=48, steps=2, guidance_scale=5.0, shift=3.0,
                            sampler="unipc", fps=16, negative_prompt="")
VIDEO = ModelSpec(name="video-model", family="wan", tasks=frozenset({"t2v"}), defaults=DEFAULTS)
IMAGE = dataclasses.replace(VIDEO, name="image-model", tasks=frozenset({"t2i"}), modality="image")


def resolve(spec: ModelSpec = VIDEO, **fields):
    return GenerationRequest(prompt="a fox", **fields).resolve(spec)


def test_resolved_output_fps_and_frames():
    plain = resolve()
    assert plain.target_fps is None and plain.output_fps == 16 and plain.output_num_frames == 17
    up = resolve(target_fps=32)
    assert up.fps == 16 and up.output_fps == 32 and up.output_num_frames == 33     # (17 - 1) * 2 + 1
    assert resolve(target_fps=24).output_num_frames == 25                          # 16 * 1.5 + 1
    assert resolve(fps=8, target_fps=30).output_num_frames == 61                   # floor(16 * 30 / 8) + 1
    assert resolve(target_fps=16).output_num_frames == 17


@pytest.mark.parametrize("fields, message", [
    (dict(target_fps=12), r"target_fps: must be at least the video's fps \(16\).*got 12"),
    (dict(fps=24, target_fps=20), r"target_fps: must be at least the video's fps \(24\)"),
    (dict(target_fps=32, output_type="latent"), "target_fps: is applied to the decoded frames"),
])
def test_resolve_refuses(fields, message):
    with pytest.raises(RequestError, match=message) as err:
        resolve(**fields)
    assert err.value.field == "target_fps"


def test_image_models_refuse_target_fps():
    with pytest.raises(RequestError, match="target_fps: is not accepted"):
        resolve(IMAGE, target_fps=32)


@pytest.mark.parametrize("value", [0, 121, -5])
def test_range_checked_when_built(value):
    with pytest.raises(ValidationError, match=r"target_fps must be in 1\.\.120"):
        GenerationRequest(prompt="a fox", target_fps=value)


def test_engine_option_checked():
    assert EngineOptions(interpolator="tiny").interpolator == "tiny"
    with pytest.raises(ValueError, match="interpolator must be a RIFE flownet.pkl path"):
        EngineOptions(interpolator="")


def test_decode_stage_interpolates_and_refuses_without_interpolator(tiny_wan_dir):
    """DecodeStage on the tiny VAE: frames and fps follow target_fps; a missing checkpoint fails at
    start-up; without an interpolator the stage refuses target_fps with the field's name."""
    from engine.checkpoint import resolve_checkpoint
    from engine.families import get_family
    from stages.decode import DecodeFramesStage, DecodeStage
    from stages.payloads import Latents
    from stages.video import read_mp4

    ckpt = resolve_checkpoint("tiny-wan")
    options = EngineOptions(interpolator="tiny")
    vae = get_family(ckpt.spec.family).load_vae(ckpt, options)
    req = GenerationRequest(prompt="a fox", num_frames=9, height=32, width=48, fps=8, target_fps=24
                            ).resolve(ckpt.spec)
    latents = Latents(latents=torch.randn(req.latent_shape))
    video = DecodeStage(vae, options)(req, latents)
    assert (video.num_frames, video.fps) == (25, 24)
    assert read_mp4(video.data).frames.shape == (25, 32, 48, 3)
    frames = DecodeFramesStage(vae, options)(req, latents)
    assert frames.frames.shape == (25, 32, 48, 3) and frames.fps == 24
    plain = DecodeStage(vae, EngineOptions())
    with pytest.raises(RequestError, match="target_fps: needs a frame interpolator"):
        plain.check_request(req)
    with pytest.raises(RequestError, match="target_fps: needs a frame interpolator"):
        plain(req, latents)
    with pytest.raises(FileNotFoundError, match="no RIFE checkpoint"):
        DecodeStage(vae, EngineOptions(interpolator="/nonexistent/flownet.pkl"))


def test_request_error_survives_pickling():
    """A stage's RequestError crosses Ray processes (the decoder refusing target_fps)."""
    import pickle

    err = pickle.loads(pickle.dumps(RequestError("target_fps", "needs a frame interpolator")))
    assert (err.field, err.message, str(err)) == ("target_fps", "needs a frame interpolator",
                                                  "target_fps: needs a frame interpolator")
