"""Every sampler x schedule against diffusers 0.42.1 (float32, CPU): timesteps and sigmas equal,
trajectories within 1e-5, over the real Wan2.1 / Wan2.2 / Qwen-Image / HunyuanVideo-1.5 configs.

Schedules: the static shift on the scheduler's grid (Wan), the dynamic shift with the Qwen-Image
pipeline's sigmas and shift_terminal, HunyuanVideo-1.5's sigmas, the dynamic shift on the scheduler's
grid, the linear time shift, shift_terminal alone. Where diffusers' DPMSolverMultistepScheduler cannot
build a schedule (it takes no sigmas and no shift_terminal), our schedule is checked against its
definition and stepped through diffusers' DPM update with the same sigmas.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from engine.samplers import DynamicShift, make_sampler
from engine.samplers.config import scheduler_defaults

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.hunyuan_video1_5 import pipeline_hunyuan_video1_5 as hv15_pipeline  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage as qwen_pipeline  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from sampler_release_configs import (  # noqa: E402
    QWEN_IMAGE_FLOW_MATCH, RELEASES, WAN21_UNIPC, WAN22_A14B_UNIPC,
)

torch.set_num_threads(1)

SHAPE = (1, 4, 3, 4, 4)
SEED = 0
ALL = ("unipc", "euler", "euler_a", "dpmpp_2m")
QWEN_DYNAMIC = DynamicShift(base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192)


# --- harness ------------------------------------------------------------------------------------

def fake_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for the DiT."""
    bias = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return torch.tanh(x) * (1 + t / 1000) + 0.3 * torch.cos(3 * x + t / 250) + 0.2 * bias


def run_ours(sampler, seed: int = SEED) -> list[torch.Tensor]:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))   # denoise's initial noise
    out = []
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(fake_velocity(x, float(t)), i, x)
        out.append(x)
    return out


def run_reference(scheduler, timesteps_for_model: torch.Tensor | None = None, seed: int = SEED):
    """diffusers' denoising loop; one generator draws the latents, then any stochastic noise.

    timesteps_for_model: what the fake DiT is shown (default: the scheduler's own timesteps).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator)
    extra = {"generator": generator} if isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler) else {}
    shown = scheduler.timesteps if timesteps_for_model is None else timesteps_for_model
    scheduler.set_begin_index(0)
    out = []
    for t, t_model in zip(scheduler.timesteps, shown):
        x = scheduler.step(fake_velocity(x, float(t_model)), t, x, return_dict=False, **extra)[0]
        out.append(x)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_same_run(sampler, reference, *, exact_schedule: bool = True) -> None:
    if exact_schedule:
        assert torch.equal(sampler.timesteps, reference.timesteps.float()), (sampler.timesteps, reference.timesteps)
        assert torch.equal(sampler.sigmas, reference.sigmas.float()), (sampler.sigmas, reference.sigmas)
    ours, theirs = run_ours(sampler), run_reference(reference)
    assert len(ours) == len(theirs) == sampler.timesteps.shape[0]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert rel_err(a, b) < 1e-5, f"step {i}: rel err {rel_err(a, b):.2e}"


def unipc(**config):
    return diffusers.UniPCMultistepScheduler.from_config({**WAN21_UNIPC, **config})


def flow_match(stochastic: bool, **config):
    return diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic, **config)


def dpm(**config):
    return diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 algorithm_type="dpmsolver++", solver_order=2, **config)


def dpm_with_sigmas(sampler, steps: int):
    """diffusers' DPM update on our sigmas (for schedules its set_timesteps cannot build)."""
    ref = dpm(flow_shift=1.0)
    ref.set_timesteps(steps)
    ref.sigmas = sampler.sigmas.clone()
    ref.timesteps = sampler.timesteps.to(torch.int64)
    return ref


# --- the releases, as diffusers' pipelines run them ------------------------------------------

