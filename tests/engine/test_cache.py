"""Feature caching (engine/cache.py): MagCache against diffusers 0.42.1's MagCache hook, TeaCache
against a reference written here from ali-vilab/TeaCache's `teacache_forward` (TeaCache4Wan2.1,
use_ret_steps), both on a tiny Wan DiT with classifier-free guidance (float32, CPU); options,
calibrated defaults and the clean-up of the wrapped blocks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.cache import (FeatureCache, MagCacheConfig, TeaCacheConfig, cache_config, calibration,
                          config_options, nearest_interp, register_calibration)
from engine.denoise import Phase, run_phases
from engine.guidance import CFGPredictor
from engine.models.wan.transformer import WanDiTConfig, WanTransformer
from engine.samplers import make_sampler

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.hooks import MagCacheConfig as DFMagCacheConfig  # noqa: E402
from diffusers.hooks import apply_mag_cache  # noqa: E402

torch.set_num_threads(1)

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
            freq_dim=16, ffn_dim=48, num_layers=3)
STEPS, GUIDANCE, SHIFT = 12, 5.0, 3.0
TOL = 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def make_models(seed: int = 0):
    """diffusers' Wan DiT with every parameter random, and ours with the same weights."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = WanTransformer(WanDiTConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, TINY["in_channels"], 3, 6, 10, generator=g)
    ctx = torch.randn(1, 7, TINY["text_dim"], generator=g)
    neg = torch.randn(1, 7, TINY["text_dim"], generator=g)
    return noise, ctx, neg


class PlainAdapter:
    """T2V without conditioning: the latents are the DiT input."""

    def model_input(self, latents, t, image, dit, dtype):
        return latents.to(dtype), t.reshape(1), None

    def final_latents(self, latents, image):
        return latents


@torch.no_grad()
def run_ours(model, cache: FeatureCache | None, guidance: float = GUIDANCE, batched: bool = False,
             steps: int = STEPS) -> torch.Tensor:
    noise, ctx, neg = make_inputs()
    sampler = make_sampler("euler", steps, SHIFT)
    phases = (Phase("transformer", -math.inf, guidance),)
    negative = neg if guidance > 1 else None
    args = (phases, {"transformer": CFGPredictor(model, batched)}, {"transformer": model}, PlainAdapter(),
            sampler, noise, ctx, negative, None, torch.float32)
    if cache is None:
        return run_phases(*args)
    with cache.applied(model):
        return run_phases(*args, on_step=cache.begin_step)


def _computed_recorder(block: torch.nn.Module, log: list, where: dict) -> None:
    """Record (branch, step) each time `block`'s self-attention really runs."""
    block.attn1.register_forward_hook(lambda *_: log.append((where["branch"], where["step"])))


@torch.no_grad()
def run_diffusers_magcache(ref, config: MagCacheConfig, steps: int = STEPS):
    """diffusers' own loop shape (pipeline_wan: `cache_context("cond")`, then "uncond") with its
    MagCache hook; returns the latents and the (branch, step)s whose blocks ran."""
    apply_mag_cache(ref, DFMagCacheConfig(mag_ratios=list(config.mag_ratios), threshold=config.threshold,
                                          max_skip_steps=config.max_skip_steps,
                                          retention_ratio=config.retention_ratio, num_inference_steps=steps))
    noise, ctx, neg = make_inputs()
    sampler = make_sampler("euler", steps, SHIFT)
    ran, where = [], {}
    _computed_recorder(ref.blocks[1], ran, where)
    x = noise
    for i, t in enumerate(sampler.timesteps):
        where["step"] = i
        where["branch"] = 0
        with ref.cache_context("cond"):
            cond = ref(x, t.reshape(1), ctx, return_dict=False)[0]
        where["branch"] = 1
        with ref.cache_context("uncond"):
            uncond = ref(x, t.reshape(1), neg, return_dict=False)[0]
        x = sampler.step(uncond + GUIDANCE * (cond - uncond), i, x)
    return x, ran


MAG = MagCacheConfig(mag_ratios=(1.0, 1.01, 0.995, 0.99, 0.985, 0.98, 0.97, 0.95), threshold=0.06,
                     max_skip_steps=2, retention_ratio=0.2)


def test_magcache_matches_diffusers_hook():
    ref, ours = make_models()
    expected, ran = run_diffusers_magcache(ref, MAG)
    cache = FeatureCache(MAG, STEPS)
    got = run_ours(ours, cache)
    for branch in (0, 1):
        df_computed = [s for b, s in ran if b == branch]
        assert cache.computed_steps("transformer", branch) == df_computed, branch
        assert set(cache.skipped_steps("transformer", branch)) == set(range(STEPS)) - set(df_computed)
    assert len(cache.skipped_steps()) >= 3          # the comparison is not vacuous
    assert rel_err(got, expected) < TOL
    # deliberate mistake: without the cache (or another retention) the latents differ by far more
    plain = run_ours(ours, None)
    assert rel_err(plain, expected) > 50 * TOL
    other = FeatureCache(MagCacheConfig(**{**config_options(MAG), "retention_ratio": 0.5}), STEPS)
    assert rel_err(run_ours(ours, other), expected) > 10 * TOL


