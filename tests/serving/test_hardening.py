"""Issue 18, the HTTP layer in process (no Ray): the ingress's FastAPI app on the in-process fake
graph (`serving.fakes.local_graph`). Items 1 (no 500s on malformed bodies), 2 (large images),
3 (body limits before reading), 4 (API keys, owners, CORS, cross-site writes), 5 (error shapes,
nothing internal in messages). `test_hardening_http.py` repeats the main cases through Serve."""
from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from PIL import Image
from starlette.testclient import TestClient

from engine.registry import get_spec
from serving.api import ApiError, build_request, fit_image, public_message
from serving.fakes import bomb_png, local_graph
from serving.ingress import Ingress
from serving.limits import BodyLimit
from serving.settings import API_KEYS_ENV, ServiceSettings, owner_of

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def png(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def make_app(tmp_path, service: dict | None = None, **graph_kwargs):
    graph = local_graph(**graph_kwargs)
    ingress = Ingress({"model": "fake-wan", "data_dir": str(tmp_path),
                       "engine_cls": "serving.fakes:FakeStageEngine"}, **graph.handles(), service=service)
    return ingress, graph


@pytest.fixture
def api(tmp_path):
    """(client with keys A and B configured, graph, ingress)."""
    ingress, graph = make_app(tmp_path, {"api_keys": [KEY_A, KEY_B], "max_body_bytes": 64 * 1024,
                                         "max_upload_bytes": 32 * 1024, "max_image_pixels": 512 * 512})
    with TestClient(ingress.__serve_build_asgi_app__()) as client:
        yield client, graph, ingress


def wait_done(client, video_id: str, headers: dict, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get(f"/v1/videos/{video_id}", headers=headers).json()
        if v["status"] in ("completed", "failed"):
            return v
        time.sleep(0.02)
    raise AssertionError(v)


def assert_openai_error(r, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    body = json.loads(r.content.decode("ascii"))  # every error body is plain ASCII JSON
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


# ----------------------------------------------------------------------------- 1. no 500s
@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "a\\ud800c", "steps": 1}', "prompt"),                  # lone surrogate in a value
    (b'{"prompt": "x", "negative_prompt": "\\udfff"}', "negative_prompt"),
    (b'{"prompt": "x", "a\\ud800b": 1}', "field name"),                  # ... in an unknown field's name
    (b'{"prompt": "x", "input_reference": {"image_url\\ud800": 1}}', "input_reference.image_url\\ud800"),
    (b"[" * 50_000, None),                                                 # nesting: RecursionError
    (b'{"a":' * 12_000, None),
    (b'{"prompt": "\xff\xfe"}', None),                                    # not UTF-8
    (b"", None), (b"null", None), (b'"prompt"', None),
])
def test_malformed_json_bodies_are_4xx(api, raw, param):
    client, _, _ = api
    r = client.post("/v1/videos", content=raw, headers={**A, "content-type": "application/json"})
    assert_openai_error(r, 400, param)


def test_surrogates_elsewhere_are_4xx(api):
    client, _, _ = api
    # In a multipart field: the bytes of a surrogate are not UTF-8; the parser replaces them.
    r = client.post("/v1/videos", headers=A, files={"prompt": (None, b"a\xed\xa0\x80b"), "steps": (None, "1")})
    assert r.status_code == 200 and r.json()["prompt"].encode("utf-8")  # valid text, stored fine
    # In a path or query parameter.
    assert_openai_error(client.get("/v1/videos/video_%ED%A0%80", headers=A), 404)
    assert_openai_error(client.get("/v1/videos?after=%ED%A0%80", headers=A), 404)


