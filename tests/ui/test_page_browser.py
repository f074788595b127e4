"""The page as a person uses it: `python -m lightx2v.web.ui --model tiny-wan` started as a
command, driven by a headless Chromium (Debian's `chromium` + `chromium-driver`, through
selenium): type a prompt, set the size, click Generate, watch the progress bar, wait for the
video element to play a video of the asked size, reuse the seed, cancel a long run. The
screenshot must not be blank, and the browser must not have fetched anything from outside the
page's own host (the page works offline).

Without the browser packages this test does not run, and says so at the end of the run (a red
banner), never silently; `.ci/run` installs them and sets LIGHTX2V_REQUIRE_UI_TESTS=1, so in
CI a missing browser is a failure. `LIGHTX2V_SCREENSHOTS=docs` copies the screenshot to
docs/ui-page.png (README)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from ui_service import REPO, SCREENSHOTS_ENV, did_not_run, free_port

BROWSER_LOG = REPO / ".venv" / ".browser-install.log"
"""Where `make test` records why it could not install the browser packages."""


def browser_or_reason() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why the browser test cannot run here."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[ui]')")
    if not missing:
        return shutil.which("chromium"), shutil.which("chromedriver")
    why = f"{', '.join(missing)} not installed."
    if BROWSER_LOG.exists():
        why += f" `make test` tried to install them: {BROWSER_LOG.read_text().strip().splitlines()[-1]}"
    return why + (" Install with `sudo apt-get install chromium chromium-driver` (Debian), or run "
                  "`.ci/run` as root.")


@pytest.fixture(scope="module")
def page_command(tmp_path_factory):
    """`python -m lightx2v.web.ui --model tiny-wan --device cpu` on a free port, as a user starts it."""
    found = browser_or_reason()
    if isinstance(found, str):
        did_not_run("THE BROWSER TEST (tests/ui/test_page_browser.py)", found)
    tmp = tmp_path_factory.mktemp("page-command")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PYTHONUNBUFFERED": "1"}
    log = open(tmp / "page.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lightx2v.web.ui", "--model", "tiny-wan", "--device", "cpu",
                             "--port", str(port), "--output-dir", str(tmp / "out")],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url, proc, log, timeout=240)
        yield url, found
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_http(url: str, proc: subprocess.Popen, log, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the page command exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    log.seek(0)
    pytest.fail(f"the page did not answer within {timeout} s:\n{log.read()[-4000:]}")


@pytest.fixture(scope="module")
def browser(page_command):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # no Selenium Manager look-ups on the network
    _, (chromium, chromedriver) = page_command
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400",
                 "--mute-audio", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def wait_for(driver, check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - the element may not exist yet
            last = e
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def set_value(driver, selector: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    element = css(driver, selector)
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(str(value))
    element.send_keys(Keys.TAB)  # Gradio takes the value on blur


def text_of(driver, elem_id: str) -> str:
    return driver.execute_script(
        f"const e = document.querySelector('#{elem_id} textarea, #{elem_id} input'); return e ? e.value : null;")


def test_page_in_chromium(page_command, browser, tmp_path):
    url, _ = page_command
    driver = browser
    driver.get(url)
    wait_for(driver, lambda: css(driver, "#t2v-prompt textarea"), 60, "the prompt box")
    assert "random weights" in css(driver, "#noise-warning").text

    # 1. Type a prompt, ask for 80x48, 5 frames, 30 steps (so the bar is seen), a random seed.
    css(driver, "#t2v-prompt textarea").send_keys("a red fox running through fresh snow")
    for elem_id, value in (("t2v-num-frames", 5), ("t2v-height", 48), ("t2v-width", 80), ("t2v-steps", 30)):
        set_value(driver, f"#{elem_id} input[type=number]", value)
    # Every text the result area shows while it runs (the progress bar's), recorded by the page.
    # (The whole page is watched: Gradio may render the result area anew.)
    driver.execute_script(
        "window.seenProgress = [];"
        "new MutationObserver(() => { const area = document.querySelector('#t2v-result');"
        "                             if (area) window.seenProgress.push(area.innerText); })"
        "  .observe(document.body, {subtree: true, childList: true, characterData: true});")
    css(driver, "#t2v-generate").click()

    # 2. The progress bar counts the denoising steps, then the video element plays the result.
    wait_for(driver, lambda: driver.execute_script(
        "const v = document.querySelector('#t2v-result video'); return v && v.readyState >= 2 ? v : null;"),
        180, "the result video")
    shown = "\n".join(driver.execute_script("return window.seenProgress"))
    steps = [int(n) for n in re.findall(r"(\d+)/30 steps", shown)]  # the bar: "5/30 steps ... denoising"
    assert steps and "denoising" in shown and steps == sorted(steps), shown[-500:]
    playing = wait_for(driver, lambda: driver.execute_script(
        "const v = document.querySelector('#t2v-result video'); v.muted = true;"
        "if (v.paused) v.play(); return v.currentTime > 0 ? [v.videoWidth, v.videoHeight, v.duration] : null;"),
        30, "the video to play")
    width, height, duration = playing
    assert (width, height) == (80, 48)
    assert abs(duration - 5 / 8) < 0.2, duration  # 5 frames at the model's 8 fps
    status = css(driver, "#t2v-status").text
    assert "Done" in status and "5 frames, 80x48" in status, status

    # 3. The seed used is shown; "Reuse seed" puts it into the seed input.
    seed = text_of(driver, "t2v-seed-used")
    assert seed and seed.isdigit(), seed
    css(driver, "#t2v-reuse-seed").click()
    wait_for(driver, lambda: text_of(driver, "t2v-seed") == seed, 10, "the seed to be reused")

    # 4. The screenshot is not blank: the page has text and the video shows the (noise) frames.
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    shot = tmp_path / "ui-page.png"
    driver.save_screenshot(str(shot))
    check_not_blank(shot, driver, "#t2v-result video")
    if os.environ.get(SCREENSHOTS_ENV):
        save_small(shot, REPO / os.environ[SCREENSHOTS_ENV] / "ui-page.png")

    # 5. Cancel a long run from its button.
    set_value(driver, "#t2v-steps input[type=number]", 1000)
    css(driver, "#t2v-generate").click()
    wait_for(driver, lambda: "denoising" in driver.execute_script(
        "return document.querySelector('#t2v-result').innerText"), 60, "the long run to start denoising")
    css(driver, "#t2v-cancel").click()
    wait_for(driver, lambda: "Cancelled" in css(driver, "#t2v-status").text, 60, "the run to be cancelled")

    # 6. Offline: every request the browser made went to the page's own host.
    assert requested_hosts(driver) == {urlparse(url).netloc}


def requested_hosts(driver) -> set[str]:
    """The hosts of every request the browser sent (its performance log; data: and blob: URLs
    are not requests)."""
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            target = urlparse(message["params"]["request"]["url"])
            if target.scheme not in ("data", "blob"):
                hosts.add(target.netloc)
    return hosts


def check_not_blank(path: Path, driver, video_selector: str) -> None:
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    assert image.std() > 10, "the screenshot is blank"
    assert len(np.unique(image.reshape(-1, 3)[::7], axis=0)) > 50, "the screenshot has almost no colours"
    rect = driver.execute_script(
        f"const r = document.querySelector('{video_selector}').getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, window.devicePixelRatio];")
    left, top, width, height, ratio = (float(v) for v in rect)
    box = image[int(top * ratio):int((top + height) * ratio), int(left * ratio):int((left + width) * ratio)]
    assert box.size and box.std() > 5, "the video element shows nothing"


def save_small(shot: Path, target: Path) -> None:
    """A small PNG for the docs (three quarters of the size, 128 colours)."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(shot).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    image.quantize(128).save(target, optimize=True)
