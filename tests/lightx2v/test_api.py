"""The library facade on tiny-wan (CPU, float32): every output type, I2V inputs, errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from lightx2v import LightX2V
from stages.request import RequestError
from stages.video import read_mp4

torch.set_num_threads(1)
SMALL = dict(video_length=5, resolution=(32, 48), steps=2)


@pytest.fixture(scope="module")
def model(tiny_wan_dir):
    return LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32")


def test_mp4_to_given_path(model, tmp_path):
    out = tmp_path / "fox.mp4"
    path = model.generate("a fox", seed=1, fps=12, output_path=str(out), **SMALL)
    assert path == str(out) and out.is_file()
    video = read_mp4(path)
    assert video.frames.shape == (5, 32, 48, 3) and video.fps == 12
    assert video.codec == "h264" and video.pix_fmt == "yuv420p"


def test_mp4_to_temp_file_by_default(model):
    path = model.generate("a fox", seed=1, **SMALL)
    try:
        assert path.endswith(".mp4") and read_mp4(path).frames.shape[0] == 5
        assert read_mp4(path).fps == model.spec.defaults.fps
    finally:
        os.unlink(path)


def test_np_and_latent_outputs_agree(model):
    frames = model.generate("a fox", seed=3, output_type="np", **SMALL)
    assert isinstance(frames, np.ndarray) and frames.dtype == np.float32
    assert frames.shape == (5, 32, 48, 3) and 0.0 <= frames.min() and frames.max() <= 1.0
    assert frames.std() > 1e-3
    latents = model.generate("a fox", seed=3, output_type="latent", **SMALL)
    assert isinstance(latents, torch.Tensor) and latents.shape == (16, 2, 4, 6)
    again = model.generate("a fox", seed=3, output_type="latent", **SMALL)
    torch.testing.assert_close(latents, again, atol=0, rtol=0)
    other = model.generate("a fox", seed=4, output_type="latent", **SMALL)
    assert not torch.allclose(latents, other)
    # Given latents = the seed's noise reproduce the seeded run.
    noise = torch.randn((16, 2, 4, 6), generator=torch.Generator("cpu").manual_seed(3))
    torch.testing.assert_close(model.generate("a fox", latents=noise, output_type="latent", **SMALL), latents)


def test_defaults_and_random_seed_recorded(model):
    latents = model.generate("a fox", output_type="latent")
    req = model.last_result.request
    d = model.spec.defaults
    assert (req.num_frames, req.height, req.width, req.steps) == (d.num_frames, d.height, d.width, d.steps)
    assert latents.shape == req.latent_shape
    again = model.generate("a fox", seed=req.seed, output_type="latent")
    torch.testing.assert_close(latents, again, atol=0, rtol=0)
    assert set(model.last_result.timings) == {"text_encode", "denoise"}


def test_image_to_video_from_path_pil_and_array(model, tmp_path):
    rng = np.random.default_rng(0)
    array = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(array).save(path)
    outs = [model.generate("a fox", image=img, seed=2, output_type="latent", **SMALL)
            for img in (str(path), Image.fromarray(array), array)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)
    assert "image_encode" in model.last_result.timings
    t2v = model.generate("a fox", seed=2, output_type="latent", **SMALL)
    assert not torch.allclose(outs[0], t2v)


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(video_length=0), ValidationError, "num_frames"),   # any count >= 1 is taken (test_examples.py)
    (dict(resolution=(30, 48)), RequestError, "height"),
    (dict(steps=0), ValidationError, "steps"),
    (dict(guidance_scale=float("nan")), ValidationError, "guidance_scale"),
    (dict(sampler="ddim"), ValidationError, "sampler"),
    (dict(output_type="gif"), ValidationError, "output_type"),
    (dict(resolution=480), ValueError, "resolution"),
])
def test_bad_values_name_the_field(model, kwargs, exc, field):
    with pytest.raises(exc, match=field):
        model.generate("a fox", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_suggests_cpu():
    with pytest.raises(RuntimeError, match='device="cpu"'):
        LightX2V.from_pretrained("tiny-wan")  # device="cuda" by default


def test_unknown_engine_option_and_unknown_model():
    with pytest.raises(TypeError, match="unknown engine option.*attn"):
        LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32", attn="sdpa")
    with pytest.raises(ValueError, match="no-such-model"):
        LightX2V.from_pretrained("no-such-model", device="cpu", dtype="float32")


def test_parallel_option_is_validated():
    with pytest.raises(ValueError, match="parallel.cfg"):
        LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32", parallel={"cfg": 3})
    with pytest.raises(TypeError, match="unknown parallel key.*sp; known: cfg, ulysses"):
        LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32", parallel={"sp": 2})
    with pytest.raises(TypeError, match='parallel must be a dict such as {"cfg": 2, "ulysses": 2}'):
        LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32", parallel=(2, 2))


def test_facade_signature_is_the_documented_one():
    """Issue 2 item 7 keeps these exactly (names, order, defaults); extensions are keyword-only."""
    import inspect

    gen = inspect.signature(LightX2V.generate).parameters
    positional = [(n, p.default) for n, p in gen.items()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == [
        ("self", inspect.Parameter.empty), ("prompt", inspect.Parameter.empty),
        ("negative_prompt", None), ("image", None), ("video_length", None), ("resolution", None),
        ("steps", None), ("guidance_scale", None), ("shift", None), ("sampler", None),
        ("seed", None), ("fps", None), ("latents", None), ("output_type", None), ("output_path", None)]
    # output_type's default is the request's (None: the model's modality picks, "mp4" for video)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for n, p in gen.items() if n in ("progress", "should_cancel"))
    pre = inspect.signature(LightX2V.from_pretrained).parameters
    positional = [(n, p.default) for n, p in pre.items()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == [("model", inspect.Parameter.empty), ("device", "cuda"), ("dtype", "bfloat16")]
    assert pre["spec_name"].kind is inspect.Parameter.KEYWORD_ONLY


def test_spec_name_picks_the_entry_and_refuses_one_that_does_not_fit(tiny_wan_dir):
    model = LightX2V.from_pretrained(tiny_wan_dir, device="cpu", dtype="float32", spec_name="tiny-wan")
    assert model.spec.name == "tiny-wan"
    with pytest.raises(ValueError, match="spec_name='wan2.1-t2v-14b' does not fit"):
        LightX2V.from_pretrained(tiny_wan_dir, device="cpu", dtype="float32", spec_name="wan2.1-t2v-14b")
