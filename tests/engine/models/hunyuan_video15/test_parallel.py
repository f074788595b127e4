"""HunyuanVideo-1.5's DiT under CFG-parallel x Ulysses over gloo (plain processes, CPU): the guided
velocity of world size 4 (cfg 2 x ulysses 2) and 2 (ulysses 2) equals world size 1. The blocks'
one sequence [video; context] is split across the Ulysses ranks: cases where the split falls inside
the context, where a rank holds context tokens only, where the branches' contexts differ in length,
without glyph or image tokens, and with guidance off (the whole world splits one branch) on a
MeanFlow DiT (timestep pairs)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import hv15_ranks by name
import hv15_ranks as hr  # noqa: E402

from engine.parallel import apply_parallel, check_heads  # noqa: E402
from engine.parallel.mesh import single_mesh  # noqa: E402

TOL = 1e-4  # relative (max-abs / max-abs); float32 reorderings give ~1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return {case.name: hr.predict(lambda m: apply_parallel(m, single_mesh()), case) for case in hr.CASES}


def test_reference_is_not_trivial(reference):
    """Guidance and the context move the velocity far beyond TOL (a rank that lost its share of
    the context, or attended without it, would fail)."""
    case = hr.CASES[0]
    model = hr.build_model(False)
    x, t, context, negative, scale, image = hr.case_inputs(case, model)
    with torch.no_grad():
        unguided = model(x, t, context, image)
        no_text = model(x, t, type(context)(context.text[:, :1], context.glyph), image)
    assert rel_err(unguided, reference[case.name]) > 100 * TOL
    assert rel_err(no_text, unguided) > 100 * TOL
    assert all(torch.isfinite(v).all() for v in reference.values())


def test_real_heads_allow_these_degrees():
    """16 heads: Ulysses degrees 1, 2, 4, 8, 16 (times cfg 2: up to 32 GPUs); 3 is refused."""
    for degree in (1, 2, 4, 8, 16):
        check_heads(16, degree, "parallel.ulysses")
    with pytest.raises(ValueError, match="allowed degrees: \\[1, 2, 4, 8, 16\\]"):
        check_heads(16, 3, "parallel.ulysses")


@pytest.mark.parametrize("cfg,ulysses", [(2, 2), (1, 2)])
def test_parallel_equals_single(tmp_path, reference, cfg, ulysses):
    world = cfg * ulysses
    mp.spawn(hr.rank_main, args=(world, str(tmp_path / "rdv"), cfg, ulysses, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in hr.CASES:
        ref = reference[case.name]
        for r, got in enumerate(ranks):
            err = rel_err(got[case.name], ref)
            assert err < TOL, f"{case.name} rank {r}: rel err {err:.2e} vs world size 1"
        for r in range(1, world):
            assert torch.equal(ranks[r][case.name], ranks[0][case.name]), f"{case.name}: rank {r} != rank 0"
