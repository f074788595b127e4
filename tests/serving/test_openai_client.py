"""The official `openai` client against the tiny-wan graph: create, retrieve, download, list, delete."""
from __future__ import annotations

import io
import time
import warnings

import pytest
from PIL import Image

from stages.video import read_mp4

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture
def client(served):
    from openai import OpenAI

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OpenAI(base_url=f"{served.wan_url}/v1", api_key="unused", max_retries=0)


def _wait(client, video_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.videos.retrieve(video_id)
        if v.status in ("completed", "failed"):
            return v
        time.sleep(0.1)
    raise AssertionError(f"{video_id} not finished: {v}")


def test_openai_client_text_to_video(client, tmp_path):
    video = client.videos.create(prompt="a lighthouse at dusk", seconds="1", size="48x64",
                                 model="tiny-wan", extra_body={"steps": 2, "seed": 11})
    assert video.object == "video" and video.status == "queued" and video.size == "48x64"
    done = _wait(client, video.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    content = client.videos.download_content(video.id)
    out = tmp_path / "out.mp4"
    content.write_to_file(out)
    assert read_mp4(str(out)).frames.shape == (9, 64, 48, 3)

    listed = client.videos.list(limit=50)
    assert video.id in [v.id for v in listed.data]
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted"

    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.videos.retrieve(video.id)


def test_openai_client_image_to_video(client):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 200, 0)).save(buf, format="PNG")
    video = client.videos.create(prompt="the sun rises", input_reference=("sun.png", buf.getvalue(), "image/png"),
                                 extra_body={"steps": 2})
    done = _wait(client, video.id)
    assert done.status == "completed", done
    assert done.model_extra.get("task") == "i2v"
    assert len(client.videos.download_content(video.id).content) > 100


def test_openai_client_sees_field_errors(client):
    from openai import BadRequestError, UnprocessableEntityError

    with pytest.raises(BadRequestError) as info:
        client.videos.create(prompt="x", size="720x1281")
    assert "size" in str(info.value)
    with pytest.raises(UnprocessableEntityError) as info:
        client.videos.create(prompt="x", extra_body={"steps": 0})
    assert "steps" in str(info.value)
