"""Issue 18: the service's Prometheus metrics (serving/metrics.py) reach Ray's metrics export,
named as documented; the Grafana dashboard and docs/SERVING.md use only declared metrics."""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from serving.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]


def _exported_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^(ray_lightx2v_\w+?)(?:_bucket|_sum|_count)?\{", text, re.M)}


@pytest.mark.ray
def test_stage_metrics_are_exported_through_ray(served, fake, poll, ray_session):
    v = fake.post("/v1/videos", json={"prompt": "metered", "steps": 3}).json()
    assert poll(fake, v["id"])[-1]["status"] == "completed"
    assert fake.get("/v1/videos/video_" + "0" * 32).status_code == 404  # an HTTP error to count
    port = next(n["MetricsExportPort"] for n in ray_session.nodes() if n["Alive"])
    want = {"ray_lightx2v_jobs_submitted_total", "ray_lightx2v_jobs_finished_total",
            "ray_lightx2v_job_seconds", "ray_lightx2v_jobs", "ray_lightx2v_queue_depth",
            "ray_lightx2v_running", "ray_lightx2v_stage_seconds", "ray_lightx2v_denoise_step_seconds",
            "ray_lightx2v_http_errors_total"}
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        names = _exported_names(text)
        if want <= names or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert want <= names, sorted(want - names)
    stages = set(re.findall(r'ray_lightx2v_stage_seconds_count\{[^}]*stage="(\w+)"', text))
    assert {"text_encode", "denoise", "decode"} <= stages, stages
    assert re.search(r'ray_lightx2v_http_errors_total\{[^}]*code="not_found"[^}]*status="404"', text)


def test_dashboard_and_docs_name_declared_metrics_only():
    dashboard = json.loads((ROOT / "deploy" / "grafana-lightx2v.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = {re.sub(r"_bucket$", "", m) for m in re.findall(r"ray_(lightx2v_\w+)", exprs)}
    assert used and used <= set(METRICS), sorted(used - set(METRICS))
    assert set(re.findall(r"ray_serve_\w+", exprs)) <= {
        "ray_serve_deployment_queued_queries", "ray_serve_num_http_error_requests_total"}
    docs = (ROOT / "docs" / "SERVING.md").read_text()
    missing = [name for name in METRICS if name not in docs]
    assert not missing, f"docs/SERVING.md does not document {missing}"