def pipeline_reference(config: dict, pipeline: str, steps: int, image_seq_len: int):
    """The scheduler from the release config, its timesteps set exactly as `pipeline` sets them."""
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    if pipeline.startswith("Wan"):
        scheduler.set_timesteps(steps, device="cpu")                          # pipeline_wan.py
    elif pipeline.startswith("QwenImage"):
        sigmas = np.linspace(1.0, 1 / steps, steps)                           # pipeline_qwenimage.py
        mu = qwen_pipeline.calculate_shift(
            image_seq_len, scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15))
        qwen_pipeline.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    elif pipeline.startswith("HunyuanVideo15"):
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]                        # pipeline_hunyuan_video1_5.py
        hv15_pipeline.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas)
    else:
        raise AssertionError(pipeline)
    return scheduler


@pytest.mark.parametrize("release, config, pipeline, expected", RELEASES, ids=[r[0] for r in RELEASES])
@pytest.mark.parametrize("steps", [2, 4, 10, 40])
def test_release_defaults_sample_as_the_diffusers_pipeline(release, config, pipeline, expected, steps):
    # image_seq_len: Qwen-Image 1328x1328 -> (1328/16)^2 = 6889 tokens; the others ignore it.
    image_seq_len = 6889
    defaults = scheduler_defaults(config, pipeline)
    sampler = make_sampler(defaults.sampler, steps, defaults.shift, **defaults.schedule_kwargs(),
                           image_seq_len=image_seq_len, seed=SEED)
    assert_same_run(sampler, pipeline_reference(config, pipeline, steps, image_seq_len))


