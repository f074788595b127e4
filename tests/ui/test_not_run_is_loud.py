"""A UI test that cannot run here says so loudly (a red banner at the end of the run, naming the
test and the reason), and fails where CI requires the UI tests (LIGHTX2V_REQUIRE_UI_TESTS=1):
the browser test run in a child pytest with no chromium on its PATH."""
from __future__ import annotations

import os
import subprocess
import sys

from ui_service import REPO, REQUIRE_ENV


def run_without_browser(tmp_path, **env) -> subprocess.CompletedProcess:
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    environ.update(PATH=str(empty), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "tests/ui/test_page_browser.py", "--basetemp", str(tmp_path / "run")],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


def test_missing_browser_is_reported_not_silently_skipped(tmp_path):
    r = run_without_browser(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "UI TESTS THAT DID NOT RUN" in out
    assert "THE BROWSER TEST (tests/ui/test_page_browser.py) DID NOT RUN: chromium, chromedriver not installed" in out
    assert "apt-get install chromium chromium-driver" in out  # how to make it run


def test_ci_fails_when_the_browser_test_cannot_run(tmp_path):
    r = run_without_browser(tmp_path, **{REQUIRE_ENV: "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 error" in out or "1 failed" in out, out
    assert f"{REQUIRE_ENV} is set: CI must run it" in out
