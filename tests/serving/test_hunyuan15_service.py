"""HunyuanVideo-1.5 through the Serve graph, same Videos API: the `lightx2v serve --model
tiny-hunyuanvideo-1.5` graph (text encoder deployment with Qwen2.5-VL + ByT5, image encoder with
SigLIP, the DiT group, the decoder) on the session's Serve instance serves text-to-video (with
quoted text: the glyph path) and image-to-video (no size: diffusers' bucket for the image)."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from stages.video import read_mp4

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def hv15(served, tmp_path_factory):
    from ray import serve

    from serving.app import build_app

    app = build_app({"model": "tiny-hunyuanvideo-1.5", "data_dir": str(tmp_path_factory.mktemp("hv15-data")),
                     "replica_cpus": 0})
    serve.run(app, name="hv15", route_prefix="/hv15")
    with httpx.Client(base_url=f"{served.base_url}/hv15", timeout=60) as client:
        yield client
    serve.delete("hv15")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_text_and_image_to_video(hv15, poll):
    r = hv15.post("/v1/videos", json={"prompt": 'a sign that says "OPEN"', "size": "80x48", "num_frames": 5,
                                      "steps": 3, "seed": 3})
    assert r.status_code == 200, r.text
    final = poll(hv15, r.json()["id"], timeout=120)[-1]
    assert final["status"] == "completed", final
    assert read_mp4(hv15.get(f"/v1/videos/{final['id']}/content").content).frames.shape == (5, 48, 80, 3)
    r = hv15.post("/v1/videos", data={"prompt": "the sign lights up", "num_frames": "5", "steps": "2"},
                  files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 200, r.text
    final = poll(hv15, r.json()["id"], timeout=120)[-1]
    assert final["status"] == "completed", final
    # no size given: the bucket diffusers' pipeline picks for a 56x40 (WxH) image at the tiny target
    assert read_mp4(hv15.get(f"/v1/videos/{final['id']}/content").content).frames.shape == (5, 48, 64, 3)
    models = hv15.get("/v1/models").json()["data"]
    assert any(m["id"] == "tiny-hunyuanvideo-1.5" for m in models)
