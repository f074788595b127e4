"""The DiT worker group through Ray (gloo on CPU, faked GPUs): world sizes 1, 2 (cfg), 2 (ulysses)
and 4 (cfg 2 x ulysses 2) give the in-process world-size-1 latents for T2V and I2V; cancel, progress,
and a rank killed mid-request."""
from __future__ import annotations

import os
import sys
import time
import uuid

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "engine"))
import parallel_ranks as pr  # noqa: E402  (tiny models and cases shared with the plain-process test)

from cluster.dit_worker import DiTWorker  # noqa: E402
from cluster.worker_group import WorkerGroup, WorkerGroupError  # noqa: E402
from engine.options import EngineOptions, ParallelConfig  # noqa: E402
from engine.parallel import apply_parallel, single_mesh  # noqa: E402

pytestmark = pytest.mark.ray

TOL = 1e-4
CASES = {c.name: c for c in pr.CASES}
RAY_CASES = {"t2v": ["t2v_odd_tokens", "t2v_guidance_off"], "i2v": ["i2v_odd_tokens"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_ckpt")
    return {task: pr.write_checkpoint(str(root / task), task) for task in ("t2v", "i2v")}


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    names = [n for names in RAY_CASES.values() for n in names]
    return {n: pr.denoise(lambda m: apply_parallel(m, single_mesh()), CASES[n]) for n in names}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run_case(group: WorkerGroup, name: str, job_id: str | None = None):
    request, text, image = pr.case_inputs(CASES[name])
    return group.get(group.call("denoise", request, text, image, job_id or uuid.uuid4().hex))


@pytest.mark.parametrize("cfg,ulysses,gpus", [(1, 1, 1.0), (2, 1, 0.0), (1, 2, 1.0), (2, 2, 0.5)])
def test_group_equals_single_process(ray_session, checkpoints, reference, cfg, ulysses, gpus):
    options = EngineOptions(parallel=ParallelConfig(cfg=cfg, ulysses=ulysses))
    group = WorkerGroup(DiTWorker, options.parallel.world_size, gpus_per_worker=gpus, timeout_s=120)
    try:
        group.start()
        for task, names in RAY_CASES.items():
            loaded = group.get(group.call("load_model", checkpoints[task], options))
            assert [x["rank"] for x in loaded] == list(range(options.parallel.world_size))
            assert all(s >= 0 for s in group.get(group.call("warm_up")))
            for name in names:
                outs = run_case(group, name)
                assert all(o is None for o in outs[1:]), "only rank 0 returns the latents"
                err = rel_err(outs[0].latents, reference[name])
                assert err < TOL, f"{name} cfg={cfg} ulysses={ulysses}: rel err {err:.2e}"
        group.check_health()
    finally:
        group.shutdown()


def _wait_for_step(group: WorkerGroup, job_id: str, step: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = group.get(group.call_rank(0, "progress", job_id))
        if p is not None and p["step"] >= step:
            return p
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach step {step} within {timeout} s")


def _long_request():
    from dataclasses import replace

    request, text, image = pr.case_inputs(replace(CASES["t2v_even_tokens"], steps=1000))
    return request, text, image


@pytest.fixture(scope="module")
def cfg_group(ray_session, checkpoints):
    """cfg 2 (two gloo ranks, no GPUs) with the T2V DiT loaded: shared by the tests below."""
    options = EngineOptions(parallel=ParallelConfig(cfg=2, ulysses=1))
    group = WorkerGroup(DiTWorker, 2, gpus_per_worker=0, timeout_s=120)
    try:
        group.start()
        group.get(group.call("load_model", checkpoints["t2v"], options))
        yield group
    finally:
        group.shutdown()


def test_cancel_and_progress(cfg_group, reference):
    from stages.base import Cancelled

    group = cfg_group
    # a cancel sent to rank 1 only still stops every rank at the same step (agreed per step)
    refs = group.call("denoise", *_long_request(), "job-cancel")
    p = _wait_for_step(group, "job-cancel", 2)
    assert p["total"] == 1000
    group.get(group.call_rank(1, "cancel", "job-cancel"))
    for ref in refs:
        with pytest.raises(Cancelled, match="cancelled before step"):
            group.get(ref, timeout=60)
    stopped = group.get(group.call_rank(0, "progress", "job-cancel"))
    assert stopped["step"] < 1000
    # the group is healthy and serves the next request correctly
    group.check_health()
    out = run_case(group, "t2v_odd_tokens")[0]
    assert rel_err(out.latents, reference["t2v_odd_tokens"]) < TOL


def test_unresolved_request_is_refused(cfg_group):
    """The ranks take a ResolvedRequest only (resolved once by the caller, so every rank runs the
    same seed); a GenerationRequest is refused on every rank, even one with a seed, and the group
    stays usable."""
    from stages.request import GenerationRequest

    _, text, _ = pr.case_inputs(CASES["t2v_even_tokens"])
    refs = cfg_group.call("denoise", GenerationRequest(prompt="p", seed=0), text, None, "unresolved")
    for ref in refs:
        with pytest.raises(TypeError, match="expected a ResolvedRequest .* got GenerationRequest"):
            cfg_group.get(ref, timeout=60)
    cfg_group.check_health()


def test_split_vae_decode_on_group(cfg_group, tiny_wan_dir):
    """The group's ranks decode tiny-wan's VAE together. "halo" (default): row stripes with halo
    exchange, equal to the plain single-process decode. "tiles": different tiles per rank, blended
    on rank 0, equal to the single-process tiled decode with the same tiles."""
    from engine.families import get_family
    from engine.checkpoint import resolve_checkpoint
    from engine.models.wan.vae import tiled_decode
    from stages.payloads import Latents

    group = cfg_group
    options = EngineOptions(parallel=ParallelConfig(cfg=2, ulysses=1))
    group.get(group.call("load_vae", "tiny-wan", options))
    latents = Latents(torch.randn(16, 2, 12, 12, generator=torch.Generator().manual_seed(0)))
    vae = get_family("wan").load_vae(resolve_checkpoint("tiny-wan"), EngineOptions())

    videos = group.get(group.call("decode", latents))
    assert videos[1] is None
    with torch.no_grad():
        plain = vae.decode(latents.latents[None])
    assert videos[0].shape == plain.shape == (1, 3, 5, 96, 96)
    assert (videos[0] - plain).norm() / plain.norm() < 1e-5

    videos = group.get(group.call("decode", latents, "tiles", (8, 8), (4, 4)))
    assert videos[1] is None
    with torch.no_grad():
        want = tiled_decode(vae, latents.latents[None], (8, 8), (4, 4))
    assert videos[0].shape == want.shape == (1, 3, 5, 96, 96)
    assert torch.allclose(videos[0], want, atol=1e-5)


def test_killed_rank_fails_request_then_new_group_works(ray_session, checkpoints, reference):
    import ray

    options = EngineOptions(parallel=ParallelConfig(cfg=1, ulysses=2))
    group = WorkerGroup(DiTWorker, 2, gpus_per_worker=1, timeout_s=120)
    try:
        group.start()
        group.get(group.call("load_model", checkpoints["t2v"], options))
        refs = group.call("denoise", *_long_request(), "job-kill")
        _wait_for_step(group, "job-kill", 1)
        ray.kill(group._actors[1])                          # one worker actor dies mid-request
        start = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"rank 1 \(node .*\) died"):
            group.get(refs[0])
        assert time.monotonic() - start < 30, "no hang: the request fails well before the timeout"
        with pytest.raises(WorkerGroupError, match="rank 1"):
            group.check_health()
    finally:
        group.shutdown()

    # a new group (what Serve does by replacing the replica) serves the next request
    fresh = WorkerGroup(DiTWorker, 2, gpus_per_worker=1, timeout_s=120)
    try:
        fresh.start()
        fresh.get(fresh.call("load_model", checkpoints["t2v"], options))
        out = run_case(fresh, "t2v_odd_tokens")[0]
        assert rel_err(out.latents, reference["t2v_odd_tokens"]) < TOL
        fresh.check_health()
    finally:
        fresh.shutdown()


def test_mismatched_world_size_and_heads_refused(ray_session, checkpoints):
    group = WorkerGroup(DiTWorker, 1, gpus_per_worker=0, timeout_s=60)
    try:
        group.start()
        with pytest.raises(ValueError, match="does not match the group's 1 ranks"):
            group.get(group.call("load_model", checkpoints["t2v"],
                                 EngineOptions(parallel=ParallelConfig(ulysses=2))))
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            group.get(group.call("load_model", checkpoints["t2v"], EngineOptions(device="cuda")))
        with pytest.raises(RuntimeError, match="no model loaded"):
            group.get(group.call("warm_up"))
        group.check_health()
    finally:
        group.shutdown()
