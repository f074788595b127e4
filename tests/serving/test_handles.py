"""Another Ray job (a separate Python process) uses the app through a handle, without HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from stages.video import read_mp4

pytestmark = pytest.mark.ray

DRIVER = textwrap.dedent('''
    import base64, json, sys, time
    import ray
    from ray import serve

    ray.init(address=sys.argv[1], namespace="another-job", log_to_driver=False)
    handle = serve.get_app_handle("wan")
    out = {}
    submitted = handle.submit.remote({"prompt": "submitted from another job", "steps": 1}).result()
    out["submitted"] = submitted
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = handle.status.remote(submitted["id"]).result()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.1)
    out["status"] = status
    video = handle.generate.remote({"prompt": "generated from another job", "steps": 2,
                                    "seed": 9, "size": "64x32"}).result(timeout_s=120)
    out["video_b64"] = base64.b64encode(video.pop("video_bytes")).decode()
    out["generated"] = video
    try:
        handle.submit.remote({"prompt": "bad", "steps": 0}).result()
        out["error"] = None
    except Exception as err:
        out["error"] = str(err)
    print("RESULT " + json.dumps(out))
''')


def test_handle_from_another_process(served, ray_session, tmp_path):
    import base64

    address = ray_session.get_runtime_context().gcs_address
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])

    assert out["submitted"]["status"] == "queued" and out["submitted"]["object"] == "video"
    assert out["status"]["status"] == "completed", out["status"]
    gen = out["generated"]
    assert gen["status"] == "completed" and gen["size"] == "64x32"
    assert os.path.isfile(gen["path"]) and gen["path"].startswith(str(served.wan_data))
    mp4 = read_mp4(base64.b64decode(out["video_b64"]))
    assert mp4.frames.shape == (9, 32, 64, 3)
    assert out["error"] is not None and "steps" in out["error"]
