"""The node pack (comfyui/lightx2v_nodes) in the real ComfyUI engine (0.3.75, built by
tests/ui/comfyui_env.py, on the CPU, offline): ComfyUI started as a server with the pack in its
custom_nodes; API-format workflows posted to /prompt; execution followed over its websocket.

- loader -> sampler -> CreateVideo -> SaveVideo on tiny-wan: execution_success, the progress
  events of the denoising steps, the saved MP4's frame count, size and fps;
- an IMAGE input making it image-to-video (the size from the image's aspect ratio);
- a LoRA node (a LoRA file in models/loras) on the sampler: strength 1 changes the video,
  strength 0 gives the video without it;
- the remote sampler against the service's HTTP app (API key): the same kind of MP4;
- ComfyUI's Cancel (/interrupt) stopping a long sampler run;
- bad inputs: ComfyUI's 400 with node_errors (a value over its maximum, an empty prompt), and a
  request the model refuses (a size off its stride) failing with the field named;
- the workflow drawn by ComfyUI's own frontend in headless Chromium (a screenshot, not blank;
  `LIGHTX2V_SCREENSHOTS=docs` copies it to docs/ui-comfyui.png).

Without the ComfyUI build (or the browser, for the screenshot) these say why they did not run,
at the end of the run; with LIGHTX2V_REQUIRE_UI_TESTS=1 (.ci/run) that is a failure."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from stages.video import read_mp4
from ui_service import REPO, SCREENSHOTS_ENV, did_not_run, free_port, write_tiny_lora

PACK = REPO / "comfyui" / "lightx2v_nodes"
API_KEY = "ui-test-key-0123456789abcdef"  # tests/ui/conftest.py
COMFY_REGISTRY = "api.comfy.org"


class Comfy:
    """A running ComfyUI: its URL, base directory and object_info."""

    def __init__(self, url: str, base: Path) -> None:
        import httpx

        self.url, self.base = url, base
        self.http = httpx.Client(base_url=url, timeout=60, trust_env=False)
        self.info = self.http.get("/object_info").json()

    def inputs(self, node: str, **given) -> dict:
        """Every required input of `node` at its default (what the UI would send), then `given`."""
        out = {}
        for name, spec in self.info[node]["input"]["required"].items():
            options = spec[1] if len(spec) > 1 else {}
            if "default" in options:
                out[name] = options["default"]
            elif self.choices(node, name):
                out[name] = self.choices(node, name)[0]
        return {**out, **given}

    def choices(self, node: str, name: str) -> list:
        """A combo input's options (V1 lists them in place of the type, V3 as "options")."""
        spec = self.info[node]["input"]["required"][name]
        return spec[0] if isinstance(spec[0], list) else (spec[1] if len(spec) > 1 else {}).get("options", [])

    def post(self, workflow: dict):
        client_id = uuid.uuid4().hex
        return self.http.post("/prompt", json={"prompt": workflow, "client_id": client_id}), client_id

    def run(self, workflow: dict, timeout: float = 240, on_message=None) -> tuple[dict, list[dict]]:
        """Post, follow the websocket to execution_success; returns (the prompt's history entry,
        the messages seen), or ({"error": ...}) / ({"interrupted": ...}) when it ended so.
        `on_message(message)` sees each message as it comes."""
        import websocket

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"{self.url.replace('http', 'ws')}/ws?clientId={client_id}", timeout=timeout)
        try:
            r = self.http.post("/prompt", json={"prompt": workflow, "client_id": client_id})
            assert r.status_code == 200, r.text
            prompt_id = r.json()["prompt_id"]
            seen = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                raw = ws.recv()
                if not isinstance(raw, str):
                    continue  # binary preview frames
                message = json.loads(raw)
                seen.append(message)
                if on_message is not None:
                    on_message(message)
                data = message.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if message["type"] == "execution_error":
                    return {"error": data, "says": f"{data.get('exception_message')}\n"
                                                   f"{''.join(data.get('traceback') or [])}"}, seen
                if message["type"] == "execution_interrupted":
                    return {"interrupted": data}, seen
                if message["type"] == "execution_success":
                    return self.history(prompt_id, deadline), seen
            pytest.fail(f"no execution_success within {timeout} s")
        finally:
            ws.close()

    def history(self, prompt_id: str, deadline: float) -> dict:
        """The prompt's history entry (ComfyUI records it just after execution_success)."""
        while time.monotonic() < deadline:
            entry = self.http.get(f"/history/{prompt_id}").json().get(prompt_id)
            if entry:
                return entry
            time.sleep(0.05)
        pytest.fail(f"no history for {prompt_id}")

    def saved_video(self, history: dict, node: str) -> Path:
        (item,) = history["outputs"][node]["images"]
        return self.base / "output" / item["subfolder"] / item["filename"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import comfyui_env

    if not comfyui_env.ready() and comfyui_env.main() != 0:
        did_not_run("THE COMFYUI TEST (tests/ui/test_comfyui.py)",
                    comfyui_env.LOG.read_text().strip() if comfyui_env.LOG.exists() else "the build failed")
    paths = comfyui_env.paths()
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK.name).symlink_to(PACK)
    write_tiny_lora(base / "models" / "loras" / "tiny_style.safetensors")
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = free_port()
    log = open(base / "comfyui.log", "w+")
    env = {**os.environ, "PYTHONPATH": paths["stubs"], "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([paths["python"], "main.py", "--cpu", "--disable-api-nodes",
                             "--database-url", "sqlite:///:memory:", "--base-directory", str(base),
                             "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
                             "--preview-method", "none"],
                            cwd=paths["comfyui"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc, log, timeout=180)
        server = Comfy(url, base)
        if "LightX2VSampler" not in server.info:
            log.seek(0)
            pytest.fail(f"ComfyUI did not load the pack:\n{log.read()[-4000:]}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_up(url: str, proc, log, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/system_stats", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    log.seek(0)
    pytest.fail(f"ComfyUI did not start (exit {proc.poll()}):\n{log.read()[-4000:]}")


def t2v_workflow(comfy: Comfy, prefix: str, sampler: dict | None = None, *, remote: bool = False) -> dict:
    """loader -> sampler -> CreateVideo -> SaveVideo (or remote sampler -> CreateVideo -> SaveVideo)."""
    asked = {"prompt": "a red fox running through fresh snow", "num_frames": 5, "height": 48, "width": 80,
             "steps": 6, "seed": 7, **(sampler or {})}
    if remote:
        nodes = {"2": {"class_type": "LightX2VRemoteSampler", "inputs": comfy.inputs("LightX2VRemoteSampler", **asked)}}
    else:
        nodes = {"1": {"class_type": "LightX2VModelLoader",
                       "inputs": comfy.inputs("LightX2VModelLoader", model="tiny-wan", device="cpu")},
                 "2": {"class_type": "LightX2VSampler",
                       "inputs": comfy.inputs("LightX2VSampler", model=["1", 0], **asked)}}
    nodes["3"] = {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": ["2", 1]}}
    nodes["4"] = {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": prefix,
                                                        "format": "mp4", "codec": "h264"}}
    return nodes


def test_t2v_workflow_saves_the_asked_video(comfy):
    history, seen = comfy.run(t2v_workflow(comfy, "lightx2v/t2v"))
    assert "error" not in history, history.get("says")
    video = read_mp4(str(comfy.saved_video(history, "4")))
    assert video.frames.shape == (5, 48, 80, 3) and video.codec.startswith("h264")
    assert abs(video.fps - 8) < 1e-6  # tiny-wan's fps, passed on by the sampler's fps output
    assert video.frames.std() > 5  # noise from random weights, not a blank video
    # ComfyUI's progress bar followed the sampler's denoising steps.
    steps = [m["data"] for m in seen if m["type"] == "progress" and m["data"].get("node") == "2"]
    assert steps and {s["max"] for s in steps} == {6} and max(s["value"] for s in steps) == 6, steps


def test_image_input_makes_it_image_to_video_at_the_image_aspect(comfy):
    """An IMAGE wired to the sampler (the core EmptyImage, 96x64) with the size left unset: the
    video follows the image's aspect ratio at the model's default area, as the library does."""
    from PIL import Image

    from engine.registry import get_spec
    from stages.request import image_video_size

    workflow = t2v_workflow(comfy, "lightx2v/i2v", {"height": 0, "width": 0, "steps": 2})
    workflow["5"] = {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1,
                                                            "color": 0xC83232}}
    workflow["2"]["inputs"]["image"] = ["5", 0]
    history, _ = comfy.run(workflow)
    assert "error" not in history, history.get("says")
    height, width = image_video_size(get_spec("tiny-wan"), Image.new("RGB", (96, 64)))
    assert read_mp4(str(comfy.saved_video(history, "4"))).frames.shape == (5, height, width, 3)
    assert (height, width) != (64, 64)  # not the text-to-video default: the image decided it


