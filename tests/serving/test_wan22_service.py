"""Wan2.2 through the Serve graph, same Videos API: a two-expert app (tiny-wan2.2-a14b, the
`lightx2v serve --model tiny-wan2.2-a14b` graph) and a TI2V app (tiny-wan2.2-ti2v, 48-channel
latents and the Wan2.2 VAE) on the session's Serve instance; `guidance_scale_2` is an API field
for two-expert models and a 400 naming it for the others."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from stages.video import read_mp4

pytestmark = pytest.mark.ray


def _app(served, tmp_path_factory, model: str, name: str):
    from ray import serve

    from serving.app import build_app

    app = build_app({"model": model, "data_dir": str(tmp_path_factory.mktemp(f"{name}-data")), "replica_cpus": 0})
    serve.run(app, name=name, route_prefix=f"/{name}")
    return httpx.Client(base_url=f"{served.base_url}/{name}", timeout=60)


@pytest.fixture(scope="module")
def a14b(served, tmp_path_factory):
    from ray import serve

    with _app(served, tmp_path_factory, "tiny-wan2.2-a14b", "a14b") as client:
        yield client
    serve.delete("a14b")


@pytest.fixture(scope="module")
def ti2v(served, tmp_path_factory):
    from ray import serve

    with _app(served, tmp_path_factory, "tiny-wan2.2-ti2v", "ti2v") as client:
        yield client
    serve.delete("ti2v")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_two_experts_text_and_image_to_video(a14b, poll):
    r = a14b.post("/v1/videos", json={"prompt": "a red fox", "size": "48x32", "num_frames": 5, "steps": 4,
                                      "guidance_scale": 4.0, "guidance_scale_2": 2.5, "seed": 3})
    assert r.status_code == 200, r.text
    final = poll(a14b, r.json()["id"], timeout=120)[-1]
    assert final["status"] == "completed", final
    mp4 = read_mp4(a14b.get(f"/v1/videos/{final['id']}/content").content)
    assert mp4.frames.shape == (5, 32, 48, 3)
    r = a14b.post("/v1/videos", data={"prompt": "a red fox", "size": "48x32", "num_frames": "5", "steps": "2"},
                  files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 200, r.text
    assert poll(a14b, r.json()["id"], timeout=120)[-1]["status"] == "completed"
    models = a14b.get("/v1/models").json()["data"]
    assert any(m["id"] == "tiny-wan2.2-a14b" for m in models)


def test_ti2v_text_and_image_to_video(ti2v, poll):
    r = ti2v.post("/v1/videos", json={"prompt": "a red fox", "size": "64x64", "num_frames": 5, "steps": 2})
    assert r.status_code == 200, r.text
    final = poll(ti2v, r.json()["id"], timeout=120)[-1]
    assert final["status"] == "completed", final
    assert read_mp4(ti2v.get(f"/v1/videos/{final['id']}/content").content).frames.shape == (5, 64, 64, 3)
    r = ti2v.post("/v1/videos", data={"prompt": "a red fox", "size": "64x64", "num_frames": "5", "steps": "2"},
                  files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 200, r.text
    assert poll(ti2v, r.json()["id"], timeout=120)[-1]["status"] == "completed"


def test_guidance_scale_2_is_refused_for_one_expert(ti2v):
    r = ti2v.post("/v1/videos", json={"prompt": "a fox", "size": "64x64", "guidance_scale_2": 2.0})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "guidance_scale_2"
