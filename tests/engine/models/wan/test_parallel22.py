"""Wan2.2-shaped DiTs under CFG-parallel x Ulysses over gloo (plain processes, CPU): with per-token
timesteps (TI2V image-to-video: frame 0's tokens at t = 0) the guided velocity of world sizes 2
(ulysses 2) and 4 (cfg 2 x ulysses 2) equals world size 1; token counts not divisible by the
degree, guidance off (the world splits one branch), and the A14B I2V shape (36 channels in)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import wan22_ranks by name
import wan22_ranks as wr  # noqa: E402

from engine.parallel import apply_parallel  # noqa: E402
from engine.parallel.mesh import single_mesh  # noqa: E402

TOL = 1e-4  # relative (max-abs / max-abs); float32 reorderings give ~1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference():
    """World size 1 through the plain predictor."""
    torch.set_num_threads(1)
    return {case.name: wr.predict(lambda m: apply_parallel(m, single_mesh()), case) for case in wr.CASES}


def test_reference_is_not_trivial(reference):
    """The per-token cases differ from the same latents at one timestep far beyond TOL, so a
    parallel run that lost the per-token modulation (or put it on the wrong tokens) would fail."""
    case = wr.CASES[0]
    model = wr.build_model(case.arch)
    x, t, context, negative, scale = wr.case_inputs(case, model)
    predictor = apply_parallel(model, single_mesh())
    with torch.no_grad():
        at_t = predictor(x, t.amax().reshape(1), context, negative, scale, None)
    assert t.shape == (1, 45) and (t[:, :15] == 0).all()
    assert rel_err(at_t, reference[case.name]) > 100 * TOL
    assert all(torch.isfinite(v).all() for v in reference.values())


@pytest.mark.parametrize("cfg,ulysses", [(1, 2), (2, 2)])
def test_parallel_equals_single_with_per_token_timesteps(tmp_path, reference, cfg, ulysses):
    world = cfg * ulysses
    mp.spawn(wr.rank_main, args=(world, str(tmp_path / "rdv"), cfg, ulysses, str(tmp_path)),
             nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in wr.CASES:
        ref = reference[case.name]
        for r, got in enumerate(ranks):
            err = rel_err(got[case.name], ref)
            assert err < TOL, f"{case.name} rank {r}: rel err {err:.2e} vs world size 1"
        for r in range(1, world):  # every rank ends with the same velocity
            assert torch.equal(ranks[r][case.name], ranks[0][case.name]), f"{case.name}: rank {r} != rank 0"
