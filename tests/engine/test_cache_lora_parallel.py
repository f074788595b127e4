"""TeaCache, MagCache and a request's LoRA under CFG-parallel x Ulysses (cfg 2 x ulysses 2, gloo,
CPU): every rank takes the single process's skip decisions and ends with its latents."""
from __future__ import annotations

import os
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import the helpers by name
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models", "wan"))  # wan22_ranks
import cache_lora_ranks as cr  # noqa: E402

from engine.parallel.mesh import single_mesh  # noqa: E402

TOL = 1e-4


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_cfg2_ulysses2_equals_single(tmp_path):
    torch.set_num_threads(1)
    single = cr.run_all(single_mesh(), None, str(tmp_path))
    # the runs are not vacuous: the caches skip, the LoRA changes the result
    for name in ("magcache", "teacache", "teacache_guidance_off", "lora_magcache"):
        skipped, computed = single[name][1]
        assert 1 <= len(skipped) and len(computed) >= 3, (name, skipped)
    assert rel_err(single["lora"][0], single["magcache"][0]) > 1e-2
    assert rel_err(single["magcache"][0], single["teacache"][0]) > 1e-3

    mp.spawn(cr.rank_main, args=(4, str(tmp_path / "rdv"), 2, 2, str(tmp_path)), nprocs=4, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for name, (latents, steps) in single.items():
        for r, got in enumerate(ranks):
            assert got[name][1] == steps, f"{name} rank {r}: skipped/computed {got[name][1]} vs {steps}"
            assert rel_err(got[name][0], latents) < TOL, f"{name} rank {r}"


def test_teacache_per_token_signal_agrees_over_ulysses(tmp_path):
    """Per-token modulation (Wan2.2 TI2V) is split over the Ulysses ranks: the all-reduced relative
    change gives every rank the single process's decisions (cfg 2 x ulysses 2)."""
    torch.set_num_threads(1)
    x, skipped, computed = cr.per_token_teacache(single_mesh(), None)
    assert skipped and len(computed) >= 3
    mp.spawn(cr.per_token_rank_main, args=(4, str(tmp_path / "rdv"), 2, 2, str(tmp_path)), nprocs=4, join=True)
    for r in range(4):
        got, got_skipped, got_computed = torch.load(tmp_path / f"pt{r}.pt")
        assert (got_skipped, got_computed) == (skipped, computed), r
        assert rel_err(got, x) < TOL, r
