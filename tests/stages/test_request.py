"""Request validation: every rule, each error naming its field and the allowed values."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from engine.registry import ModelSpec, SamplingDefaults
from stages.request import GenerationRequest, RequestError, ResolvedRequest, latent_shape

DEFAULTS = SamplingDefaults(num_frames=5, height=32, width=48, steps=2, guidance_scale=5.0, shift=3.0,
                            sampler="unipc", fps=8, negative_prompt="blurry")


def make_spec(tasks=("t2v",), name="test-model") -> ModelSpec:
    return ModelSpec(name=name, family="wan", tasks=frozenset(tasks), defaults=DEFAULTS,
                     max_prompt_chars=100)  # default latent geometry: strides 16 (8 x patch 2) and 4


T2V, I2V, BOTH = make_spec(("t2v",), "t2v-only"), make_spec(("i2v",), "i2v-only"), make_spec(("t2v", "i2v"), "both")
IMAGE = Image.new("RGB", (40, 24), (10, 200, 30))


def png_bytes(image: Image.Image = IMAGE) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ rules checked when built

@pytest.mark.parametrize("field, value, allowed", [
    ("prompt", "", "non-empty"),
    ("prompt", "   ", "non-empty"),
    ("num_frames", 0, "1.."),
    ("num_frames", -3, "1.."),
    ("num_frames", 5000, "1..1025"),
    ("height", 0, "1..4096"),
    ("width", 5000, "1..4096"),
    ("steps", 0, "1..1000"),
    ("steps", 1001, "1..1000"),
    ("guidance_scale", -0.5, ">= 0"),
    ("guidance_scale", float("nan"), "finite"),
    ("guidance_scale", float("inf"), "finite"),
    ("shift", 0.0, "0.01..100"),
    ("shift", -1.0, "0.01..100"),
    ("shift", float("nan"), "0.01..100"),
    ("shift", 0.001, "0.01..100"),     # sigmas round to 0: NaN latents
    ("shift", 1000.0, "0.01..100"),    # sigmas round to 1: the samplers' log(1 - sigma) fails
    ("sampler", "ddim", "unipc, euler, euler_a, dpmpp_2m"),
    ("seed", -1, "0..2**63-1"),
    ("seed", 2**63, "0..2**63-1"),
    ("fps", 0, "1..120"),
    ("fps", 121, "1..120"),
    ("output_type", "gif", "mp4"),
    ("image", "not base64 !!", "base64"),
    ("image", b"not an image", "decoded"),
    ("image", np.zeros((4, 4)), "(H, W, 3)"),
    ("image", np.full((4, 4, 3), np.nan, np.float32), "finite"),
    ("latents", "noise", "tensor"),
    ("latents", torch.zeros(16, 2, 2), "(C, F_lat, H_lat, W_lat)"),
    ("latents", torch.full((16, 2, 2, 3), float("nan")), "finite"),
    ("latents", torch.zeros(16, 2, 2, 3, dtype=torch.int64), "floating"),
])
def test_field_rules(field, value, allowed):
    kwargs = {"prompt": "a cat"}
    kwargs[field] = value
    with pytest.raises(ValidationError) as e:
        GenerationRequest(**kwargs)
    errors = e.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"][0] == field
    msg = str(e.value)
    assert field in msg and allowed in msg, msg


def test_unknown_field_refused():
    with pytest.raises(ValidationError, match="num_frame"):
        GenerationRequest(prompt="a", num_frame=5)


@pytest.mark.parametrize("field, value", [
    ("num_frames", 1), ("num_frames", 1025), ("steps", 1), ("steps", 1000), ("guidance_scale", 0.0),
    ("guidance_scale", 1.0), ("shift", 0.01), ("shift", 100.0), ("seed", 0), ("seed", 2**63 - 1), ("fps", 1), ("fps", 120),
    ("sampler", "euler"), ("sampler", "dpmpp2m"),
])
def test_boundary_values_accepted(field, value):
    assert getattr(GenerationRequest(prompt="a", **{field: value}), field) == value


# ------------------------------------------------------------------ rules checked against the model

@pytest.mark.parametrize("spec, kwargs, field, allowed", [
    (T2V, {"height": 40}, "height", "multiple of 16"),
    (T2V, {"width": 50}, "width", "multiple of 16"),
    (T2V, {"height": 8}, "height", "multiple of 16"),
    (T2V, {"prompt": "x" * 101}, "prompt", "at most 100"),
    (T2V, {"negative_prompt": "x" * 101}, "negative_prompt", "at most 100"),
    (T2V, {"image": IMAGE}, "image", "text-to-video"),
    (I2V, {}, "image", "required"),
    (T2V, {"latents": torch.zeros(16, 2, 4, 4)}, "latents", "(16, 2, 4, 6)"),
    (T2V, {"latents": torch.zeros(4, 2, 4, 6)}, "latents", "(16, 2, 4, 6)"),
])
def test_model_rules(spec, kwargs, field, allowed):
    req = GenerationRequest(**{"prompt": "a cat", **kwargs})
    with pytest.raises(RequestError) as e:
        req.resolve(spec)
    assert e.value.field == field
    assert field in str(e.value) and allowed in str(e.value)
    assert isinstance(e.value, ValueError)


def test_resolve_fills_defaults_and_freezes():
    r = GenerationRequest(prompt="a cat").resolve(T2V)
    assert isinstance(r, ResolvedRequest)
    assert (r.num_frames, r.height, r.width, r.steps, r.fps) == (5, 32, 48, 2, 8)
    assert (r.guidance_scale, r.shift, r.sampler, r.negative_prompt) == (5.0, 3.0, "unipc", "blurry")
    assert r.model == "t2v-only" and r.output_type == "mp4" and r.task == "t2v" and r.do_cfg
    assert r.latent_shape == (16, 2, 4, 6) == latent_shape(T2V, 5, 32, 48)
    assert 0 <= r.seed <= 2**63 - 1
    with pytest.raises(ValidationError):
        r.steps = 3  # frozen


def test_resolve_keeps_given_values():
    r = GenerationRequest(prompt="p", negative_prompt="", num_frames=9, height=64, width=16, steps=3,
                          guidance_scale=1.0, shift=2.0, sampler="euler", seed=7, fps=24,
                          output_type="np").resolve(T2V)
    assert (r.num_frames, r.height, r.width, r.steps, r.guidance_scale, r.shift, r.sampler, r.seed, r.fps) == \
        (9, 64, 16, 3, 1.0, 2.0, "euler", 7, 24)
    assert r.negative_prompt == "" and r.output_type == "np"
    assert not r.do_cfg  # guidance <= 1: no negative branch


def test_random_seed_is_drawn_per_request():
    seeds = {GenerationRequest(prompt="a").resolve(T2V).seed for _ in range(4)}
    assert len(seeds) > 1


@pytest.mark.parametrize("value", [
    IMAGE, png_bytes(), base64.b64encode(png_bytes()).decode(),
    "data:image/png;base64," + base64.b64encode(png_bytes()).decode(),
    np.asarray(IMAGE), np.asarray(IMAGE).astype(np.float32) / 255.0,
])
def test_image_forms(value):
    r = GenerationRequest(prompt="a", image=value).resolve(I2V)
    assert isinstance(r.image, Image.Image) and r.image.size == (40, 24) and r.image.mode == "RGB"
    assert r.image.getpixel((3, 3)) == (10, 200, 30)
    assert r.task == "i2v"


def test_image_path_string_is_not_opened(tmp_path):
    path = tmp_path / "x.png"
    IMAGE.save(path)
    with pytest.raises(ValidationError, match="file paths are opened by the caller"):
        GenerationRequest(prompt="a", image=str(path))


def test_both_tasks_model_takes_either():
    assert GenerationRequest(prompt="a").resolve(BOTH).task == "t2v"
    assert GenerationRequest(prompt="a", image=IMAGE).resolve(BOTH).task == "i2v"


def test_latents_batch_dim_and_dtype():
    lat = torch.randn(1, 16, 2, 4, 6, dtype=torch.float64)
    r = GenerationRequest(prompt="a", latents=lat).resolve(T2V)
    assert r.latents.shape == (16, 2, 4, 6) and r.latents.dtype == torch.float32
    torch.testing.assert_close(r.latents, lat[0].float())


def test_request_pickles():
    import pickle

    r = GenerationRequest(prompt="a", image=IMAGE, height=32, width=48,
                          latents=torch.zeros(16, 2, 4, 6)).resolve(BOTH)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.seed == r.seed and r2.image.size == r.image.size and r2.latents.shape == r.latents.shape


def test_huge_image_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buf, format="PNG")
    with pytest.raises(ValidationError, match="image must have at most"):
        GenerationRequest(prompt="a", image=buf.getvalue())


def test_truncated_image_refused():
    with pytest.raises(ValidationError, match="could not be decoded"):
        GenerationRequest(prompt="a", image=png_bytes()[:60])
