"""Stages of different requests overlap (fake timestamped stages), queues are bounded, and a
cancelled job stops its DiT work."""
from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.ray


def _timeline(served) -> dict[tuple[str, str], dict]:
    lines = served.timeline.read_text().splitlines() if served.timeline.exists() else []
    return {(e["stage"], e["prompt"]): e for e in map(json.loads, lines)}


def _overlap(a: dict, b: dict) -> float:
    """Seconds during which the intervals a and b both ran."""
    return min(a["end"], b["end"]) - max(a["start"], b["start"])


def test_encode_and_decode_overlap_denoising(served, fake, poll):
    # Request 1 starts; request 2 is sent while request 1 denoises (6 steps x 0.2 s).
    one = fake.post("/v1/videos", json={"prompt": "overlap 1", "steps": 6}).json()
    poll(fake, one["id"], until=("in_progress",), poll=0.02)
    two = fake.post("/v1/videos", json={"prompt": "overlap 2", "steps": 6}).json()
    for v in (one, two):
        assert poll(fake, v["id"])[-1]["status"] == "completed"
    t = _timeline(served)
    text2, den1 = t[("text_encode", "overlap 2")], t[("denoise", "overlap 1")]
    dec1, den2 = t[("decode", "overlap 1")], t[("denoise", "overlap 2")]
    # Request 2 encodes while request 1 denoises ...
    assert _overlap(text2, den1) > 0.25, (text2, den1)
    # ... and request 1 decodes while request 2 denoises.
    assert _overlap(dec1, den2) > 0.25, (dec1, den2)
    # The DiT group ran one job at a time.
    assert den2["start"] >= den1["end"] - 0.05


def test_full_queues_answer_503_and_stage_backpressure_is_retried(served, fake, poll):
    before = fake.get("/health").json()["busy_retries"]
    # The DiT deployment takes 1 job + 1 queued (max_queued_requests=1): jobs 3 and 4, sent
    # while job 2 waits, get BackPressureError and retry (staying queued) until there is room.
    ok = []
    for i in range(4):
        # Job 0 denoises for 3 s (15 steps x 0.2 s) while the others arrive.
        r = fake.post("/v1/videos", json={"prompt": f"busy {i}", "steps": 15 if i == 0 else 1})
        assert r.status_code == 200, r.text
        ok.append(r.json()["id"])
        time.sleep(0.8)  # > the 0.5 s text encode: job i-1 is already queued at the DiT
    # The ingress holds at most max_pending_jobs=4 jobs: the 5th is refused at once.
    busy = fake.post("/v1/videos", json={"prompt": "busy 5", "steps": 1})
    assert busy.status_code == 503, [fake.get(f"/v1/videos/{i}").json() for i in ok]
    assert busy.headers["retry-after"] == "3"
    assert busy.json()["error"]["code"] == "server_busy"
    finals = [poll(fake, i, timeout=90)[-1] for i in ok]
    assert [f["status"] for f in finals] == ["completed"] * 4, finals
    assert fake.get("/health").json()["busy_retries"] > before
    # Room again once the jobs are done.
    again = fake.post("/v1/videos", json={"prompt": "busy after", "steps": 1})
    assert again.status_code == 200
    poll(fake, again.json()["id"])


def test_cancel_stops_the_denoise_loop(served, fake, poll):
    v = fake.post("/v1/videos", json={"prompt": "cancel me", "steps": 200}).json()  # 40 s if left
    seen = poll(fake, v["id"], until=("in_progress",), poll=0.02)
    deadline = time.monotonic() + 10
    while seen[-1]["progress"] == 0 and time.monotonic() < deadline:
        seen = poll(fake, v["id"], until=("in_progress",), poll=0.05)
    assert seen[-1]["progress"] > 0
    t0 = time.time()
    assert fake.delete(f"/v1/videos/{v['id']}").json()["deleted"] is True
    assert fake.get(f"/v1/videos/{v['id']}").status_code == 404
    # The fake worker logs the step at which it saw the cancel: within a step or two.
    deadline = time.monotonic() + 10
    while ("denoise_cancelled", "cancel me") not in _timeline(served) and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = _timeline(served)[("denoise_cancelled", "cancel me")]
    assert stopped["end"] - t0 < 2.0
    assert ("denoise", "cancel me") not in _timeline(served)


def test_cancel_a_queued_job(served, fake, poll):
    running = fake.post("/v1/videos", json={"prompt": "holds the dit", "steps": 15}).json()
    poll(fake, running["id"], until=("in_progress",), poll=0.02)
    queued = fake.post("/v1/videos", json={"prompt": "never runs", "steps": 1}).json()
    time.sleep(0.6)  # its text is encoded; it waits for the DiT group
    assert fake.get(f"/v1/videos/{queued['id']}").json()["status"] == "queued"
    assert fake.delete(f"/v1/videos/{queued['id']}").json()["deleted"] is True
    assert fake.get(f"/v1/videos/{queued['id']}").status_code == 404
    assert poll(fake, running["id"], timeout=30)[-1]["status"] == "completed"
    time.sleep(1.0)  # had it not been cancelled, it would have run in the 0.2 s after that job
    assert ("denoise", "never runs") not in _timeline(served)
