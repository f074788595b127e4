"""The README's main job (`make demo`): the service on tiny-wan (CPU), one video over HTTP.

    python -m serving.demo [--out out/demo.mp4] [--port N]

Starts Ray and the app locally, submits a text-to-video job to `POST /v1/videos`, prints its
progress while it runs, downloads the MP4 to `out/demo.mp4`, prints the path and shuts down.
tiny-wan has random weights: the video is noise, but every stage of the real graph ran.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import httpx

from serving.config import AppArgs
from serving.launch import free_port, start_service, stop_service


def run_demo(out_path: str, port: int, data_dir: str, timeout_s: float = 300.0) -> str:
    print("starting Ray Serve with tiny-wan on CPU (first start takes a minute)...", flush=True)
    service = start_service(AppArgs(model="tiny-wan", data_dir=data_dir, replica_cpus=0), port=port,
                            log_to_driver=False)
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            body = {"prompt": "a lighthouse on a cliff at sunset, waves crashing", "size": "256x256",
                    "seconds": "4", "steps": 40, "seed": 42}
            video = client.post("/v1/videos", json=body).raise_for_status().json()
            print(f"submitted {video['id']}: {video['status']}, {video['size']}, {video['seconds']} s", flush=True)
            deadline, last = time.monotonic() + timeout_s, None
            while time.monotonic() < deadline:
                video = client.get(f"/v1/videos/{video['id']}").raise_for_status().json()
                if (video["status"], video["progress"]) != last:
                    last = (video["status"], video["progress"])
                    print(f"  {video['status']:<12} {video['progress']:3d}%", flush=True)
                if video["status"] in ("completed", "failed"):
                    break
                time.sleep(0.05)
            if video["status"] != "completed":
                raise RuntimeError(f"the job did not complete: {video}")
            content = client.get(f"/v1/videos/{video['id']}/content").raise_for_status().content
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "wb") as f:
            f.write(content)
        path = os.path.abspath(out_path)
        print(f"wrote {path} ({len(content)} bytes; tiny-wan has random weights, so it shows noise)",
              flush=True)
        return path
    finally:
        stop_service()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo.mp4")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    parser.add_argument("--data-dir", default=None, help="job store (default: a temporary dir)")
    ns = parser.parse_args(argv)
    data_dir = ns.data_dir or tempfile.mkdtemp(prefix="lightx2v-demo-")
    run_demo(ns.out, ns.port or free_port(), data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
