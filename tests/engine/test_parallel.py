"""CFG-parallel x Ulysses over gloo in plain processes: the latents of world sizes 2 and 4 equal
the world-size-1 latents (T2V, I2V, token counts not divisible by the degree, guidance off)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))  # spawn children import parallel_ranks by name
import parallel_ranks as pr  # noqa: E402

from engine.options import ParallelConfig  # noqa: E402
from engine.parallel import apply_parallel, check_parallel_config  # noqa: E402
from engine.parallel.mesh import ParallelMesh, SubGroup, single_mesh  # noqa: E402

TOL = 1e-4  # relative (max-abs / max-abs); float32 reorderings give ~1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference():
    """World size 1 through the plain predictor, per head count."""
    torch.set_num_threads(1)
    return {heads: {c.name: pr.denoise(lambda m: apply_parallel(m, single_mesh()), c, heads)
                    for c in pr.CASES}
            for heads in (4, 6)}


@pytest.mark.parametrize("cfg,ulysses,heads", [
    (2, 1, 4),   # cfg only
    (1, 2, 4),   # ulysses only
    (2, 2, 4),   # both; guidance off splits over all 4 ranks
    (2, 2, 6),   # both; 6 heads do not divide by 4: guidance off runs redundantly on cfg halves
])
def test_parallel_equals_single(tmp_path, reference, cfg, ulysses, heads):
    world = cfg * ulysses
    mp.spawn(pr.rank_main, args=(world, str(tmp_path / "rdv"), cfg, ulysses, heads, str(tmp_path)),
             nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in pr.CASES:
        ref = reference[heads][case.name]
        for r, got in enumerate(ranks):
            err = rel_err(got[case.name], ref)
            assert err < TOL, f"{case.name} rank {r}: rel err {err:.2e} vs world size 1"
        # every rank ends with bit-identical latents (they run the same sampler on the same velocity)
        for r in range(1, world):
            assert torch.equal(ranks[r][case.name], ranks[0][case.name]), f"{case.name}: rank {r} != rank 0"


def test_reference_is_not_trivial(reference):
    """Guard against a vacuous comparison: different cases and guidance give different latents."""
    ref = reference[4]
    assert rel_err(ref["t2v_odd_tokens"], ref["t2v_guidance_off"]) > 1e-2
    assert torch.isfinite(ref["i2v_odd_tokens"]).all()


def _fake_mesh(cfg: int, ulysses: int) -> ParallelMesh:
    """A mesh object that is never used for communication (apply_parallel refuses first)."""
    config = ParallelConfig(cfg=cfg, ulysses=ulysses)
    return ParallelMesh(config=config, rank=0, device=torch.device("cpu"),
                        cfg=SubGroup(None, cfg, 0), ulysses=SubGroup(None, ulysses, 0),
                        world=SubGroup(None, config.world_size, 0))


def test_heads_not_divisible_is_refused():
    model = pr.build_model("t2v", heads=4)
    with pytest.raises(ValueError, match=r"parallel.ulysses=3 does not divide the model's 4 attention heads.*\[1, 2, 4\]"):
        apply_parallel(model, _fake_mesh(1, 3))
    with pytest.raises(ValueError, match="parallel.ulysses=8"):
        check_parallel_config(model, 8)
    # the model was not modified by the refused call
    assert type(model.sequence).__name__ == "SequenceHooks"


def test_world_size_one_leaves_model_alone():
    from engine.guidance import CFGPredictor

    model = pr.build_model("t2v")
    predictor = apply_parallel(model, single_mesh())
    assert isinstance(predictor, CFGPredictor)
    assert type(model.sequence).__name__ == "SequenceHooks"


def test_module_swaps_self_attention_only():
    """Ulysses wraps each block's self-attention core; cross-attention stays a plain local core;
    the attention backend can still be changed afterwards (the inner core is a child module)."""
    from engine.attention import AttentionCore, set_attention_backend
    from engine.parallel.ulysses import UlyssesAttention, UlyssesSequence

    model = pr.build_model("i2v")
    apply_parallel(model, _fake_mesh(2, 2))
    assert isinstance(model.sequence, UlyssesSequence)
    for block in model.blocks:
        assert isinstance(block.attn1.core, UlyssesAttention)
        assert isinstance(block.attn1.core.inner, AttentionCore)
        assert type(block.attn2.core) is AttentionCore
    set_attention_backend(model, "sdpa")  # reaches the wrapped cores without error
    # no group active: the swapped model computes exactly what the original does
    x = torch.randn(1, 36, 3, 6, 10)
    t, ctx = torch.tensor([500.0]), torch.randn(1, pr.TEXT_LEN, pr.TEXT_DIM)
    img = torch.randn(1, pr.IMG_TOKENS, pr.IMG_DIM)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, img), pr.build_model("i2v")(x, t, ctx, img))


def test_applying_twice_keeps_one_shared_state():
    """A second apply_parallel (e.g. a reloaded mesh) must leave every Ulysses core on the state of
    the new sequence seam; a core on a stale state would attend over its local tokens only."""
    from engine.parallel.ulysses import UlyssesAttention

    model = pr.build_model("t2v")
    apply_parallel(model, _fake_mesh(1, 2))
    predictor = apply_parallel(model, _fake_mesh(2, 2))
    cores = [b.attn1.core for b in model.blocks]
    assert all(isinstance(c, UlyssesAttention) and not isinstance(c.inner, UlyssesAttention) for c in cores)
    assert all(c.state is model.sequence.state is predictor.state for c in cores)
