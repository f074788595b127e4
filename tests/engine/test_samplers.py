"""Samplers against diffusers 0.42.1: schedules must be equal, trajectories within 1e-5.

Schedule variants (dynamic shift, pipeline spacings, shift_terminal) against diffusers with the real
release configs: tests/engine/samplers/test_schedules.py; scheduler_config.json defaults:
tests/engine/samplers/test_config.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.samplers import (
    DEFAULT_SAMPLER, SAMPLER_ALIASES, DynamicShift, canonical_sampler, list_samplers, make_sampler,
)

diffusers = pytest.importorskip("diffusers")

torch.set_num_threads(1)

STEPS = (1, 2, 4, 10, 50)
SHIFTS = (1.0, 3.0, 5.0)
SHAPE = (1, 4, 3, 4, 4)   # (B, C, F, H, W) latents
ALL = ("unipc", "euler", "euler_a", "dpmpp_2m")
DETERMINISTIC = ("unipc", "euler", "dpmpp_2m")
SEED = 0

# The Wan2.1 diffusers release's scheduler/scheduler_config.json (flow_shift set per test).
WAN_UNIPC_CONFIG = {
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False,
}


def reference(name: str, shift: float):
    """The diffusers scheduler each sampler reproduces."""
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config({**WAN_UNIPC_CONFIG, "flow_shift": shift})
    if name == "euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    if name == "euler_a":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            algorithm_type="dpmsolver++", solver_order=2,
        )
    raise AssertionError(name)


def new(name: str, steps: int, shift: float, **kwargs):
    """make_sampler with the seed euler_a needs (the others ignore it)."""
    return make_sampler(name, steps, shift, seed=kwargs.pop("seed", SEED), **kwargs)


def fake_velocity(x: torch.Tensor, t: float, seed: int = 1) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for the DiT: v = f(x, t)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(x.shape, generator=g)
    return torch.tanh(x) * (1 + t / 1000) + 0.3 * torch.cos(3 * x + t / 250) + 0.2 * bias


def initial_noise(seed: int = SEED) -> torch.Tensor:
    """The initial latents as denoise draws them: the first draw of the seed's CPU stream."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_ours(sampler, x: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    trajectory = []
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(fake_velocity(x, float(t), seed), i, x)
        trajectory.append(x)
    return trajectory


def run_reference(scheduler, noise_seed: int = SEED) -> list[torch.Tensor]:
    """diffusers' loop; one generator draws the initial latents and then the stochastic noise."""
    generator = torch.Generator().manual_seed(noise_seed)
    x = torch.randn(SHAPE, generator=generator)
    extra = {"generator": generator} if isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler) else {}
    scheduler.set_begin_index(0)   # as the Wan pipelines do
    trajectory = []
    for t in scheduler.timesteps:
        x = scheduler.step(fake_velocity(x, float(t)), t, x, return_dict=False, **extra)[0]
        trajectory.append(x)
    return trajectory


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- registry ---------------------------------------------------------------------------------

def test_registry_lists_canonical_names_default_first():
    assert list_samplers() == ["unipc", "euler", "euler_a", "dpmpp_2m"]
    assert DEFAULT_SAMPLER == "unipc"


@pytest.mark.parametrize("alias, canonical", [
    ("dpmpp2m", "dpmpp_2m"), ("dpmpp_2m", "dpmpp_2m"), ("DPM++ 2M", "dpmpp_2m"), ("dpm++_2m", "dpmpp_2m"),
    ("Euler-A", "euler_a"), ("euler_ancestral", "euler_a"), (" UniPC ", "unipc"), ("EULER", "euler"),
])
def test_canonical_sampler_names(alias, canonical):
    assert canonical_sampler(alias) == canonical


def test_aliases_point_at_registered_samplers():
    assert set(SAMPLER_ALIASES.values()) <= set(list_samplers())
    assert not set(SAMPLER_ALIASES) & set(list_samplers())