# ----------------------------------------------------------------------------- 2. large images
def test_an_image_too_large_once_decoded_is_refused_from_its_header():
    data = bomb_png(10_000, 6_000)  # 175 KB on the wire, 60 megapixels (180 MB) decoded
    assert len(data) < 200_000
    start = time.perf_counter()
    with pytest.raises(ApiError) as info:
        build_request({"prompt": "x", "input_reference": data}, get_spec("tiny-wan"), ("tiny-wan",))
    assert time.perf_counter() - start < 0.5  # nothing decoded
    assert info.value.status == 422 and info.value.param == "input_reference"
    assert "10000x6000" in info.value.message and "megapixels" in info.value.message


def test_images_are_shrunk_to_what_the_model_can_use():
    spec = get_spec("tiny-wan")  # 64x64 output
    big = build_request({"prompt": "x", "input_reference": png(2000, 1000)}, spec, ("tiny-wan",))
    assert big.image.size == (1024, 512)  # shorter side IMAGE_MIN_SIDE, aspect kept
    small = build_request({"prompt": "x", "input_reference": png(300, 200)}, spec, ("tiny-wan",))
    assert small.image.size == (300, 200)  # left alone
    wide = build_request({"prompt": "x", "size": "1024x512", "input_reference": png(4000, 2000)},
                         spec, ("tiny-wan",))
    assert wide.image.size == (2048, 1024)  # 2x the output
    assert fit_image(wide) is wide


def test_only_the_image_encoder_receives_the_image(api):
    client, graph, _ = api
    r = client.post("/v1/videos", headers=A, files={"prompt": (None, "i2v"), "steps": (None, "2"),
                                                    "input_reference": ("a.png", png(), "image/png")})
    assert r.status_code == 200, r.text
    assert wait_done(client, r.json()["id"], A)["status"] == "completed"
    seen = {stage: had_image for stage, prompt, had_image in graph.calls if prompt == "i2v"}
    assert seen == {"text_encode": False, "image_encode": True, "denoise": False, "decode": False}


def test_the_pixel_limit_is_a_setting(api):
    client, _, _ = api  # max_image_pixels = 512 x 512
    r = client.post("/v1/videos", headers=A, files={"prompt": (None, "x"),
                                                    "input_reference": ("a.png", png(600, 600), "image/png")})
    error = assert_openai_error(r, 422, "input_reference")
    assert "600x600" in error["message"]


# ----------------------------------------------------------------------------- 3. body limits
def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, int]:
    """POST through the raw ASGI interface; returns (status, body chunks the app read)."""
    sent: list[dict] = []
    read = 0

    async def receive():
        nonlocal read
        read += 1
        body = chunks[read - 1] if read <= len(chunks) else b""
        return {"type": "http.request", "body": body, "more_body": read < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/videos", "raw_path": b"/v1/videos",
             "query_string": b"", "headers": headers, "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], read


def test_a_declared_length_over_the_limit_is_refused_before_reading(tmp_path):
    ingress, _ = make_app(tmp_path, {"max_body_bytes": 64 * 1024})
    app = ingress.__serve_build_asgi_app__()
    status, read = _asgi_post(app, [(b"content-type", b"application/json"),
                                    (b"content-length", b"209715200")], [b"{" + b" " * 1000] * 3)
    assert (status, read) == (413, 0)  # 200 MB announced: not one byte read


def test_a_stream_over_the_limit_stops_at_the_limit(tmp_path):
    ingress, _ = make_app(tmp_path, {"max_body_bytes": 64 * 1024})
    app = ingress.__serve_build_asgi_app__()
    chunk = b" " * 16 * 1024
    part = (b'--xyz\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    for content_type, first in ((b"application/json", chunk), (b"multipart/form-data; boundary=xyz", part)):
        # 1.6 MB without a Content-Length (chunked): the file part is never spooled beyond the limit.
        status, read = _asgi_post(app, [(b"content-type", content_type)], [first] + [chunk] * 100)
        assert status == 413 and read <= 6, (content_type, status, read)  # 64 KB = 4-5 chunks, then stop


def test_body_limit_middleware_passes_bodies_under_the_limit():
    seen = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.append(len(message["body"]))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    status, read = _asgi_post(BodyLimit(app, 1000), [(b"content-length", b"999")], [b"x" * 500, b"y" * 499])
    assert status == 204 and seen == [500, 499]


def test_uploads_and_bodies_over_the_limits_are_413(api):
    client, _, _ = api
    r = client.post("/v1/videos", headers=A, content=json.dumps({"prompt": "x" * 70_000}),
                    )  # 70 KB > 64 KB
    assert_openai_error(r, 413)
    r = client.post("/v1/videos", headers=A, files={"prompt": (None, "x"),
                                                    "input_reference": ("a.png", b"\0" * 40_000, "image/png")})
    assert_openai_error(r, 413, "input_reference")


# ----------------------------------------------------------------------------- 4. keys, owners, CORS
def test_api_keys_are_required_except_for_health(api):
    client, _, _ = api
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY_A},
                    {"Authorization": f"Basic {KEY_A}"}):
        for method, path in (("GET", "/v1/videos"), ("GET", "/v1/models"), ("POST", "/v1/videos"),
                             ("GET", "/v1/videos/video_" + "0" * 32), ("DELETE", "/v1/videos/video_" + "0" * 32)):
            r = client.request(method, path, headers=headers, json={"prompt": "x"})
            error = assert_openai_error(r, 401)
            assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert KEY_A not in r.text