def test_magcache_interpolation_and_float32_accumulators_match_diffusers():
    """50-entry ratios on 9 steps (nearest interpolation): the same decisions as diffusers' for
    several settings."""
    ratios = tuple(float(r) for r in np.linspace(1.02, 0.9, 50))
    for threshold, k, retention in ((0.05, 3, 0.2), (0.2, 1, 0.0), (0.12, 4, 0.3)):
        config = MagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skip_steps=k, retention_ratio=retention)
        ref, ours = make_models()
        _, ran = run_diffusers_magcache(ref, config, steps=9)
        cache = FeatureCache(config, 9)
        run_ours(ours, cache, steps=9)
        assert cache.computed_steps("transformer", 0) == [s for b, s in ran if b == 0], (threshold, k, retention)
    assert nearest_interp(torch.tensor([1.0, 2.0, 3.0]), 1).tolist() == [3.0]
    assert nearest_interp(torch.tensor([1.0, 2.0, 3.0]), 5).tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]  # half to even
    from diffusers.hooks.mag_cache import nearest_interp as df_nearest_interp

    for n, m in ((50, 9), (40, 50), (7, 3), (5, 5)):
        values = torch.arange(n, dtype=torch.float32)
        assert torch.equal(nearest_interp(values, m), df_nearest_interp(values, m)), (n, m)


# ---------------------------------------------------------------------------------------------
# TeaCache: a reference written from ali-vilab/TeaCache's teacache_forward (TeaCache4Wan2.1)


