"""On real GPUs (NCCL): the DiT group gives the in-process latents for every cfg x ulysses layout
that fits the machine's GPU count. Skipped without CUDA; run on the GPU machine with
`pytest -m gpu tests/cluster/test_gpu_group.py` (in its own session: it starts Ray with the real
GPU count, so it cannot share the CPU suite's Ray instance with 8 faked GPUs)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.ray]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "engine"))
import parallel_ranks as pr  # noqa: E402

from cluster.dit_worker import DiTWorker  # noqa: E402
from cluster.worker_group import WorkerGroup  # noqa: E402
from engine.options import EngineOptions, ParallelConfig  # noqa: E402

TOL = 1e-3  # float32 on GPU (TF32 convolutions, different reduction orders)


@pytest.fixture(scope="module")
def real_gpu_ray():
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already runs with faked GPUs in this session; run GPU tests on their own")
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return pr.write_checkpoint(str(tmp_path_factory.mktemp("gpu_ckpt") / "t2v"), "t2v")


@pytest.mark.parametrize("cfg,ulysses", [(1, 1), (2, 1), (1, 2), (2, 2), (2, 4)])
def test_nccl_group_equals_single_gpu(real_gpu_ray, checkpoint, cfg, ulysses):
    from engine.checkpoint import resolve_checkpoint
    from stages.denoise import DenoiseStage

    world = cfg * ulysses
    if world > torch.cuda.device_count():
        pytest.skip(f"needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    options = EngineOptions(device="cuda", dtype="float32", parallel=ParallelConfig(cfg=cfg, ulysses=ulysses))
    case = pr.CASES[0]
    request, text, image = pr.case_inputs(case)
    ckpt = resolve_checkpoint(checkpoint)
    single = EngineOptions(device="cuda", dtype="float32")
    stage = DenoiseStage.from_checkpoint(ckpt, single)
    want = stage(request, text, image).latents

    group = WorkerGroup(DiTWorker, world, gpus_per_worker=1, timeout_s=300)
    try:
        group.start()
        assert group.backend == "nccl"
        group.get(group.call("load_model", checkpoint, options))
        got = group.get(group.call("denoise", request, text, image, "gpu-job"))[0].latents
    finally:
        group.shutdown()
    err = float((got - want).abs().max() / want.abs().max())
    assert err < TOL, err