def test_a_key_sees_and_deletes_only_its_own_jobs(api):
    client, _, ingress = api
    mine = client.post("/v1/videos", headers=A, json={"prompt": "mine", "steps": 1}).json()
    theirs = client.post("/v1/videos", headers=B, json={"prompt": "theirs", "steps": 1}).json()
    wait_done(client, mine["id"], A)
    wait_done(client, theirs["id"], B)
    assert ingress.store.get(mine["id"]).owner == owner_of(KEY_A)  # an id, not the key
    for method, path in (("GET", f"/v1/videos/{theirs['id']}"), ("GET", f"/v1/videos/{theirs['id']}/content"),
                         ("DELETE", f"/v1/videos/{theirs['id']}")):
        assert_openai_error(client.request(method, path, headers=A), 404)
    listed = [v["id"] for v in client.get("/v1/videos", headers=A).json()["data"]]
    assert mine["id"] in listed and theirs["id"] not in listed
    assert_openai_error(client.get("/v1/videos", headers=A, params={"after": theirs["id"]}), 404, "after")
    assert client.get(f"/v1/videos/{theirs['id']}/content", headers=B).status_code == 200
    assert client.delete(f"/v1/videos/{theirs['id']}", headers=B).json()["deleted"] is True


def test_keys_from_a_file_and_the_environment(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"# operators\n{KEY_A}\n\n")
    monkeypatch.setenv(API_KEYS_ENV, f" {KEY_B} ,")
    settings = ServiceSettings(api_keys_file=str(keys))
    assert settings.load_api_keys() == (KEY_A, KEY_B)
    keys.write_text("short\n")
    with pytest.raises(ValueError, match="api_keys_file line 1: an API key must be at least 16"):
        settings.load_api_keys()
    with pytest.raises(ValueError, match="cannot read"):
        ServiceSettings(api_keys_file=str(tmp_path / "missing")).load_api_keys()
    with pytest.raises(ValueError, match="service.bogus is not a setting; known: api_keys"):
        ServiceSettings.from_value({"bogus": 1})
    with pytest.raises(ValueError, match="service.cors_origins"):
        ServiceSettings(cors_origins=("example.com",))


