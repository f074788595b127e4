"""The page's endpoints through gradio_client (the fast test; test_page_browser.py drives the same
page in Chromium): in process on tiny-wan, and in server mode against the service's HTTP app
with an API key. Generate with the asked size and frames, the denoising steps as progress, the
seed shown and reusable, cancel, errors naming the field, history."""
from __future__ import annotations

import time

import numpy as np
import pytest

from stages.video import read_mp4

try:
    from gradio_client import Client, handle_file
except ImportError:
    from ui_service import did_not_run

    did_not_run("THE PAGE TESTS (tests/ui/test_page.py)", "gradio_client is not installed: pip install -e '.[ui]' "
                                                          "(make test does)")

API_KEY = "ui-test-key-0123456789abcdef"  # tests/ui/conftest.py


def run(client: Client, api_name: str, **inputs):
    """Submit, record the progress updates, return (outputs, progress units seen)."""
    job = client.submit(api_name=api_name, **inputs)
    seen = []
    while not job.done():
        status = job.status()
        if status.progress_data:
            seen.extend(status.progress_data)
        time.sleep(0.05)
    return job.result(), seen


def frames_of(path: str) -> np.ndarray:
    return read_mp4(path).frames


def test_generate_with_size_frames_seed_and_progress(page_url):
    client = Client(page_url, verbose=False)
    (video, seed, status), seen = run(client, "/generate_t2v", prompt="a red fox in the snow", num_frames=5,
                                      height=48, width=80, steps=12, seed="7")
    assert "Done" in status and "random weights: noise" in status, status
    assert seed == "7"
    frames = frames_of(video)
    assert frames.shape == (5, 48, 80, 3)
    # The progress bar counts the denoising steps (index of length 60: enough steps for the
    # client's polling to see some).
    _, seen = run(client, "/generate_t2v", prompt="a red fox in the snow", num_frames=5, height=48, width=80,
                  steps=60, seed="7")
    steps = [(u.index, u.length) for u in seen if u.desc == "denoising"]
    assert steps and all(length == 60 for _, length in steps) and max(i for i, _ in steps) >= 1, seen

    # The same seed gives the same video; an empty seed draws one, shown, and reusing it repeats it.
    (again, _, _), _ = run(client, "/generate_t2v", prompt="a red fox in the snow", num_frames=5,
                           height=48, width=80, steps=12, seed="7")
    assert np.array_equal(frames_of(again), frames)
    (drawn, drawn_seed, _), _ = run(client, "/generate_t2v", prompt="a red fox in the snow", num_frames=5,
                                    height=48, width=80, steps=12, seed="")
    assert drawn_seed.isdigit() and drawn_seed != "7"
    (reused, reused_seed, _), _ = run(client, "/generate_t2v", prompt="a red fox in the snow", num_frames=5,
                                      height=48, width=80, steps=12, seed=drawn_seed)
    assert reused_seed == drawn_seed and np.array_equal(frames_of(reused), frames_of(drawn))
    assert not np.array_equal(frames_of(drawn), frames)


def test_image_to_video_tab(page_url, tmp_path):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(image)
    client = Client(page_url, verbose=False)
    (video, seed, status), _ = run(client, "/generate_i2v", prompt="the square moves", image=handle_file(str(image)),
                                   num_frames=9, height=64, width=96, steps=2, seed="3")
    assert "Done" in status, status
    assert frames_of(video).shape == (9, 64, 96, 3) and seed == "3"


def test_errors_name_the_field(page_url):
    client = Client(page_url, verbose=False)
    video, seed, status = client.predict(prompt="a fox", height=50, api_name="/generate_t2v")
    assert video is None and "Not started" in status and "height: must be a multiple of 16" in status, status
    _, _, status = client.predict(prompt="   ", api_name="/generate_t2v")
    assert "prompt must be a non-empty string" in status, status
    _, _, status = client.predict(prompt="a fox", seed="seven", api_name="/generate_t2v")
    assert "seed must be a whole number" in status, status


def test_cancel_stops_the_run(page_url):
    client = Client(page_url, verbose=False)
    job = client.submit(prompt="a long one", steps=1000, num_frames=1, height=16, width=16, seed="1",
                        api_name="/generate_t2v")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until denoising has started
        data = job.status().progress_data or []
        if any(u.desc == "denoising" and (u.index or 0) >= 1 for u in data):
            break
        time.sleep(0.05)
    else:
        pytest.fail("denoising did not start")
    t0 = time.monotonic()
    client.predict(api_name="/cancel_t2v")  # the same browser session (client) as the run
    video, seed, status = job.result(timeout=60)
    assert time.monotonic() - t0 < 20
    assert video is None and status.startswith("**Cancelled") and seed == "1", status


# ----------------------------------------------------------------------------- server mode


