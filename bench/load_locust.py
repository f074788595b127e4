"""Load benchmark of the HTTP service with locust: headless, bounded in time and jobs, loopback only.

    python bench/load_locust.py                          # starts tiny-wan on CPU itself, 60 s, 12 users
    python bench/load_locust.py --users 24 --run-time 120 --max-jobs 300 --json out.json
    python bench/load_locust.py --url http://127.0.0.1:8000 --api-key KEY   # a running service

Each simulated user submits a job (`POST /v1/videos`), polls it (`GET /v1/videos/{id}`) until it
ends, and starts the next one at once (a closed loop). A 503 (too many pending jobs) is counted
and the user waits the `Retry-After` it was given. Reported: completed jobs per second, the
latency of the job (submit to completed) and of the two calls at p50/p95/p99, and the share of
submissions answered 503.

Without `--url` the script starts the service (`serving.launch.start_service`, tiny-wan, CPU, in
a child process: locust's gevent and Ray do not share a process) on a free loopback port with
`--max-pending-jobs` (default 8, below the user count, so the admission bound is exercised) and
stops it at the end. Traffic never leaves 127.0.0.1.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and "--serve-child" not in sys.argv:
    import locust  # noqa: F401  (first: gevent monkey-patches the standard library on import)

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ----------------------------------------------------------------------------- the service (child)
def serve_forever(port: int, data_dir: str, max_pending_jobs: int) -> None:
    """The child process: tiny-wan on CPU at 127.0.0.1:port until SIGTERM."""
    from serving.config import AppArgs
    from serving.launch import start_service, stop_service

    start_service(AppArgs(model="tiny-wan", data_dir=data_dir, replica_cpus=0,
                          ingress={"max_pending_jobs": max_pending_jobs, "retry_after_s": 1}),
                  host="127.0.0.1", port=port, log_to_driver=False)
    print("SERVING", flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    while not stopping:
        time.sleep(0.5)
    stop_service()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"the service exited ({child.returncode}) before answering")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the service did not answer {url}/health within {timeout_s:.0f} s")


# ----------------------------------------------------------------------------- the load (locust)
def run_load(url: str, api_key: str | None, users: int, run_time_s: float, max_jobs: int,
             steps: int, size: str) -> dict:
    import gevent
    from locust import HttpUser, constant, events, task
    from locust.env import Environment
    from locust.exception import StopUser

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    state = {"submitted": 0, "busy": 0, "posts": 0, "completed": 0, "failed": 0}

    def record_job(start: float, ok: bool, name: str) -> None:
        events.request.fire(request_type="JOB", name=name, response_time=(time.perf_counter() - start) * 1000,
                            response_length=0, exception=None if ok else RuntimeError(name), context={})

    class VideoUser(HttpUser):
        wait_time = constant(0)

        @task
        def one_job(self) -> None:
            if state["submitted"] >= max_jobs:
                raise StopUser()
            body = {"prompt": f"load {state['posts']}", "size": size, "steps": steps, "seed": state["posts"]}
            start = time.perf_counter()
            state["posts"] += 1
            with self.client.post("/v1/videos", json=body, headers=headers, name="POST /v1/videos",
                                  catch_response=True) as r:
                if r.status_code == 503:
                    state["busy"] += 1
                    r.success()  # counted apart: the admission bound doing its job
                    gevent.sleep(float(r.headers.get("retry-after", "1")))
                    return
                if r.status_code != 200:
                    r.failure(f"{r.status_code}: {r.text[:200]}")
                    return
                video_id = r.json()["id"]
            state["submitted"] += 1
            while True:
                gevent.sleep(0.2)
                with self.client.get(f"/v1/videos/{video_id}", headers=headers, name="GET /v1/videos/{id}",
                                     catch_response=True) as r:
                    if r.status_code != 200:
                        r.failure(f"{r.status_code}")
                        continue
                    status = r.json()["status"]
                if status in ("completed", "failed"):
                    state[status] += 1
                    record_job(start, status == "completed", "submit -> completed")
                    return

    env = Environment(user_classes=[VideoUser], host=url, events=events)
    runner = env.create_local_runner()
    t0 = time.perf_counter()
    runner.start(users, spawn_rate=users)
    stopper = gevent.spawn_later(run_time_s, runner.quit)
    while runner.state not in ("stopped",) and state["completed"] + state["failed"] < max_jobs:
        gevent.sleep(0.5)
        if time.perf_counter() - t0 > run_time_s + 5:
            break
    runner.quit()
    stopper.kill()
    elapsed = time.perf_counter() - t0

    def entry(method: str, name: str) -> dict:
        e = env.stats.get(name, method)
        return {"requests": e.num_requests, "failures": e.num_failures,
                **{f"p{int(q * 100)}_ms": round(e.get_response_time_percentile(q) or 0, 1) for q in (0.5, 0.95, 0.99)}}

    return {
        "seconds": round(elapsed, 1), "users": users, "steps": steps, "size": size,
        "jobs_completed": state["completed"], "jobs_failed": state["failed"],
        "jobs_per_s": round(state["completed"] / elapsed, 3),
        "requests_per_s": round(env.stats.total.num_requests / elapsed, 2),
        "submissions": state["posts"], "busy_503": state["busy"],
        "busy_503_rate": round(state["busy"] / max(1, state["posts"]), 3),
        "job": entry("JOB", "submit -> completed"), "post": entry("POST", "POST /v1/videos"),
        "get": entry("GET", "GET /v1/videos/{id}"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service on loopback (default: start tiny-wan on CPU)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--run-time", type=float, default=60.0, help="seconds of load (bound)")
    p.add_argument("--max-jobs", type=int, default=150, help="jobs to submit at most (bound)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", default="64x64")
    p.add_argument("--max-pending-jobs", type=int, default=8, help="the started service's admission bound")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--serve-child", nargs=2, metavar=("PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.serve_child:
        serve_forever(int(args.serve_child[0]), args.serve_child[1], args.max_pending_jobs)
        return 0

    child = None
    url = args.url
    if url is None:
        port = _free_port()
        data = tempfile.mkdtemp(prefix="lightx2v-load-")
        url = f"http://127.0.0.1:{port}"
        child = subprocess.Popen([sys.executable, __file__, "--serve-child", str(port), data,
                                  "--max-pending-jobs", str(args.max_pending_jobs)], env=os.environ.copy())
        _wait_healthy(url, 300, child)
    elif urlsplit(url).hostname not in LOOPBACK:
        raise SystemExit(f"--url must be a loopback address (127.0.0.1), got {url}")
    try:
        report = run_load(url, args.api_key, args.users, args.run_time, args.max_jobs, args.steps, args.size)
    finally:
        if child is not None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    report["max_pending_jobs"] = args.max_pending_jobs if args.url is None else None
    print(json.dumps(report, indent=2))
    j, post, get = report["job"], report["post"], report["get"]
    print(f"\n| users | jobs/s | job p50 / p95 / p99 (s) | POST p50 / p95 / p99 (ms) | GET p50 / p95 / p99 (ms) "
          f"| 503 rate |\n|---|---|---|---|---|---|\n| {args.users} | {report['jobs_per_s']} | "
          f"{j['p50_ms'] / 1000:.2f} / {j['p95_ms'] / 1000:.2f} / {j['p99_ms'] / 1000:.2f} | "
          f"{post['p50_ms']:.0f} / {post['p95_ms']:.0f} / {post['p99_ms']:.0f} | "
          f"{get['p50_ms']:.0f} / {get['p95_ms']:.0f} / {get['p99_ms']:.0f} | "
          f"{report['busy_503_rate']:.1%} ({report['busy_503']}/{report['submissions']}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
