"""Issue 18 through Ray Serve's HTTP proxy, on the session's fake app (API keys, one ingress
replica, small limits: `FAKE_SERVICE` in conftest.py): items 1 (no 500s), 2 (the image reaches
only the image encoder; a decoding bomb is refused), 3 (413 for bodies over the limit), 4 (keys
and owners, cross-site writes), 5 (OpenAI error shapes)."""
from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from PIL import Image

from serving.fakes import bomb_png

pytestmark = pytest.mark.ray


def _png(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 100, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("raw", [b'{"prompt": "a\\ud800c", "steps": 1}', b'{"prompt": "x", "a\\udc00": 1}',
                                 b"[" * 50_000, b'{"prompt": "\xff"}'])
def test_malformed_bodies_are_4xx_never_500(fake, raw):
    r = fake.post("/v1/videos", content=raw, headers={"content-type": "application/json"})
    _error(r, 400)


def test_the_image_reaches_only_the_image_encoder(served, fake, poll):
    r = fake.post("/v1/videos", files={"prompt": (None, "only the encoder sees it"), "steps": (None, "1"),
                                       "input_reference": ("a.png", _png(), "image/png")})
    assert r.status_code == 200, r.text
    assert poll(fake, r.json()["id"])[-1]["status"] == "completed"
    lines = [json.loads(line) for line in served.timeline.read_text().splitlines()]
    seen = {e["stage"]: e.get("image") for e in lines if e["prompt"] == "only the encoder sees it"}
    assert seen == {"text_encode": False, "image_encode": True, "denoise_start": False,
                    "denoise": False, "decode": False}, seen


def test_a_decoding_bomb_is_refused_from_its_header(fake):
    bomb = bomb_png(4000, 3000)  # 12 megapixels (36 MB decoded) in a few KB; the app allows 1
    assert len(bomb) < 64 * 1024
    r = fake.post("/v1/videos", files={"prompt": (None, "bomb"), "input_reference": ("b.png", bomb, "image/png")})
    error = _error(r, 422)
    assert error["param"] == "input_reference" and "4000x3000" in error["message"]


def test_bodies_over_the_limits_are_413(fake):
    # The app takes 256 KiB bodies and 128 KiB files.
    _error(fake.post("/v1/videos", json={"prompt": "x", "negative_prompt": "y" * 300_000}), 413)
    r = fake.post("/v1/videos", files={"prompt": (None, "x"),
                                       "input_reference": ("a.png", b"\0" * 200_000, "image/png")})
    assert _error(r, 413)["param"] == "input_reference"

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b" " * 10_000

    _error(fake.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_keys_and_owners(served, fake, poll):
    base = served.fake_url
    assert httpx.get(f"{base}/health").status_code == 200  # open
    error = _error(httpx.get(f"{base}/v1/videos"), 401)
    assert error["code"] == "invalid_api_key"
    _error(httpx.post(f"{base}/v1/videos", json={"prompt": "x"},
                      headers={"Authorization": "Bearer not-a-key-of-this-app"}), 401)
    mine = fake.post("/v1/videos", json={"prompt": "owned", "steps": 1}).json()
    other = {"Authorization": f"Bearer {served.other_key}"}
    _error(httpx.get(f"{base}/v1/videos/{mine['id']}", headers=other), 404)
    _error(httpx.delete(f"{base}/v1/videos/{mine['id']}", headers=other), 404)
    listed = httpx.get(f"{base}/v1/videos", headers=other, params={"limit": 100}).json()["data"]
    assert mine["id"] not in [v["id"] for v in listed]
    assert poll(fake, mine["id"])[-1]["status"] == "completed"


def test_cross_site_writes_are_refused(fake):
    r = fake.post("/v1/videos", files={"prompt": (None, "from a web page")},
                  headers={"Origin": "https://evil.example"})
    assert _error(r, 403)["code"] == "forbidden_origin"
    _error(fake.post("/v1/videos", data={"prompt": "x"}), 415)  # form-encoded: never accepted
    r = fake.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_every_error_has_openais_shape(fake):
    assert _error(fake.get("/v1/nope"), 404)["code"] == "not_found"
    assert _error(fake.put("/v1/videos"), 405)["code"] == "method_not_allowed"
    r = fake.post("/v1/videos", json={"prompt": "x", "input_reference": {"image_url": "data:,"}})
    assert "0x" not in _error(r, 422)["message"]


def test_health_answers_fast(served):
    start = time.monotonic()
    assert httpx.get(f"{served.fake_url}/health").json()["status"] == "ok"
    assert time.monotonic() - start < 5