def test_server_mode_generates_lists_history_and_shows_it(remote_page):
    url, backend = remote_page
    assert backend.name == "tiny-wan" and "size" not in backend.accepted and "height" in backend.accepted
    client = Client(url, verbose=False)
    (video, seed, status), seen = run(client, "/generate_t2v", prompt="a fox over the service", num_frames=5,
                                      height=32, width=48, steps=8, seed="11")
    assert "Done" in status, status
    assert seed == "11" and frames_of(video).shape == (5, 32, 48, 3)
    assert any(u.desc in ("denoising", "queued") for u in seen), seen

    rows, pick = client.predict(api_name="/history")
    data = rows["data"] if isinstance(rows, dict) else rows
    job_ids = [r[0] for r in data]
    assert job_ids and job_ids[0].startswith("video_") and data[0][1] == "completed" and data[0][6] == "11"
    shown, shown_seed, info = client.predict(job_ids[0], api_name="/history_show")
    assert shown_seed == "11" and frames_of(shown).shape == (5, 32, 48, 3), info


def test_server_mode_errors_and_cancel(remote_page, service):
    url, backend = remote_page
    client = Client(url, verbose=False)
    _, _, status = client.predict(prompt="a fox", height=40, width=48, api_name="/generate_t2v")
    assert "Not started" in status and "size: must be a multiple of 16" in status, status

    job = client.submit(prompt="a long remote one", steps=1000, num_frames=1, height=16, width=16, seed="5",
                        api_name="/generate_t2v")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(u.progress and u.progress > 0 for u in job.status().progress_data or []):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the remote job made no progress")
    client.predict(api_name="/cancel_t2v")
    video, _, status = job.result(timeout=60)
    assert video is None and status.startswith("**Cancelled"), status
    listed = backend.recent()
    assert all(v["prompt"] != "a long remote one" for v in listed)  # DELETE cancelled and removed it


def test_server_mode_needs_the_api_key(service, capsys):
    from lightx2v.web.backends import RemoteBackend, ServiceError
    from lightx2v.web.ui import main

    with pytest.raises(ServiceError, match="API key"):
        RemoteBackend(service, api_key="not-the-key-0123456789")
    assert main(["--server", service]) == 2
    assert "give the service's API key" in capsys.readouterr().err
    assert main(["--server", service, "--api-key", API_KEY, "--device", "cpu"]) == 2
    assert "engine options (device) are `lightx2v serve`'s flags" in capsys.readouterr().err
    assert main(["--server", service, "--api-key", API_KEY, "--server-model", "wan2.1-t2v-14b"]) == 2
    assert "model 'wan2.1-t2v-14b' is not served at" in capsys.readouterr().err
    assert RemoteBackend(service, api_key=API_KEY, model="TINY-WAN").name == "tiny-wan"


# ----------------------------------------------------------------------------- LoRAs


def test_page_offers_loras_by_name_only_with_a_lora_folder(page_url, tmp_path):
    """The page is a network entrance: like the service, it takes LoRA names (files in the
    engine's lora_dir), never paths; without a lora_dir it has no LoRA input."""
    from lightx2v.web.backends import load_local
    from ui_service import write_tiny_lora

    endpoint = Client(page_url, verbose=False).view_api(return_format="dict")["named_endpoints"]["/generate_t2v"]
    assert "lora" not in [p["parameter_name"] for p in endpoint["parameters"]]  # tiny_backend: no lora_dir

    write_tiny_lora(tmp_path / "loras" / "tiny_style.safetensors")
    backend = load_local("tiny-wan", "cpu", "float32", out_dir=tmp_path / "out", lora_dir=str(tmp_path / "loras"))
    assert "lora" in backend.accepted

    def frames(**fields):
        job = backend.start({"prompt": "a fox", "num_frames": 5, "height": 32, "width": 32, "steps": 2, "seed": 3,
                             **fields})
        assert job.wait(120) and job.outcome.status == "completed", job.outcome
        return frames_of(job.outcome.path).astype(np.int16)

    plain = frames()
    styled = frames(lora=[{"path": "tiny_style", "strength": 1.0}])  # the page's parser says "path"
    assert np.abs(styled - plain).mean() > 5  # the LoRA was applied, by name
    with pytest.raises(ValueError, match="lora"):
        backend.start({"prompt": "a fox", "lora": [{"path": str(tmp_path / "loras" / "tiny_style.safetensors")}]})


# ----------------------------------------------------------------------------- image models


@pytest.fixture(scope="module")
def image_page(ui_out):
    from engine.registry import list_specs
    from lightx2v.web.backends import load_local
    from lightx2v.web.ui import launch
    from ui_service import free_port

    if "tiny-qwen-image" not in {s.name for s in list_specs()}:
        pytest.skip("no tiny image model is registered")
    backend = load_local("tiny-qwen-image", "cpu", "float32", out_dir=ui_out / "image")
    blocks, url = launch(backend, port=free_port(), block=False)
    yield url.rstrip("/")
    blocks.close()


def test_image_model_page_has_a_text_to_image_tab_and_shows_the_image(image_page):
    from PIL import Image

    client = Client(image_page, verbose=False)
    endpoints = client.view_api(return_format="dict")["named_endpoints"]
    assert "/generate_t2i" in endpoints and "/generate_t2v" not in endpoints
    names = [p["parameter_name"] for p in endpoints["/generate_t2i"]["parameters"]]
    assert "num_frames" not in names and "fps" not in names and "height" in names
    image, seed, status = client.predict(prompt="a small red house", height=64, width=96, steps=2, seed="4",
                                         api_name="/generate_t2i")
    assert "Done" in status and "64" in status and "frames" not in status, status
    assert seed == "4" and Image.open(image).size == (96, 64)
