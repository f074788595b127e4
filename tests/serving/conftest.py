"""Serve fixtures: one Serve instance and two apps per test session, deployed together.

- "wan" at /wan: the real graph on tiny-wan (CPU), its data dir pre-filled with jobs from a
  "previous run" (a finished one with its file, a running one, a queued one) for the restart test.
- "fake" at /fake: fake sleeping stages (serving/fakes.py) writing a timeline, small queues:
  overlap, back-pressure and cancellation timing without models. It runs with API keys
  (`FAKE_KEY`, `OTHER_KEY`; the `fake` client sends the first), one ingress replica and small
  body and image limits (`FAKE_SERVICE`), for the hardening tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from serving.jobstore import JobRecord, SQLiteJobStore, new_job_id
from serving.launch import free_port

FAKE_DELAYS = {"text_s": 0.5, "decode_s": 0.5}
FAKE_STEP_S = 0.2
FAKE_KEY = "fake-app-key-0001-abcdefgh"
OTHER_KEY = "fake-app-key-0002-ijklmnop"
FAKE_SERVICE = {"api_keys": [FAKE_KEY, OTHER_KEY], "ingress_replicas": 1,
                "max_body_bytes": 256 * 1024, "max_upload_bytes": 128 * 1024,
                "max_image_pixels": 1024 * 1024}


@dataclass
class ServedApps:
    base_url: str
    wan_url: str
    fake_url: str
    wan_data: Path
    fake_data: Path
    timeline: Path
    fake_key: str = FAKE_KEY
    """An API key of the fake app (`OTHER_KEY` is its second)."""
    other_key: str = OTHER_KEY
    previous_jobs: dict[str, str] = field(default_factory=dict)
    """status before the restart -> job id, for the jobs written before the app started."""


def _previous_run(data_dir: Path) -> dict[str, str]:
    """Jobs a previous service left behind: finished (with its file), running, queued."""
    store = SQLiteJobStore(data_dir)
    jobs = {}
    for status in ("completed", "in_progress", "queued"):
        job = store.create(JobRecord(id=new_job_id(), created_at=int(time.time()) - 60,
                                     status="queued", model="tiny-wan", prompt=f"old {status}",
                                     size="64x64", seconds="1.12", params={"num_frames": 9, "fps": 8}))
        if status == "completed":
            store.save_result(job.id, b"old video bytes")
        if status != "queued":
            store.set_status(job.id, status, progress=100 if status == "completed" else 40)
        jobs[status] = job.id
    store.close()
    return jobs


@pytest.fixture(scope="session")
def served(ray_session, tmp_path_factory, tiny_wan_dir) -> ServedApps:
    from ray import serve
    from ray.serve.api import RunTarget

    from serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    wan_data = tmp_path_factory.mktemp("wan-data")
    fake_data = tmp_path_factory.mktemp("fake-data")
    timeline = fake_data / "timeline.jsonl"
    previous = _previous_run(wan_data)

    wan = build_app({"model": "tiny-wan", "data_dir": str(wan_data), "replica_cpus": 0})
    fake = build_app({
        "model": "fake-wan", "data_dir": str(fake_data), "replica_cpus": 0,
        "engine_cls": "serving.fakes:FakeStageEngine", "dit_worker_cls": "serving.fakes:FakeDiTWorker",
        "engine_kwargs": {**FAKE_DELAYS, "timeline": str(timeline)},
        "dit_worker_kwargs": {"step_s": FAKE_STEP_S, "timeline": str(timeline)},
        "dit": {"max_ongoing_requests": 1, "max_queued_requests": 1, "progress_poll_s": 0.05,
                "health_check_period_s": 1, "health_check_timeout_s": 5},
        "ingress": {"max_pending_jobs": 4, "retry_after_s": 3},
        "service": FAKE_SERVICE,
    })
    serve.run_many([RunTarget(wan, name="wan", route_prefix="/wan"),
                    RunTarget(fake, name="fake", route_prefix="/fake")])
    base = f"http://127.0.0.1:{port}"
    yield ServedApps(base_url=base, wan_url=f"{base}/wan", fake_url=f"{base}/fake",
                     wan_data=wan_data, fake_data=fake_data, timeline=timeline,
                     previous_jobs=previous)
    serve.shutdown()


@pytest.fixture
def wan(served) -> httpx.Client:
    with httpx.Client(base_url=served.wan_url, timeout=60) as client:
        yield client


@pytest.fixture
def fake(served) -> httpx.Client:
    """A client of the fake app with its first API key."""
    with httpx.Client(base_url=served.fake_url, timeout=60,
                      headers={"Authorization": f"Bearer {FAKE_KEY}"}) as client:
        yield client


def wait_for(client: httpx.Client, video_id: str, *, until=("completed", "failed"),
             timeout: float = 60.0, poll: float = 0.1) -> list[dict]:
    """Poll GET /v1/videos/{id} until its status is in `until`; returns every observation."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/videos/{video_id}")
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if seen[-1]["status"] in until:
            return seen
        time.sleep(poll)
    raise AssertionError(f"{video_id} still {seen[-1]['status']} after {timeout} s: {seen[-1]}")


@pytest.fixture
def poll():
    """`poll(client, video_id, ...)`: wait for a job (see `wait_for`)."""
    return wait_for