@torch.no_grad()
def teacache_reference(ref, coefficients, threshold, ret_steps, steps: int = STEPS):
    """tcw's algorithm on diffusers' Wan DiT: one forward counter `cnt` over both branches (even =
    conditional, odd = unconditional), `use_ret_steps`: the signal is the timestep projection e0,
    calls cnt < 2 * ret_steps always computed, no cutoff; per parity: acc += poly1d(coefficients)(
    mean|e0 - e0_prev| / mean|e0_prev|), skip while acc < threshold, e0_prev updated every call;
    a skipped call adds the parity's previous residual to the patch tokens, a computed one
    stores (blocks out - blocks in). Returns the latents and the computed (branch, step)s."""
    state = {"cnt": 0, "acc": [0.0, 0.0], "prev": [None, None], "res": [None, None]}
    computed = []

    def forward(x, t, context):
        p_t, p_h, p_w = ref.config.patch_size
        b, _, f, h, w = x.shape
        rotary = ref.rope(x)
        tokens = ref.patch_embedding(x).flatten(2).transpose(1, 2)
        temb, e0, context, _ = ref.condition_embedder(t, context, None)
        e0 = e0.unflatten(1, (6, -1))
        parity, cnt = state["cnt"] % 2, state["cnt"]
        if cnt < 2 * ret_steps:
            calc = True
            state["acc"][parity] = 0.0
        else:
            prev = state["prev"][parity]
            state["acc"][parity] += np.poly1d(coefficients)(((e0 - prev).abs().mean() / prev.abs().mean()).item())
            if state["acc"][parity] < threshold:
                calc = False
            else:
                calc = True
                state["acc"][parity] = 0.0
        state["prev"][parity] = e0.clone()
        if calc:
            computed.append((parity, cnt // 2))
            before = tokens.clone()
            for block in ref.blocks:
                tokens = block(tokens, context, e0, rotary)
            state["res"][parity] = tokens - before
        else:
            tokens = tokens + state["res"][parity]
        shift, scale = (ref.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (ref.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        out = ref.proj_out(tokens).reshape(b, f // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1)
        state["cnt"] += 1
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    noise, ctx, neg = make_inputs()
    sampler = make_sampler("euler", steps, SHIFT)
    x = noise
    for i, t in enumerate(sampler.timesteps):
        cond, uncond = forward(x, t.reshape(1), ctx), forward(x, t.reshape(1), neg)
        x = sampler.step(uncond + GUIDANCE * (cond - uncond), i, x)
    return x, computed


TEA = TeaCacheConfig(coefficients=(0.5, 0.5, 0.0), threshold=1.5, ret_steps=2)


def test_teacache_reference_is_diffusers_without_skipping():
    """The reference itself: with a threshold of 0 nothing is skipped and it equals diffusers' forward."""
    ref, ours = make_models()
    expected, computed = teacache_reference(ref, [1.0, 0.0], 0.0, 2)
    assert len(computed) == 2 * STEPS
    assert rel_err(run_ours(ours, None), expected) < 1e-5


def test_teacache_matches_reference():
    ref, ours = make_models()
    expected, computed = teacache_reference(ref, list(TEA.coefficients), TEA.threshold, TEA.ret_steps)
    cache = FeatureCache(TEA, STEPS)
    got = run_ours(ours, cache)
    for branch in (0, 1):
        assert cache.computed_steps("transformer", branch) == [s for b, s in computed if b == branch]
    skipped = cache.skipped_steps()
    assert 2 <= len(skipped) <= STEPS - 4, skipped       # not vacuous: some skipped, some computed
    assert min(skipped) >= TEA.ret_steps
    assert rel_err(got, expected) < TOL
    assert rel_err(run_ours(ours, None), expected) > 50 * TOL
    # deliberate mistake: another threshold skips other steps and gives other latents
    other = FeatureCache(TeaCacheConfig(TEA.coefficients, 0.8, TEA.ret_steps), STEPS)
    assert rel_err(run_ours(ours, other), expected) > 10 * TOL


def test_batched_branches_take_the_same_decisions():
    """cfg_batch: one batch-2 forward per step is one cache branch: same skips, same latents."""
    _, ours = make_models()
    for config in (MAG, TEA):
        two = FeatureCache(config, STEPS)
        one = FeatureCache(config, STEPS)
        a, b = run_ours(ours, two), run_ours(ours, one, batched=True)
        assert one.skipped_steps() == two.skipped_steps() == two.skipped_steps(branch=1)
        assert rel_err(b, a) < 1e-4


def test_guidance_off_is_one_branch():
    _, ours = make_models()
    cache = FeatureCache(MAG, STEPS)
    run_ours(ours, cache, guidance=1.0)
    assert cache.skipped_steps() and not cache.computed_steps(branch=1)


def test_blocks_restored_after_the_request_even_on_error():
    _, ours = make_models()
    blocks = list(ours.blocks)
    cache = FeatureCache(MAG, STEPS)
    with pytest.raises(RuntimeError, match="no step begun"):
        with cache.applied(ours):
            assert type(ours.blocks[0]).__name__ == "_CachedBlock"
            ours(*[torch.zeros(1, 4, 1, 2, 2), torch.tensor([1.0]), torch.zeros(1, 7, 24)])
    assert list(ours.blocks) == blocks
    assert all(type(b).__name__ == "WanBlock" for b in ours.blocks)
    assert not any("block.block" in k for k in ours.state_dict())


# ---------------------------------------------------------------------------------------------
# Options


def test_cache_config_defaults_and_errors():
    register_calibration("test-model", "magcache", {"mag_ratios": [1.0, 0.99], "threshold": 0.1})
    config = cache_config("magcache", {"max_skip_steps": 5}, "test-model")
    assert config == MagCacheConfig(mag_ratios=(1.0, 0.99), threshold=0.1, max_skip_steps=5)
    assert calibration("test-model", "magcache")["threshold"] == 0.1
    assert cache_config("none", None, "test-model") is None and cache_config(None, {}, "x") is None
    with pytest.raises(ValueError, match="cache_options.mag_ratios: required.*no calibrated default"):
        cache_config("magcache", {}, "unknown-model")
    with pytest.raises(ValueError, match=r"unknown option\(s\) thresh for magcache; allowed: mag_ratios, threshold"):
        cache_config("magcache", {"thresh": 0.1}, "test-model")
    with pytest.raises(ValueError, match="cache_options.threshold must be a number >= 0"):
        cache_config("teacache", {"coefficients": [1, 0], "threshold": -1}, "test-model")
    with pytest.raises(ValueError, match="cache_options.max_skip_steps must be an integer >= 0"):
        cache_config("magcache", {"max_skip_steps": 1.5}, "test-model")
    with pytest.raises(ValueError, match="cache_options.mag_ratios must be a list of positive"):
        cache_config("magcache", {"mag_ratios": [1.0, float("nan")]}, "test-model")
    with pytest.raises(ValueError, match="cache must be one of none, teacache, magcache"):
        cache_config("fastcache", None, "test-model")
    with pytest.raises(ValueError, match="cache_options is given but cache is 'none'"):
        cache_config("none", {"threshold": 0.1}, "test-model")


def test_wan_calibrations_are_registered():
    from engine.registry import get_spec

    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"):
        get_spec(name)
        mag = cache_config("magcache", None, name)
        tea = cache_config("teacache", None, name)
        assert len(mag.mag_ratios) in (40, 50) and mag.mag_ratios[0] == 1.0 and mag.retention_ratio == 0.2
        assert len(tea.coefficients) == 5 and tea.ret_steps == 5
    assert cache_config("magcache", None, "wan2.1-t2v-14b").max_skip_steps == 6
    assert cache_config("magcache", None, "wan2.1-t2v-1.3b").threshold == 0.12
    assert cache_config("teacache", None, "wan2.1-t2v-14b").coefficients[0] == -3.03318725e5