def test_no_cors_unless_configured_and_cross_site_writes_refused(tmp_path):
    ingress, _ = make_app(tmp_path)  # open API, no CORS origins
    with TestClient(ingress.__serve_build_asgi_app__(), base_url="http://api.local:8000") as client:
        r = client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert_openai_error(client.options("/v1/videos", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}), 405)
        # A page elsewhere posting a form or a multipart body (no preflight needed): refused.
        r = client.post("/v1/videos", headers={"Origin": "https://evil.example"},
                        files={"prompt": (None, "from a web page")})
        assert assert_openai_error(r, 403)["code"] == "forbidden_origin"
        r = client.post("/v1/videos", headers={"Origin": "https://evil.example"}, data={"prompt": "x"})
        assert r.status_code == 403
        r = client.post("/v1/videos", data={"prompt": "x"})  # form-encoded, not a browser: 415 anyway
        assert_openai_error(r, 415)
        # The service's own pages (same host) and clients without Origin may write.
        assert client.post("/v1/videos", headers={"Origin": "http://api.local:8000"},
                           json={"prompt": "same site", "steps": 1}).status_code == 200


def test_cors_for_configured_origins(tmp_path):
    ingress, _ = make_app(tmp_path, {"cors_origins": ["https://app.example"], "api_keys": [KEY_A]})
    with TestClient(ingress.__serve_build_asgi_app__()) as client:
        pre = client.options("/v1/videos", headers={"Origin": "https://app.example",
                                                    "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        r = client.post("/v1/videos", headers={**A, "Origin": "https://app.example"},
                        json={"prompt": "from the app", "steps": 1})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert client.post("/v1/videos", headers={**A, "Origin": "https://other.example"},
                           json={"prompt": "x"}).status_code == 403


# ----------------------------------------------------------------------------- 5. error shapes
def test_framework_errors_have_openais_shape(api):
    client, _, _ = api
    assert_openai_error(client.get("/nope", headers=A), 404)
    assert_openai_error(client.put("/v1/videos", headers=A), 405)
    assert_openai_error(client.post("/v1/videos", headers={**A, "content-type": "multipart/form-data"},
                                    content=b"--x\r\n"), 400)  # no boundary
    assert_openai_error(client.post("/v1/videos", headers={**A, "content-length": "12x"}, content=b"{}"), 400)


def test_messages_hold_no_addresses_or_process_ids(api):
    client, _, _ = api
    r = client.post("/v1/videos", headers=A, json={"prompt": "x", "input_reference": {"image_url": "data:,"}})
    error = assert_openai_error(r, 422, "input_reference")
    assert "0x" not in error["message"] and "object at" not in error["message"]
    text = ("worker group failed: rank 1 (node 10.1.2.3, GPU 0, pid 4242) died (ActorDiedError: "
            "<_io.BytesIO object at 0x7f3a2c1d0e50> ray://10.1.2.3:6379 pid=77)")
    clean = public_message(text)
    for leak in ("10.1.2.3", "4242", "0x7f3a2c1d0e50", "77"):
        assert leak not in clean, clean
    assert clean.startswith("worker group failed: rank 1 (node <address>, GPU 0, pid <n>) died")


def test_unexpected_errors_are_a_plain_500(api, monkeypatch):
    _, _, ingress = api
    client = TestClient(ingress.__serve_build_asgi_app__(), raise_server_exceptions=False)

    def boom(**_):
        raise RuntimeError("secret detail at 0x7fffdeadbeef on 10.0.0.9")

    monkeypatch.setattr(ingress, "list_videos", boom)
    error = assert_openai_error(client.get("/v1/videos", headers=A), 500)
    assert error["message"] == "internal error; the service log has the details"


def test_an_oversized_upload_is_stopped_while_it_streams(tmp_path):
    """Multipart bodies are capped at the upload limit plus 1 MiB while they stream (the body
    limit here is 64 MiB): a 40 MB upload is never spooled whole."""
    ingress, _ = make_app(tmp_path, {"max_body_bytes": 64 * 1024 * 1024, "max_upload_bytes": 1024 * 1024})
    app = ingress.__serve_build_asgi_app__()
    part = (b'--xyz\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunk = b"\0" * 256 * 1024
    status, read = _asgi_post(app, [(b"content-type", b"multipart/form-data; boundary=xyz")],
                              [part] + [chunk] * 160)  # 40 MB
    assert status == 413 and read <= 10, (status, read)  # 2 MiB = 8 chunks, then stop
