"""Issue 18, item 7: a script that uses the library with a DiT worker group (parallel on CPU)
and ends without `close()` exits cleanly, always. Before the fix the group's monitor thread was
still inside `ray.wait` when Ray's own atexit handler tore the core worker down, which ended the
interpreter with a segmentation fault in some runs (exit 139). The script below records, at the
moment Ray's shutdown begins, whether a monitor thread is still running: that is the hazard
itself, seen on every run rather than on the unlucky ones."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent('''
    import atexit, sys, threading
    import ray  # Ray registers its atexit ray.shutdown() here, first: it runs last

    def at_ray_shutdown():  # registered second: runs just before Ray's shutdown
        alive = [t for t in threading.enumerate() if t.name == "worker-group-monitor" and t.is_alive()]
        print("MONITORS_AT_RAY_SHUTDOWN", len(alive), flush=True)

    atexit.register(at_ray_shutdown)
    ray.init(address=sys.argv[1], namespace="clean-exit", log_to_driver=False)
    from lightx2v import LightX2V

    model = LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32",
                                     parallel={"cfg": 2, "ulysses": 2})
    frames = model.generate("a fox in snow", steps=2, seed=1, output_type="np")
    print("GENERATED", tuple(frames.shape), flush=True)
    # the script ends here, without model.close()
''')


def test_library_with_a_worker_group_exits_cleanly_without_close(ray_session, tmp_path):
    script = tmp_path / "no_close.py"
    script.write_text(SCRIPT)
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    out = proc.stdout + proc.stderr[-3000:]
    assert "GENERATED" in proc.stdout, out
    assert "MONITORS_AT_RAY_SHUTDOWN 0" in proc.stdout, out  # the group was shut down first
    assert proc.returncode == 0, out