def test_lora_node_changes_the_video_and_strength_zero_does_not(comfy):
    def with_lora(strength: float) -> dict:
        workflow = t2v_workflow(comfy, f"lightx2v/lora{strength}", {"steps": 3})
        workflow["5"] = {"class_type": "LightX2VLoRA", "inputs": comfy.inputs(
            "LightX2VLoRA", lora_name="tiny_style.safetensors", strength=strength)}
        workflow["2"]["inputs"]["lora"] = ["5", 0]
        return workflow

    assert "tiny_style.safetensors" in comfy.choices("LightX2VLoRA", "lora_name")
    frames = {}
    for name, workflow in (("none", t2v_workflow(comfy, "lightx2v/nolora", {"steps": 3})),
                           ("one", with_lora(1.0)), ("zero", with_lora(0.0))):
        history, _ = comfy.run(workflow)
        assert "error" not in history, history.get("says")
        frames[name] = read_mp4(str(comfy.saved_video(history, "4"))).frames.astype(np.int16)
    assert np.abs(frames["one"] - frames["none"]).mean() > 5
    assert np.abs(frames["zero"] - frames["none"]).max() <= 2  # the same video (same codec input)


def test_remote_sampler_uses_the_service(comfy, service):
    workflow = t2v_workflow(comfy, "lightx2v/remote", {"server_url": service, "api_key": API_KEY, "num_frames": 9,
                                                       "height": 32, "width": 64, "steps": 4}, remote=True)
    history, seen = comfy.run(workflow)
    assert "error" not in history, history.get("says")
    video = read_mp4(str(comfy.saved_video(history, "4")))
    assert video.frames.shape == (9, 32, 64, 3) and abs(video.fps - 8) < 1e-6
    assert any(m["type"] == "progress" and m["data"].get("node") == "2" for m in seen)
    # Without the key the service refuses, and ComfyUI says why.
    workflow["2"]["inputs"].update(api_key="not-the-key-0123456789", seed=8)
    history, _ = comfy.run(workflow)
    assert "API key" in history["error"]["exception_message"], history


