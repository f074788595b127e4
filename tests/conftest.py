"""Shared fixtures. One Ray instance per test session (starting Ray costs ~7 s on 2 cores)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with 8 faked GPUs, shared by every test in the session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=8, include_dashboard=False, log_to_driver=False,
                 namespace="lightx2v-tests")
    yield ray
    # Shut down at the very end; Serve apps are torn down by their own fixtures.


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """The tiny random-weight Wan checkpoint (diffusers layout), generated once per session."""
    from engine.registry import get_spec

    spec = get_spec("tiny-wan")
    return spec.materialize()