@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096, 8192, 16384])   # below, at and past the ends
def test_qwen_image_mu_at_any_resolution(image_seq_len):
    defaults = scheduler_defaults(QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline")
    assert defaults.dynamic.mu(image_seq_len) == qwen_pipeline.calculate_shift(image_seq_len, 256, 8192, 0.5, 0.9)
    sampler = make_sampler("euler", 8, defaults.shift, **defaults.schedule_kwargs(), image_seq_len=image_seq_len)
    assert_same_run(sampler, pipeline_reference(QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline", 8, image_seq_len))


def test_qwen_image_one_step_is_refused_where_diffusers_gives_nan():
    # One sigma of 1: the terminal stretch divides 0 by 0.
    ref = pipeline_reference(QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline", 1, 4096)
    assert torch.isnan(ref.sigmas[0])
    defaults = scheduler_defaults(QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline")
    with pytest.raises(ValueError, match="unusable schedule"):
        make_sampler("euler", 1, defaults.shift, **defaults.schedule_kwargs(), image_seq_len=4096)


# --- every sampler x schedule ---------------------------------------------------------------------

SCHEDULES = {
    # name: (make_sampler kwargs, shift)
    "static": (dict(), 3.0),
    "static_terminal": (dict(shift_terminal=0.1), 3.0),
    "hunyuan15": (dict(spacing="linear_to_zero"), 5.0),
    "qwen_image": (dict(spacing="linear", dynamic=QWEN_DYNAMIC, shift_terminal=0.02, image_seq_len=4096), 1.0),
    "dynamic_grid": (dict(dynamic=QWEN_DYNAMIC, image_seq_len=4096), 1.0),
    "dynamic_linear": (dict(spacing="linear", image_seq_len=1000,
                            dynamic=DynamicShift(base_shift=2.0, max_shift=6.0, time_shift_type="linear")), 1.0),
}


def diffusers_reference(name: str, schedule: str, steps: int):
    """The diffusers scheduler and set_timesteps call for (sampler, schedule), or None when diffusers'
    scheduler for this sampler cannot build the schedule."""
    kwargs, shift = SCHEDULES[schedule]
    dynamic, terminal, spacing = kwargs.get("dynamic"), kwargs.get("shift_terminal"), kwargs.get("spacing")
    seq_len = kwargs.get("image_seq_len")
    mu = None if dynamic is None else dynamic.mu(seq_len)
    sigmas = None
    if spacing == "linear":
        sigmas = np.linspace(1.0, 1 / steps, steps)
    elif spacing == "linear_to_zero":
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
    dyn = {} if dynamic is None else {"use_dynamic_shifting": True, "time_shift_type": dynamic.time_shift_type}

    if name in ("euler", "euler_a"):
        ref = flow_match(name == "euler_a", shift=shift, shift_terminal=terminal, **dyn)
    elif name == "unipc":
        ref = unipc(flow_shift=shift, shift_terminal=terminal, **dyn)
    else:
        if sigmas is not None or terminal is not None:
            return None
        ref = dpm(flow_shift=shift, **dyn)
    if sigmas is not None:
        ref.set_timesteps(sigmas=sigmas, mu=mu)
    else:
        ref.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    return ref


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", [3, 12])
def test_sampler_and_schedule_match_diffusers(name, schedule, steps):
    kwargs, shift = SCHEDULES[schedule]
    sampler = make_sampler(name, steps, shift, seed=SEED, **kwargs)
    ref = diffusers_reference(name, schedule, steps)
    if ref is not None:
        assert_same_run(sampler, ref)
        return
    # DPM++ 2M on a schedule DPMSolverMultistepScheduler cannot build: our sigmas follow the rule
    # documented in dpmpp2m.py, and diffusers' DPM update runs on them.
    if kwargs.get("spacing") is not None:        # a pipeline spacing: built exactly as UniPC builds it
        twin = make_sampler("unipc", steps, shift, **kwargs)
        assert torch.equal(sampler.sigmas, twin.sigmas) and torch.equal(sampler.timesteps, twin.timesteps)
    else:                                        # shift_terminal: DPM's own sigmas, stretched
        native = dpm(flow_shift=shift)
        native.set_timesteps(steps)
        own = native.sigmas[:-1].double()
        one_minus = 1 - own
        stretched = 1 - one_minus / (one_minus[-1] / (1 - kwargs["shift_terminal"]))
        torch.testing.assert_close(sampler.sigmas[:-1].double(), stretched, rtol=0, atol=1e-7)
        assert float(sampler.sigmas[-2]) == pytest.approx(kwargs["shift_terminal"], abs=1e-7)
    assert_same_run(sampler, dpm_with_sigmas(sampler, steps), exact_schedule=False)


def test_fixed_timesteps_dpm_update_matches_diffusers():
    # The fixed (step-distill) schedule through diffusers' DPM update (which takes no custom sigmas);
    # unipc / euler: tests/engine/test_samplers.py compares them with diffusers' sigmas= argument.
    sampler = make_sampler("dpmpp_2m", 4, 5.0, timesteps=[1000, 750, 500, 250])
    ref = dpm_with_sigmas(sampler, 4)
    ours, theirs = run_ours(sampler), run_reference(ref, timesteps_for_model=sampler.timesteps)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-5


# --- the settings matter (a harness that ignored them would pass the tests above) ------------

def final(name: str, shift: float = 1.0, **kwargs) -> torch.Tensor:
    return run_ours(make_sampler(name, 10, shift, seed=SEED, **kwargs))[-1]


@pytest.mark.parametrize("name", ALL)
def test_each_schedule_setting_changes_the_result(name):
    qwen = dict(spacing="linear", dynamic=QWEN_DYNAMIC, shift_terminal=0.02, image_seq_len=4096)
    base = final(name, **qwen)
    assert rel_err(final(name, **{**qwen, "image_seq_len": 256}), base) > 1e-3        # mu
    assert rel_err(final(name, **{**qwen, "shift_terminal": None}), base) > 1e-3      # the stretch
    # The sigmas passed: for UniPC / DPM the scheduler's grid is close to the pipeline's (ends 0.001
    # apart), so compare the schedules (the parity tests above require them bit-equal).
    grid = make_sampler(name, 10, 1.0, seed=SEED, **{**qwen, "spacing": "scheduler"})
    assert (grid.sigmas - make_sampler(name, 10, 1.0, seed=SEED, **qwen).sigmas).abs().max() > 1e-5
    assert rel_err(final(name, **{**qwen, "dynamic": None}), base) > 1e-3             # static shift 1
    linear = DynamicShift(base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                          time_shift_type="linear")
    assert rel_err(final(name, **{**qwen, "dynamic": linear}), base) > 1e-3            # time shift type


def test_hunyuan15_sigmas_differ_from_the_euler_grid():
    # FlowMatchEuler's own grid shifts twice; the pipeline's sigmas are shifted once.
    grid = make_sampler("euler", 10, 5.0)
    passed = make_sampler("euler", 10, 5.0, spacing="linear_to_zero")
    assert grid.timesteps[0] == passed.timesteps[0] == 1000
    assert abs(float(grid.timesteps[-1] - passed.timesteps[-1])) > 10


def test_the_two_pipeline_spacings_agree_in_float32_for_euler():
    # FlowMatchEuler casts the passed sigmas to float32 first: Qwen's and HunyuanVideo-1.5's
    # linspace give the same schedule there (not for UniPC, which keeps float64).
    for steps in (3, 7, 30, 50):
        a = make_sampler("euler", steps, 5.0, spacing="linear")
        b = make_sampler("euler", steps, 5.0, spacing="linear_to_zero")
        assert torch.equal(a.sigmas, b.sigmas)


# --- Wan2.2 A14B: the expert boundary is hit exactly -----------------------------------------

@pytest.mark.parametrize("steps, hits", [(10, [875]), (20, [875, 900]), (40, [875, 900]), (50, [875])])
def test_unipc_shift_3_hits_the_expert_boundaries_exactly(steps, hits):
    # Wan2.2 A14B: boundary_ratio 0.875 (T2V) / 0.9 (I2V) x 1000; t >= boundary -> high-noise expert.
    defaults = scheduler_defaults(WAN22_A14B_UNIPC, "WanPipeline")
    assert (defaults.sampler, defaults.shift) == ("unipc", 3.0)
    sampler = make_sampler(defaults.sampler, steps, defaults.shift, **defaults.schedule_kwargs())
    ref = pipeline_reference(WAN22_A14B_UNIPC, "WanPipeline", steps, 0)
    assert torch.equal(sampler.timesteps, ref.timesteps.float())
    timesteps = sampler.timesteps.tolist()
    for boundary in (875.0, 900.0):
        assert (boundary in timesteps) == (int(boundary) in hits)
    for boundary in hits:   # the equal timestep goes to the high-noise expert in both
        ours = [t >= boundary for t in timesteps]
        theirs = [bool(t >= boundary) for t in ref.timesteps]
        assert ours == theirs and ours.count(True) == timesteps.index(float(boundary)) + 1


def test_unipc_ten_steps_shift_3_known_timesteps():
    # ../shared/notes/wan22.md: flow_shift 3, 10 steps -> 999 964 923 875 ...
    assert make_sampler("unipc", 10, 3.0).timesteps.tolist()[:4] == [999.0, 964.0, 923.0, 875.0]


# --- make_sampler's schedule arguments -----------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(dynamic=QWEN_DYNAMIC), "image_seq_len is required"),
    (dict(dynamic=QWEN_DYNAMIC, image_seq_len=0), "image_seq_len must be an integer >= 1"),
    (dict(image_seq_len=12.5), "image_seq_len must be an integer >= 1"),
    (dict(dynamic={"base_shift": 0.5}, image_seq_len=16), "dynamic must be a DynamicShift"),
    (dict(shift_terminal=1.0), r"shift_terminal must be a number in \(0, 1\)"),
    (dict(shift_terminal=0.0), r"shift_terminal must be a number in \(0, 1\)"),
    (dict(shift_terminal=True), r"shift_terminal must be a number in \(0, 1\)"),
    (dict(spacing="karras"), "spacing must be one of scheduler, linear, linear_to_zero"),
])
def test_bad_schedule_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler("euler", 4, 3.0, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_shift=float("nan")), "base_shift must be a finite number"),
    (dict(max_shift=None), "max_shift must be a finite number"),
    (dict(base_image_seq_len=0), "base_image_seq_len must be an integer >= 1"),
    (dict(max_image_seq_len=256), "max_image_seq_len must differ"),
    (dict(time_shift_type="cosine"), "time_shift_type must be one of exponential, linear"),
])
def test_bad_dynamic_shift_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicShift(**kwargs)


def test_image_seq_len_without_dynamic_is_ignored():
    a = make_sampler("unipc", 6, 3.0)
    b = make_sampler("unipc", 6, 3.0, image_seq_len=4096)
    assert torch.equal(a.sigmas, b.sigmas)


def test_dynamic_shift_ignores_the_static_shift():
    a = make_sampler("euler", 6, 1.0, dynamic=QWEN_DYNAMIC, image_seq_len=4096)
    b = make_sampler("euler", 6, 7.0, dynamic=QWEN_DYNAMIC, image_seq_len=4096)
    assert torch.equal(a.sigmas, b.sigmas)