def test_comfyui_cancel_stops_the_sampler_at_the_next_step(comfy):
    workflow = t2v_workflow(comfy, "lightx2v/long", {"steps": 1000, "num_frames": 1, "height": 16, "width": 16,
                                                     "seed": 9})
    asked = []

    def interrupt_once_running(message):
        data = message.get("data", {})
        if message["type"] == "progress" and data.get("node") == "2" and data["value"] >= 2 and not asked:
            asked.append(data["value"])
            assert comfy.http.post("/interrupt").status_code == 200  # ComfyUI's Cancel button

    result, seen = comfy.run(workflow, on_message=interrupt_once_running)
    assert "interrupted" in result and result["interrupted"]["node_id"] == "2", result
    done = max(m["data"]["value"] for m in seen if m["type"] == "progress" and m["data"].get("node") == "2")
    assert asked and done < 1000, done


def test_bad_inputs_are_refused_with_node_errors(comfy):
    too_many = t2v_workflow(comfy, "lightx2v/bad", {"steps": 5000})
    r, _ = comfy.post(too_many)
    assert r.status_code == 400, r.text
    errors = r.json()["node_errors"]
    assert list(errors) == ["2"] and errors["2"]["class_type"] == "LightX2VSampler"
    assert any(e["type"] == "value_bigger_than_max" and "steps" in e["details"] for e in errors["2"]["errors"]), errors

    r, _ = comfy.post(t2v_workflow(comfy, "lightx2v/bad", {"prompt": "  "}))
    assert r.status_code == 400 and "prompt must be a non-empty string" in r.text, r.text

    # A size the model cannot make: refused when the request meets the model, naming the field.
    history, _ = comfy.run(t2v_workflow(comfy, "lightx2v/bad", {"height": 40}))
    message = history["error"]["exception_message"]
    assert "height: must be a multiple of 16" in message, history


def test_comfyui_frontend_draws_the_workflow(comfy, tmp_path):
    """ComfyUI's own page (from its frontend package, served locally) with the workflow loaded."""
    from test_page_browser import browser_or_reason, check_not_blank, requested_hosts, save_small

    found = browser_or_reason()
    if isinstance(found, str):
        did_not_run("THE COMFYUI FRONTEND SCREENSHOT (tests/ui/test_comfyui.py)", found)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(comfy.url)
        deadline = time.monotonic() + 60
        while not driver.execute_script("return !!(window.app && window.app.graph)"):
            assert time.monotonic() < deadline, "ComfyUI's frontend did not start"
            time.sleep(0.2)
        workflow = t2v_workflow(comfy, "lightx2v/t2v")
        driver.execute_script("return window.app.loadApiJson(arguments[0], 'lightx2v')", workflow)
        time.sleep(1.0)
        # Like a person would: close the announcement banner, then fit the graph to the view (".").
        driver.execute_script(
            "for (const b of document.querySelectorAll('button')) {"
            "  const bar = b.closest('div');"
            "  if (bar && /Introducing/.test(bar.innerText) && !b.innerText.trim()) b.click(); }")
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = driver.find_element("css selector", "#graph-canvas")
        corner = (-canvas.size["width"] // 2 + 80, canvas.size["height"] // 2 - 40)  # an empty spot
        ActionChains(driver).move_to_element_with_offset(canvas, *corner).click().send_keys(".").perform()
        time.sleep(1.0)
        types = driver.execute_script("return window.app.graph._nodes.map(n => n.type)")
        assert {"LightX2VModelLoader", "LightX2VSampler", "CreateVideo", "SaveVideo"} <= set(types), types
        shot = tmp_path / "ui-comfyui.png"
        driver.save_screenshot(str(shot))
        check_not_blank(shot, driver, "#graph-canvas")
        if os.environ.get(SCREENSHOTS_ENV):
            save_small(shot, REPO / os.environ[SCREENSHOTS_ENV] / "ui-comfyui.png")
        # Offline as far as the nodes go: nothing but ComfyUI's own frontend asking its registry
        # (api.comfy.org: news and node info; it carries on without an answer).
        assert requested_hosts(driver) - {urlparse(comfy.url).netloc} <= {COMFY_REGISTRY}
    finally:
        driver.quit()
