"""API field mapping: size, seconds -> frames, model, input_reference, errors naming the field."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from engine.registry import get_spec
from serving.api import ApiError, build_request, seconds_to_frames, video_object
from serving.jobstore import JobRecord, new_job_id


@pytest.fixture(scope="module")
def spec():
    return get_spec("tiny-wan")  # 64x64, 9 frames, 8 fps, stride 16 / 4


def _png(w=64, h=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("seconds,fps,frames", [
    (1, 16, 17), (5, 16, 81), ("5", 16, 81), (0.01, 16, 1), (2, 24, 49), (1.1, 16, 17), (1.2, 16, 21),
])
def test_seconds_to_frames(seconds, fps, frames):
    assert seconds_to_frames(seconds, fps, 4) == frames
    assert (frames - 1) % 4 == 0


def test_openai_fields_map_to_request(spec):
    req = build_request({"prompt": "a cat", "size": "48x32", "seconds": "2", "model": "tiny-wan",
                         "steps": "3", "seed": "7", "guidance_scale": "1.0"}, spec, ("tiny-wan",))
    assert (req.width, req.height) == (48, 32)
    assert req.num_frames == 17 and req.fps == 8  # 2 s at the model's 8 fps -> 16 -> 4k+1 = 17
    assert (req.steps, req.seed, req.guidance_scale) == (3, 7, 1.0)
    assert req.image is None


def test_seconds_use_the_request_fps(spec):
    req = build_request({"prompt": "x", "seconds": 1, "fps": 16}, spec, ("tiny-wan",))
    assert req.num_frames == 17 and req.fps == 16


def test_input_reference_bytes_and_data_url(spec):
    req = build_request({"prompt": "x", "input_reference": _png()}, spec, ("tiny-wan",))
    assert req.image is not None and req.task == "i2v"
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    req2 = build_request({"prompt": "x", "input_reference": {"image_url": url}}, spec, ("tiny-wan",))
    assert req2.image.size == (64, 64)


@pytest.mark.parametrize("fields,status,param", [
    ({}, 400, "prompt"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "model": "sora-2"}, 400, "model"),
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "size": "50x64"}, 400, "size"),             # not a multiple of 16
    ({"prompt": "x", "seconds": "-1"}, 400, "seconds"),
    ({"prompt": "x", "seconds": "1", "num_frames": 5}, 400, "seconds"),
    ({"prompt": "x", "num_frames": 0}, 422, "num_frames"),
    ({"prompt": "x", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "steps": "many"}, 422, "steps"),
    ({"prompt": "x", "guidance_scale": "nan"}, 422, "guidance_scale"),
    ({"prompt": "x", "shift": 0}, 422, "shift"),
    ({"prompt": "x", "sampler": "ddim"}, 422, "sampler"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "fps": 0}, 422, "fps"),
    ({"prompt": " "}, 422, "prompt"),
    ({"prompt": "x" * 9000}, 400, "prompt"),
    ({"prompt": "x", "negative_prompt": "x" * 9000}, 400, "negative_prompt"),
    ({"prompt": "x", "input_reference": b"not an image"}, 422, "input_reference"),
    ({"prompt": "x", "input_reference": {"image_url": "https://example.com/a.png"}}, 400, "input_reference"),
    ({"prompt": "x", "input_reference": {"file_id": "file_1"}}, 400, "input_reference"),
])
def test_errors_name_the_field(spec, fields, status, param):
    with pytest.raises(ApiError) as info:
        build_request(fields, spec, ("tiny-wan",))
    assert info.value.status == status, info.value.message
    assert info.value.param == param
    assert param in info.value.message
    body = info.value.body()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error"


def test_video_object_shape():
    job = JobRecord(id=new_job_id(), created_at=5, status="failed", model="tiny-wan", prompt="p",
                    size="64x64", seconds="1.12", error_code="interrupted", error_message="why",
                    params={"num_frames": 9, "fps": 8, "seed": 1, "steps": 4})
    v = video_object(job)
    assert v["object"] == "video" and v["error"] == {"code": "interrupted", "message": "why"}
    for key in ("id", "created_at", "completed_at", "status", "progress", "model", "size", "seconds", "prompt"):
        assert key in v
