"""Fixtures of the UI tests: tiny-wan loaded once, the page on it (in this process), the service's
HTTP app on the same stages (API keys on), and a banner at the end of the run naming every UI
test that could not run here and why."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ui_service import NOT_RUN, did_not_run, start_service  # noqa: E402

API_KEY = "ui-test-key-0123456789abcdef"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if NOT_RUN:
        terminalreporter.section("UI TESTS THAT DID NOT RUN", sep="!", red=True, bold=True)
        for line in NOT_RUN:
            terminalreporter.write_line(line, red=True, bold=True)


@pytest.fixture(scope="session")
def ui_out(tmp_path_factory):
    return tmp_path_factory.mktemp("ui-out")


@pytest.fixture(scope="session")
def tiny_backend(ui_out):
    """tiny-wan in this process (text-to-video and image-to-video), for the page."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        did_not_run("THE PAGE TESTS (tests/ui)", "gradio is not installed: pip install -e '.[ui]' (make test does)")
    from lightx2v.web.backends import load_local

    return load_local("tiny-wan", "cpu", "float32", out_dir=ui_out / "local")


@pytest.fixture(scope="session")
def page_url(tiny_backend):
    """The page on tiny-wan, in this process."""
    from lightx2v.web.ui import launch
    from ui_service import free_port

    blocks, url = launch(tiny_backend, port=free_port(), block=False)
    yield url.rstrip("/")
    blocks.close()


@pytest.fixture(scope="session")
def service(tiny_backend, tmp_path_factory):
    """The service's HTTP app on tiny-wan's stages (no Ray), with API_KEY required."""
    server = start_service(tiny_backend.model.pipeline, "tiny-wan", str(tmp_path_factory.mktemp("svc-data")),
                           [API_KEY])
    yield server.url
    server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def remote_page(service, ui_out):
    """The page in server mode: a client of `service` with its API key."""
    from lightx2v.web.backends import RemoteBackend
    from lightx2v.web.ui import launch
    from ui_service import free_port

    backend = RemoteBackend(service, api_key=API_KEY, out_dir=ui_out / "remote")
    blocks, url = launch(backend, port=free_port(), block=False)
    yield url.rstrip("/"), backend
    blocks.close()
    backend.close()
