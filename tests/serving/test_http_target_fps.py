"""target_fps (frame interpolation, issue 21) over HTTP: a third app on the session's Serve
instance, the real graph on tiny-wan with the tiny RIFE interpolator; the session's "wan" app
(no interpolator) refuses it."""
from __future__ import annotations

import httpx
import pytest

from stages.video import read_mp4

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def rife(served, tmp_path_factory):
    from ray import serve

    from serving.app import build_app

    app = build_app({"model": "tiny-wan", "data_dir": str(tmp_path_factory.mktemp("rife-data")),
                     "replica_cpus": 0, "interpolator": "tiny"})
    serve.run(app, name="rife", route_prefix="/rife")
    with httpx.Client(base_url=f"{served.base_url}/rife", timeout=60) as client:
        yield client
    serve.delete("rife")


def test_video_at_target_fps(rife, poll):
    r = rife.post("/v1/videos", json={"prompt": "a red fox", "size": "48x32", "num_frames": 9, "fps": 8,
                                      "target_fps": 16, "steps": 2, "seed": 3})
    assert r.status_code == 200, r.text
    video = r.json()
    assert video["fps"] == 8 and video["target_fps"] == 16
    final = poll(rife, video["id"], timeout=120)[-1]
    assert final["status"] == "completed", final
    mp4 = read_mp4(rife.get(f"/v1/videos/{video['id']}/content").content)
    assert mp4.frames.shape == (17, 32, 48, 3) and mp4.fps == 16                # (9 - 1) * 2 + 1


def test_target_below_fps_is_a_400_naming_the_field(rife):
    r = rife.post("/v1/videos", json={"prompt": "a fox", "size": "48x32", "fps": 16, "target_fps": 8})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "target_fps" and "at least the video's fps (16)" in error["message"]


def test_without_interpolator_target_fps_is_refused(wan, poll):
    """The session's app has no interpolator: the request is refused (at once, or its job fails
    with the reason), never served at the plain frame rate."""
    r = wan.post("/v1/videos", json={"prompt": "a fox", "size": "48x32", "num_frames": 5, "steps": 1,
                                     "target_fps": 16})
    if r.status_code == 200:
        final = poll(wan, r.json()["id"], timeout=120)[-1]
        assert final["status"] == "failed", final
        message = final["error"]["message"]
    else:
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
    assert "target_fps" in message and "interpolator" in message
