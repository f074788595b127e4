"""bench/bench_cache.py runs on the CPU at tiny size (--tiny): every run reported, the caches skip."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))


def test_tiny_run(tmp_path):
    import bench_cache

    out = tmp_path / "cache.json"
    bench_cache.main(["--tiny", "--json", str(out), "--save-latents", str(tmp_path / "lat")])
    lines = {line["run"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert sorted(lines) == ["distill", "magcache", "none", "teacache"]
    assert lines["none"]["latent_rel_err_vs_none"] == 0.0
    for run in ("teacache", "magcache"):
        assert lines[run]["skipped_steps"] and lines[run]["latent_rel_err_vs_none"] > 0
    assert lines["distill"]["steps"] == 4 and lines["distill"]["guidance_scale"] == 1.0
    assert (tmp_path / "lat" / "magcache.pt").exists()
