"""Issue 18, item 6: an ingress replica dies while its jobs denoise or wait.

An app with two ingress replicas on fake stages (a 0.2 s DiT step): the replica running a long job
(and owning jobs queued behind it) is SIGKILLed. Then: the API goes on answering through the
other replica (no hang while Serve replaces the dead one); the DiT group stops the orphaned job
within a few seconds instead of denoising it to the end, and never starts the dead replica's
queued jobs; those jobs end `failed` (code `interrupted`, the runner lease) and the surviving
replica's jobs complete."""
from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from serving.jobstore import SQLiteJobStore

pytestmark = pytest.mark.ray

STEP_S = 0.2
LEASE_S = 3.0


@pytest.fixture(scope="module")
def orphans(served, tmp_path_factory):
    from ray import serve

    from serving.app import build_app

    data = tmp_path_factory.mktemp("orphans-data")
    timeline = data / "timeline.jsonl"
    app = build_app({
        "model": "fake-wan", "data_dir": str(data), "replica_cpus": 0,
        "engine_cls": "serving.fakes:FakeStageEngine", "dit_worker_cls": "serving.fakes:FakeDiTWorker",
        "engine_kwargs": {"timeline": str(timeline)},
        "dit_worker_kwargs": {"step_s": STEP_S, "timeline": str(timeline)},
        "dit": {"progress_poll_s": 0.05, "max_queued_requests": 16},
        "service": {"ingress_replicas": 2, "job_lease_s": LEASE_S},
    })
    serve.run(app, name="orphans", route_prefix="/orphans")
    with httpx.Client(base_url=f"{served.base_url}/orphans", timeout=30) as client:
        yield client, data, timeline
    serve.delete("orphans")


def _events(timeline, stage: str) -> dict[str, dict]:
    lines = timeline.read_text().splitlines() if timeline.exists() else []
    return {e["prompt"]: e for e in map(json.loads, lines) if e["stage"] == stage}


def _replica_pids() -> dict[str, int]:
    """runner id -> pid of every ingress replica (handle calls land on either)."""
    from ray import serve

    handle = serve.get_deployment_handle("Ingress", app_name="orphans")
    pids: dict[str, int] = {}
    for _ in range(40):
        info = handle.replica_info.remote().result(timeout_s=30)
        pids[info["runner"]] = info["pid"]
        if len(pids) == 2:
            return pids
    raise AssertionError(f"saw only {pids}")


def test_a_dead_ingress_replica_leaves_no_orphaned_work(orphans, poll):
    client, data, timeline = orphans
    store = SQLiteJobStore(data)
    pids = _replica_pids()

    # 1. A long job (150 steps = 30 s) denoises; short jobs queue behind it, on both replicas.
    long = client.post("/v1/videos", json={"prompt": "long", "steps": 150}).json()
    poll(client, long["id"], until=("in_progress",), timeout=60, poll=0.05)
    short = [client.post("/v1/videos", json={"prompt": f"short {i}", "steps": 2}).json()["id"] for i in range(6)]
    doomed = store.get(long["id"]).runner
    runners = {job_id: store.get(job_id).runner for job_id in short}
    assert doomed in pids and set(runners.values()) <= set(pids)
    time.sleep(1.0)  # the short jobs are encoded and wait for the DiT group

    # 2. Kill the replica that runs the long job.
    os.kill(pids[doomed], signal.SIGKILL)
    killed_at = time.time()

    # 3. The API answers meanwhile (the other replica), fast.
    for _ in range(5):
        start = time.monotonic()
        r = client.get(f"/v1/videos/{long['id']}")
        assert r.status_code == 200 and time.monotonic() - start < 3, r.text
        time.sleep(0.2)

    # 4. The DiT group stopped the orphaned job within a few seconds (30 s if left to run).
    deadline = time.monotonic() + 15
    while "long" not in _events(timeline, "denoise_cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = _events(timeline, "denoise_cancelled").get("long")
    assert stopped is not None and stopped["end"] - killed_at < 6, stopped
    assert "long" not in _events(timeline, "denoise")

    # 5. Every job ends: the dead replica's fail as interrupted (lease), never run; the others complete.
    finals = {job_id: poll(client, job_id, timeout=90)[-1] for job_id in [long["id"], *short]}
    assert finals[long["id"]]["status"] == "failed"
    assert finals[long["id"]]["error"]["code"] == "interrupted"
    denoised = _events(timeline, "denoise")
    for job_id in short:
        prompt = finals[job_id]["prompt"]
        if runners[job_id] == doomed:
            assert finals[job_id]["status"] == "failed", finals[job_id]
            assert prompt not in denoised  # never denoised: no orphaned compute
        else:
            assert finals[job_id]["status"] == "completed", finals[job_id]

    # 6. Serve replaces the replica: the service is whole again.
    again = client.post("/v1/videos", json={"prompt": "after", "steps": 1}).json()
    assert poll(client, again["id"], timeout=60)[-1]["status"] == "completed"
