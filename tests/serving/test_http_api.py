"""The Videos API over HTTP (httpx) against the real graph on tiny-wan (CPU)."""
from __future__ import annotations

import concurrent.futures as cf
import io
import time

import pytest
from PIL import Image

from serving.jobstore import RESTART_REASON, new_job_id
from stages.video import read_mp4

pytestmark = pytest.mark.ray


def _png(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_models(wan):
    r = wan.get("/v1/models")
    assert r.status_code == 200
    (model,) = r.json()["data"]
    assert model["id"] == "tiny-wan" and model["tasks"] == ["i2v", "t2v"]


def test_restart_keeps_results_and_fails_interrupted_jobs(served, wan):
    jobs = served.previous_jobs
    done = wan.get(f"/v1/videos/{jobs['completed']}").json()
    assert done["status"] == "completed" and done["progress"] == 100
    assert wan.get(f"/v1/videos/{jobs['completed']}/content").content == b"old video bytes"
    for status in ("in_progress", "queued"):
        v = wan.get(f"/v1/videos/{jobs[status]}").json()
        assert v["status"] == "failed", v
        assert v["error"] == {"code": "interrupted", "message": RESTART_REASON}
        assert wan.get(f"/v1/videos/{jobs[status]}/content").status_code == 409


def test_text_to_video_json_with_progress(wan, poll):
    r = wan.post("/v1/videos", json={"prompt": "a red fox in snow", "size": "64x48", "seconds": "1",
                                     "steps": 40, "seed": 3, "guidance_scale": 3.0, "sampler": "euler"})
    assert r.status_code == 200, r.text
    video = r.json()
    assert video["object"] == "video" and video["status"] == "queued" and video["progress"] == 0
    assert video["size"] == "64x48" and video["model"] == "tiny-wan" and video["num_frames"] == 9
    seen = poll(wan, video["id"], poll=0.02)
    final = seen[-1]
    assert final["status"] == "completed", final
    assert final["progress"] == 100 and final["completed_at"] >= final["created_at"]
    progress = [v["progress"] for v in seen]
    assert progress == sorted(progress)  # never goes back
    assert any(0 < p < 100 for p in progress), progress  # seen while denoising
    content = wan.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    mp4 = read_mp4(content.content)
    assert mp4.frames.shape == (9, 48, 64, 3) and mp4.fps == 8 and mp4.codec.startswith("h264")


def test_image_to_video_multipart_upload(wan, poll):
    r = wan.post("/v1/videos", data={"prompt": "the picture comes alive", "steps": "2", "seed": "5"},
                 files={"input_reference": ("ref.png", _png(80, 64), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["task"] == "i2v"
    final = poll(wan, r.json()["id"])[-1]
    assert final["status"] == "completed", final
    mp4 = read_mp4(wan.get(f"/v1/videos/{final['id']}/content").content)
    width, height = map(int, final["size"].split("x"))  # no size given: the image's aspect ratio
    assert mp4.frames.shape == (9, height, width, 3) and width > height


def test_concurrent_requests_and_listing(wan, poll):
    def submit(i: int) -> str:
        r = wan.post("/v1/videos", json={"prompt": f"concurrent {i}", "steps": 2, "seed": i})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    with cf.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(submit, range(4)))
    finals = [poll(wan, i)[-1] for i in ids]
    assert [f["status"] for f in finals] == ["completed"] * 4, finals
    assert len({wan.get(f"/v1/videos/{i}/content").content for i in ids}) == 4  # 4 seeds, 4 videos

    # Newest first, paginated with limit/after like OpenAI's list objects.
    page = wan.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and len(page["data"]) == 2 and page["has_more"]
    created = [v["created_at"] for v in page["data"]]
    assert created == sorted(created, reverse=True)
    everything, after = [], None
    while True:
        params = {"limit": 3} | ({"after": after} if after else {})
        p = wan.get("/v1/videos", params=params).json()
        everything += [v["id"] for v in p["data"]]
        if not p["has_more"]:
            break
        after = p["last_id"]
    assert len(everything) == len(set(everything))
    assert set(ids) <= set(everything)
    asc = wan.get("/v1/videos", params={"limit": 100, "order": "asc"}).json()["data"]
    assert [v["id"] for v in asc] == everything[::-1]


def test_cancel_a_running_job_frees_the_dit(wan, poll):
    # 1000 steps at 256x256x33 take 25-40 s on a CPU core: far longer than the 10 s allowed below.
    r = wan.post("/v1/videos", json={"prompt": "a very long job", "steps": 1000, "size": "256x256",
                                     "num_frames": 33, "guidance_scale": 1.0})
    long_id = r.json()["id"]
    seen = poll(wan, long_id, until=("in_progress",), timeout=60, poll=0.05)
    deadline = time.monotonic() + 30
    while seen[-1]["progress"] == 0 and time.monotonic() < deadline:
        seen = poll(wan, long_id, until=("in_progress", "completed", "failed"), poll=0.05)
    assert seen[-1]["status"] == "in_progress" and 0 < seen[-1]["progress"] < 95
    start = time.monotonic()
    d = wan.delete(f"/v1/videos/{long_id}")
    assert d.status_code == 200 and d.json() == {"id": long_id, "object": "video.deleted", "deleted": True}
    assert wan.get(f"/v1/videos/{long_id}").status_code == 404
    # The DiT group stopped: a new job runs right away, not after the 1000 steps.
    short = wan.post("/v1/videos", json={"prompt": "after the cancel", "steps": 2}).json()
    assert poll(wan, short["id"], timeout=30)[-1]["status"] == "completed"
    assert time.monotonic() - start < 10


def test_delete_finished_job(served, wan, poll):
    v = wan.post("/v1/videos", json={"prompt": "to delete", "steps": 1}).json()
    assert poll(wan, v["id"])[-1]["status"] == "completed"
    path = served.wan_data / "videos" / f"{v['id']}.mp4"
    assert path.is_file()
    assert wan.delete(f"/v1/videos/{v['id']}").json()["deleted"] is True
    assert not path.exists()
    assert wan.get(f"/v1/videos/{v['id']}").status_code == 404
    assert wan.get(f"/v1/videos/{v['id']}/content").status_code == 404
    assert wan.delete(f"/v1/videos/{v['id']}").status_code == 404


@pytest.mark.parametrize("body,status,param", [
    ({"size": "64x64"}, 400, "prompt"),
    ({"prompt": "x", "model": "sora-2"}, 400, "model"),
    ({"prompt": "x", "size": "64 by 64"}, 400, "size"),
    ({"prompt": "x", "size": "72x64"}, 400, "size"),
    ({"prompt": "x", "seconds": "0"}, 400, "seconds"),
    ({"prompt": "x", "seconds": "1", "num_frames": 9}, 400, "seconds"),
    ({"prompt": "x", "num_frames": 0}, 422, "num_frames"),
    ({"prompt": "x", "num_frames": 5000}, 422, "num_frames"),
    ({"prompt": "x", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "steps": 2000}, 422, "steps"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale"),
    ({"prompt": "x", "shift": -2}, 422, "shift"),
    ({"prompt": "x", "sampler": "ddim"}, 422, "sampler"),
    ({"prompt": "x", "seed": -5}, 422, "seed"),
    ({"prompt": "x", "fps": 500}, 422, "fps"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "x" * 8193}, 400, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 8193}, 400, "negative_prompt"),
    ({"prompt": "x", "output_type": "np"}, 400, "output_type"),
    ({"prompt": "x", "input_reference": {"image_url": "file:///etc/passwd"}}, 400, "input_reference"),
    ({"prompt": "x", "input_reference": "bm90IGFuIGltYWdl"}, 422, "input_reference"),
])
def test_validation_errors_name_the_field(wan, body, status, param):
    r = wan.post("/v1/videos", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_multipart_validation_and_bad_bodies(wan):
    r = wan.post("/v1/videos", files={"prompt": (None, "x"), "steps": (None, "lots")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "steps"
    # Form-encoded bodies are refused (browsers send them cross-site without a preflight).
    r = wan.post("/v1/videos", data={"prompt": "x", "steps": "2"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = wan.post("/v1/videos", data={"prompt": "x"},
                 files={"input_reference": ("a.png", b"not a png", "image/png")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "input_reference"
    assert wan.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert wan.post("/v1/videos", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert wan.get("/v1/videos", params={"limit": 0}).json()["error"]["param"] == "limit"
    assert wan.get("/v1/videos", params={"limit": "x"}).status_code == 400
    assert wan.get("/v1/videos", params={"order": "sideways"}).json()["error"]["param"] == "order"
    assert wan.get("/v1/videos", params={"after": new_job_id()}).status_code == 404


@pytest.mark.parametrize("video_id", [new_job_id(), "nope", "video_..%2F..%2Fjobs.sqlite3",
                                      "..%2F..%2Fetc%2Fpasswd", "video_" + "A" * 32])
def test_unknown_or_malformed_ids_are_404(wan, video_id):
    for method, path in (("GET", f"/v1/videos/{video_id}"), ("GET", f"/v1/videos/{video_id}/content"),
                         ("DELETE", f"/v1/videos/{video_id}")):
        r = wan.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