def test_alias_builds_the_same_sampler():
    a, b = make_sampler("dpmpp2m", 10, 5.0), make_sampler("dpmpp_2m", 10, 5.0)
    assert a.name == b.name == "dpmpp_2m"
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert torch.equal(run_ours(a, initial_noise())[-1], run_ours(b, initial_noise())[-1])


def test_unknown_sampler_error_lists_names():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'.*unipc, euler, euler_a, dpmpp_2m.*dpmpp2m"):
        make_sampler("ddim", 10, 5.0)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_bad_num_steps_is_named(steps):
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler("unipc", steps, 5.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf"), "5"])
def test_bad_shift_is_named(shift):
    with pytest.raises(ValueError, match="shift"):
        make_sampler("euler", 4, shift)


@pytest.mark.parametrize(
    "timesteps, match",
    [
        ([1000, 750, 500], "num_steps"),                 # length != num_steps (4)
        ([1000, 750, 750, 250], "strictly decreasing"),
        ([250, 500, 750, 1000], "strictly decreasing"),
        ([1001, 750, 500, 250], r"\(0, 1000\]"),
        ([1000, 750, 500, 0], r"\(0, 1000\]"),
    ],
)
def test_bad_fixed_timesteps_are_named(timesteps, match):
    with pytest.raises(ValueError, match=match):
        make_sampler("euler", 4, 5.0, timesteps=timesteps)


# --- schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_schedule_equals_diffusers(name, steps, shift):
    sampler = new(name, steps, shift)
    ref = reference(name, shift)
    ref.set_timesteps(steps)
    assert sampler.timesteps.dtype == torch.float32 and sampler.timesteps.shape == (steps,)
    assert sampler.sigmas.shape == (steps + 1,) and sampler.sigmas[-1] == 0
    assert torch.equal(sampler.timesteps, ref.timesteps.float()), (sampler.timesteps, ref.timesteps)
    assert torch.equal(sampler.sigmas, ref.sigmas.float()), (sampler.sigmas, ref.sigmas)


def test_known_schedule_values():
    # From the notes: FlowMatchEuler (shift 3, 2 steps) -> [1000, 8.9]; UniPC -> [999, 750].
    euler = make_sampler("euler", 2, 3.0)
    assert euler.timesteps[0] == 1000 and abs(float(euler.timesteps[1]) - 8.93) < 0.01
    assert make_sampler("unipc", 2, 3.0).timesteps.tolist() == [999.0, 750.0]


# --- trajectories -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_trajectory_matches_diffusers(name, steps, shift):
    ref = reference(name, shift)
    ref.set_timesteps(steps)
    ours = run_ours(new(name, steps, shift), initial_noise())
    theirs = run_reference(ref)
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert rel_err(a, b) < 1e-5, f"step {i}: rel err {rel_err(a, b):.2e}"


def test_samplers_differ_from_each_other():
    # Guards against a test harness that would pass whatever the update does.
    finals = {n: run_ours(new(n, 10, 5.0), initial_noise())[-1] for n in list_samplers()}
    assert rel_err(finals["unipc"], finals["euler"]) > 1e-3
    assert rel_err(finals["unipc"], finals["dpmpp_2m"]) > 1e-3
    assert rel_err(finals["euler_a"], finals["euler"]) > 1e-2


# --- euler_a: the seeded noise ------------------------------------------------------------------

def test_euler_a_needs_a_seed():
    with pytest.raises(ValueError, match="'euler_a' draws noise at every step and needs a seed"):
        make_sampler("euler_a", 10, 5.0)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match="seed must be an integer in 0..2\\*\\*64-1"):
        make_sampler("euler_a", 10, 5.0, seed=seed)


def test_deterministic_samplers_ignore_the_seed():
    a, b = make_sampler("unipc", 6, 5.0, seed=1), make_sampler("unipc", 6, 5.0, seed=2)
    assert torch.equal(run_ours(a, initial_noise())[-1], run_ours(b, initial_noise())[-1])


def test_euler_a_same_seed_same_result_other_seed_differs():
    run = lambda seed: run_ours(make_sampler("euler_a", 8, 5.0, seed=seed), initial_noise())[-1]
    assert torch.equal(run(3), run(3))
    assert rel_err(run(3), run(4)) > 1e-2


def test_euler_a_noise_order_is_the_documented_one():
    # Draw 0 of the seed's stream is the initial latents (skipped); step i uses draw i + 1; the last
    # step (to sigma 0) draws none and returns the data prediction.
    steps, seed = 4, 11
    sampler = make_sampler("euler_a", steps, 3.0, seed=seed)
    g = torch.Generator("cpu").manual_seed(seed)
    draws = [torch.randn(SHAPE, generator=g, dtype=torch.float32) for _ in range(steps)]
    x = draws[0]
    sigmas = [float(s) for s in sampler.sigmas]
    for i in range(steps):
        v = fake_velocity(x, float(sampler.timesteps[i]))
        x0 = x - sigmas[i] * v
        expected = x0 if i == steps - 1 else (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * draws[i + 1]
        x = sampler.step(v, i, x)
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


def test_euler_a_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run_ours(make_sampler("euler_a", 5, 5.0, seed=1), initial_noise())
    assert torch.equal(torch.get_rng_state(), before)


def test_euler_a_recovers_x0_of_a_straight_flow_at_every_step():
    # Exact velocity: every data prediction is x0, and the last step returns it.
    sampler = make_sampler("euler_a", 6, 5.0, seed=2)
    x0, eps = initial_noise(1), initial_noise(2)
    s0 = float(sampler.sigmas[0])
    x = (1 - s0) * x0 + s0 * eps
    for i in range(6):
        s = float(sampler.sigmas[i])
        v = (x - x0) / s                     # the velocity that points at x0 from here
        x = sampler.step(v, i, x)
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


# --- fixed timesteps (step-distilled models) --------------------------------------------------

def test_fixed_timesteps_schedule():
    sampler = make_sampler("euler", 4, 5.0, timesteps=[1000, 750, 500, 250])
    # sigma = shift(t / 1000): 1, 3.75/4, 2.5/3, 1.25/2
    expected = torch.tensor([1.0, 0.9375, 2.5 / 3, 0.625, 0.0])
    torch.testing.assert_close(sampler.sigmas, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(sampler.timesteps, expected[:-1] * 1000, rtol=0, atol=1e-4)
    unshifted = make_sampler("euler", 4, 1.0, timesteps=[1000, 750, 500, 250])
    assert unshifted.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_fixed_timesteps_euler_matches_diffusers_custom_sigmas(name):
    timesteps = [1000, 750, 500, 250]
    ref = reference(name, 5.0)
    ref.set_timesteps(sigmas=[t / 1000 for t in timesteps])
    sampler = new(name, 4, 5.0, timesteps=timesteps)
    assert torch.equal(sampler.sigmas, ref.sigmas)
    ours = run_ours(sampler, initial_noise())
    theirs = run_reference(ref)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-5


def test_fixed_timesteps_unipc_matches_diffusers_custom_sigmas():
    # diffusers truncates UniPC's timesteps to integers; ours stay 1000 * sigma, so compare the
    # update only (the fake model sees our timesteps in both runs).
    timesteps = [1000, 750, 500, 250]
    ref = diffusers.UniPCMultistepScheduler.from_config({**WAN_UNIPC_CONFIG, "flow_shift": 5.0})
    ref.set_timesteps(sigmas=np.array([t / 1000 for t in timesteps]))
    sampler = make_sampler("unipc", 4, 5.0, timesteps=timesteps)
    torch.testing.assert_close(sampler.sigmas, ref.sigmas, rtol=0, atol=0)
    x, y = initial_noise(), initial_noise()
    ref.set_begin_index(0)
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(fake_velocity(x, float(t)), i, x)
        y = ref.step(fake_velocity(y, float(t)), ref.timesteps[i], y, return_dict=False)[0]
        assert rel_err(x, y) < 1e-5


@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m"])
def test_fixed_timesteps_multistep_first_sigma_below_one(name):
    sampler = make_sampler(name, 4, 5.0, timesteps=[1000, 750, 500, 250])
    assert 1.0 - 2e-6 < float(sampler.sigmas[0]) < 1.0
    final = run_ours(sampler, initial_noise())[-1]
    assert torch.isfinite(final).all()


@pytest.mark.parametrize("option", [
    {"dynamic": DynamicShift(), "image_seq_len": 256},
    {"shift_terminal": 0.1},
    {"spacing": "linear"},
])
def test_fixed_timesteps_refuse_schedule_options(option):
    with pytest.raises(ValueError, match=f"fixed timesteps take no {next(iter(option))}"):
        make_sampler("euler", 4, 5.0, timesteps=[1000, 750, 500, 250], **option)


# --- state, dtype, edge cases -----------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_interleaved_samplers_do_not_interfere(name):
    alone_a = run_ours(new(name, 10, 5.0, seed=5), initial_noise(0), seed=1)[-1]
    alone_b = run_ours(new(name, 10, 3.0, seed=6), initial_noise(7), seed=2)[-1]
    a, b = new(name, 10, 5.0, seed=5), new(name, 10, 3.0, seed=6)
    xa, xb = initial_noise(0), initial_noise(7)
    for i in range(10):
        xa = a.step(fake_velocity(xa, float(a.timesteps[i]), 1), i, xa)
        xb = b.step(fake_velocity(xb, float(b.timesteps[i]), 2), i, xb)
    assert torch.equal(xa, alone_a) and torch.equal(xb, alone_b)


@pytest.mark.parametrize("name", ALL)
def test_bf16_sample_works_and_maths_is_float32(name):
    # bf16 run: sample and model output in bf16, as a bf16 DiT would give them.
    sampler = new(name, 6, 5.0)
    x = initial_noise().bfloat16()
    # float32 run fed the very same (bf16-rounded) values, rounded to bf16 after each step.
    twin = new(name, 6, 5.0)
    y = x.float()
    for i, t in enumerate(sampler.timesteps):
        v = fake_velocity(x.float(), float(t)).bfloat16()
        x = sampler.step(v, i, x)
        y = twin.step(v.float(), i, y).bfloat16().float()
        assert x.dtype == torch.bfloat16
        assert torch.equal(x.float(), y), f"step {i}: bf16 path does not compute in float32"
    assert torch.isfinite(x.float()).all()


@pytest.mark.parametrize("name", ALL)
def test_one_step_returns_the_data_prediction(name):
    sampler = new(name, 1, 5.0)
    assert sampler.timesteps.shape == (1,) and sampler.sigmas.shape == (2,)
    x = initial_noise()
    v = fake_velocity(x, float(sampler.timesteps[0]))
    out = sampler.step(v, 0, x)
    torch.testing.assert_close(out, x - float(sampler.sigmas[0]) * v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_one_step_sampler_denoises_a_straight_flow_exactly(name):
    # For x = (1 - sigma) x0 + sigma eps the true velocity is eps - x0: one step recovers x0.
    sampler = new(name, 1, 3.0)
    x0, eps = initial_noise(1), initial_noise(2)
    sigma = float(sampler.sigmas[0])
    out = sampler.step(eps - x0, 0, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DETERMINISTIC)   # euler_a re-noises: see the euler_a tests
def test_straight_flow_is_followed_at_every_step(name):
    # Exact velocity of a straight path: every sampler must stay on it, x_i = (1 - s_i) x0 + s_i eps.
    sampler = make_sampler(name, 10, 5.0)
    x0, eps = initial_noise(1), initial_noise(2)
    x = eps * float(sampler.sigmas[0]) + x0 * (1 - float(sampler.sigmas[0]))
    for i in range(10):
        x = sampler.step(eps - x0, i, x)
        s = float(sampler.sigmas[i + 1])
        torch.testing.assert_close(x, (1 - s) * x0 + s * eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_steps_must_run_in_order(name):
    sampler = new(name, 4, 5.0)
    x = initial_noise()
    with pytest.raises(ValueError, match="step index must be 0"):
        sampler.step(x, 1, x)
    x = sampler.step(x, 0, x)
    with pytest.raises(ValueError, match="step index must be 1"):
        sampler.step(x, 0, x)


def test_shape_mismatch_is_reported():
    sampler = make_sampler("euler", 4, 5.0)
    with pytest.raises(ValueError, match="shape"):
        sampler.step(torch.zeros(1, 4, 3, 4, 2), 0, initial_noise())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_runs_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu = run_ours(new(name, 10, 5.0), initial_noise())[-1]
    sampler = new(name, 10, 5.0)
    x = initial_noise().cuda()
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(fake_velocity(x.cpu(), float(t)).cuda(), i, x)
    assert x.device.type == "cuda"
    assert rel_err(x.cpu(), cpu) < 1e-5


# --- more edge cases ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps, shift", [(3, 2.5), (40, 12.0), (2, 0.5), (7, 7.0)])
def test_other_shifts_and_step_counts_match_diffusers(name, steps, shift):
    ref = reference(name, shift)
    ref.set_timesteps(steps)
    sampler = new(name, steps, shift)
    assert torch.equal(sampler.timesteps, ref.timesteps.float())
    assert torch.equal(sampler.sigmas, ref.sigmas.float())
    ours = run_ours(sampler, initial_noise())
    theirs = run_reference(ref)
    assert rel_err(ours[-1], theirs[-1]) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_integer_shift_and_steps_one_timestep_fixed(name):
    sampler = new(name, 1, 5, timesteps=[1000])
    assert sampler.sigmas.shape == (2,) and sampler.timesteps.shape == (1,)
    x = initial_noise()
    v = fake_velocity(x, float(sampler.timesteps[0]))
    torch.testing.assert_close(sampler.step(v, 0, x), x - float(sampler.sigmas[0]) * v)


def test_fixed_timesteps_accept_tuples_and_numpy_numbers():
    a = make_sampler("euler", 3, 3.0, timesteps=(900, 600, 300))
    b = make_sampler("euler", 3, 3.0, timesteps=list(np.array([900, 600, 300], dtype=np.int64)))
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps)


@pytest.mark.parametrize("timesteps", [["1000", "500"], [1000, None], [True, False]])
def test_fixed_timesteps_must_be_numbers(timesteps):
    with pytest.raises(ValueError, match="timesteps must be a non-empty list of numbers"):
        make_sampler("euler", len(timesteps), 3.0, timesteps=timesteps)


def test_empty_fixed_timesteps_are_refused():
    with pytest.raises(ValueError, match="len\\(timesteps\\)"):
        make_sampler("euler", 1, 3.0, timesteps=[])


def test_fixed_timesteps_that_collapse_in_float32_are_rejected():
    with pytest.raises(ValueError, match="equal noise levels"):
        make_sampler("euler", 2, 1.0, timesteps=[500.00001, 500.0])


def test_unknown_sampler_of_wrong_type():
    with pytest.raises(ValueError, match="known samplers"):
        make_sampler(["unipc"], 4, 5.0)


@pytest.mark.parametrize("name", ALL)
def test_stepping_past_the_end_is_refused(name):
    sampler = new(name, 2, 5.0)
    x = initial_noise()
    for i in range(2):
        x = sampler.step(fake_velocity(x, float(sampler.timesteps[i])), i, x)
    with pytest.raises(ValueError, match="all steps are done"):
        sampler.step(x, 2, x)


@pytest.mark.parametrize("name", ALL)
def test_step_does_not_modify_its_inputs(name):
    sampler = new(name, 3, 5.0)
    x = initial_noise()
    for i in range(3):
        v = fake_velocity(x, float(sampler.timesteps[i]))
        x_copy, v_copy = x.clone(), v.clone()
        out = sampler.step(v, i, x)
        assert torch.equal(x, x_copy) and torch.equal(v, v_copy)
        assert out.data_ptr() != x.data_ptr()
        x = out
