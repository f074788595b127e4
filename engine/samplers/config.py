"""Sampling defaults from a diffusers checkpoint's scheduler config, as diffusers' pipelines use it.

A diffusers-layout checkpoint ships `scheduler/scheduler_config.json`; the pipeline that loads it
(named by `_class_name` in model_index.json) decides which sigmas it hands the scheduler and whether
it computes a resolution-dependent `mu`. Together they fix the sampler, the shift and the schedule:

    defaults = checkpoint_scheduler_defaults(checkpoint_dir)       # or scheduler_defaults(config, pipeline)
    sampler = make_sampler(defaults.sampler, steps, defaults.shift, **defaults.schedule_kwargs(),
                           image_seq_len=num_image_tokens, seed=seed)

Supported schedulers, with the options we implement (diffusers 0.42.1 names):

    UniPCMultistepScheduler        -> "unipc": prediction_type "flow_prediction", use_flow_sigmas,
        flow_shift, solver_order 2, solver_type "bh2", predict_x0, lower_order_final, no
        disable_corrector / solver_p / thresholding, final_sigmas_type "zero", use_dynamic_shifting
        (time_shift_type exponential|linear), shift_terminal.  (Wan2.1 / Wan2.2 diffusers releases.)
    FlowMatchEulerDiscreteScheduler -> "euler", or "euler_a" with stochastic_sampling: shift,
        use_dynamic_shifting with base/max_shift and base/max_image_seq_len, time_shift_type,
        shift_terminal; no invert_sigmas.  (Qwen-Image, HunyuanVideo-1.5.)
    DPMSolverMultistepScheduler    -> "dpmpp_2m": flow sigmas, algorithm_type "dpmsolver++",
        solver_order 2, solver_type "midpoint", final_sigmas_type "zero", use_dynamic_shifting
        (exponential only, as diffusers).  (No Wan release ships it; users swap it in.)

In all three, use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (and DPM's use_lu_lambdas)
must be false and num_train_timesteps 1000. Any other value of an implemented option, an option
diffusers 0.42.1 does not have, or another `_class_name` raises ValueError naming the option and its
value: the sampler never silently samples differently from diffusers. Options that do not change
flow-matching sampling (the beta schedule, which only non-flow sigmas use; timestep_spacing, which
the flow sigmas replace; ...) are accepted with any value.

Pipelines (`PIPELINE_SAMPLING`, from diffusers 0.42.1's pipeline code):
    WanPipeline, WanImageToVideoPipeline: scheduler.set_timesteps(num_steps), no mu -> "scheduler"
    QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps), mu = calculate_shift(image_seq_len,
        config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15)), image_seq_len = the packed
        noise latents' token count (H / 16) * (W / 16) -> "linear", with mu
    HunyuanVideo15Pipeline, HunyuanVideo15ImageToVideoPipeline:
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1], no mu -> "linear_to_zero"
A config with use_dynamic_shifting under a pipeline that passes no mu is refused (diffusers raises
there too), and so is DPMSolverMultistepScheduler under a pipeline that passes sigmas (its
set_timesteps takes none).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from engine.samplers.schedule import SPACINGS, TIME_SHIFT_TYPES, DynamicShift

__all__ = [
    "PIPELINE_SAMPLING", "SUPPORTED_SCHEDULERS", "DynamicShift", "PipelineSampling", "SchedulerDefaults",
    "checkpoint_scheduler_defaults", "scheduler_defaults",
]


@dataclass(frozen=True)
class SchedulerDefaults:
    """The sampling defaults a diffusers checkpoint's scheduler (and pipeline) imply."""

    sampler: str
    """Canonical sampler name (engine.samplers.list_samplers())."""
    shift: float
    """Static flow shift (`flow_shift` / `shift`); not applied while `dynamic` is set."""
    dynamic: DynamicShift | None = None
    """Resolution-dependent shift (use_dynamic_shifting), or None."""
    shift_terminal: float | None = None
    """Stretch the shifted sigmas so the last one equals this, or None."""
    spacing: str = "scheduler"
    """Which unshifted sigmas the pipeline uses (engine.samplers.SPACINGS)."""
    scheduler_class: str = ""
    """The config's `_class_name`, for messages."""

    def schedule_kwargs(self) -> dict[str, Any]:
        """make_sampler's keyword arguments for this schedule (dynamic, shift_terminal, spacing)."""
        return {"dynamic": self.dynamic, "shift_terminal": self.shift_terminal, "spacing": self.spacing}


@dataclass(frozen=True)
class PipelineSampling:
    """What a diffusers pipeline hands its scheduler's set_timesteps."""

    spacing: str
    """The sigmas it passes (SPACINGS key; "scheduler" when it passes none)."""
    passes_mu: bool
    """Whether it computes mu (calculate_shift) from the image sequence length."""


PIPELINE_SAMPLING: dict[str, PipelineSampling] = {
    "WanPipeline": PipelineSampling("scheduler", passes_mu=False),
    "WanImageToVideoPipeline": PipelineSampling("scheduler", passes_mu=False),
    "QwenImagePipeline": PipelineSampling("linear", passes_mu=True),
    "QwenImageEditPipeline": PipelineSampling("linear", passes_mu=True),
    "QwenImageEditPlusPipeline": PipelineSampling("linear", passes_mu=True),
    "HunyuanVideo15Pipeline": PipelineSampling("linear_to_zero", passes_mu=False),
    "HunyuanVideo15ImageToVideoPipeline": PipelineSampling("linear_to_zero", passes_mu=False),
}
assert all(p.spacing in SPACINGS for p in PIPELINE_SAMPLING.values())

ANY = object()
"""Marks an option accepted with any value (no effect on flow-matching sampling)."""

_SIGMA_CONVERSIONS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_BETAS_INERT = {  # the DDPM beta schedule: only non-flow sigmas use it
    "beta_start": ANY, "beta_end": ANY, "beta_schedule": ANY, "trained_betas": ANY, "rescale_betas_zero_snr": ANY,
}
_TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")   # computed, then replaced by the flow sigmas


@dataclass(frozen=True)
class _SchedulerRules:
    """How one diffusers scheduler class's config maps onto our samplers."""

    defaults: Mapping[str, Any]
    """diffusers 0.42.1 __init__ defaults: a saved config may omit any of them."""
    allowed: Mapping[str, Any]
    """Option -> the one value we implement, a tuple of values, or ANY. Options not listed here are
    mapped by `parse` (and must be in `defaults`)."""
    parse: Callable[[str, Mapping[str, Any]], SchedulerDefaults]


def _number(cls: str, key: str, value: Any, *, low: float, high: float = math.inf, open_high: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not low < value or (value >= high if open_high else value > high)):
        bound = f"in ({low:g}, {high:g})" if open_high else f"> {low:g}"
        raise ValueError(f"{cls} option {key}={value!r} is not supported: it must be a number {bound}")
    return float(value)


def _terminal(cls: str, config: Mapping[str, Any]) -> float | None:
    value = config["shift_terminal"]
    if value is None or (not isinstance(value, bool) and value == 0):   # diffusers: `if shift_terminal:`
        return None
    return _number(cls, "shift_terminal", value, low=0.0, high=1.0, open_high=True)


def _dynamic(cls: str, config: Mapping[str, Any], *, seq_keys: bool) -> DynamicShift | None:
    if not config["use_dynamic_shifting"]:
        return None
    # The pipelines read these with config.get(key, default); a scheduler that has no such options
    # (UniPC, DPM) gets the pipeline's defaults, which are DynamicShift's.
    keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len") if seq_keys else ()
    values = {k: config[k] for k in keys}
    for key in ("base_shift", "max_shift"):
        if key in values and values[key] is None:
            raise ValueError(f"{cls} option {key}=None is not supported with use_dynamic_shifting=True "
                             f"(the pipeline's calculate_shift needs a number)")
    try:
        return DynamicShift(**values, time_shift_type=config["time_shift_type"])
    except ValueError as e:
        raise ValueError(f"{cls}: {e}") from None


def _parse_unipc(cls: str, config: Mapping[str, Any]) -> SchedulerDefaults:
    return SchedulerDefaults(
        sampler="unipc", shift=_number(cls, "flow_shift", config["flow_shift"], low=0.0),
        dynamic=_dynamic(cls, config, seq_keys=False), shift_terminal=_terminal(cls, config), scheduler_class=cls,
    )


def _parse_flow_match_euler(cls: str, config: Mapping[str, Any]) -> SchedulerDefaults:
    return SchedulerDefaults(
        sampler="euler_a" if config["stochastic_sampling"] else "euler",
        shift=_number(cls, "shift", config["shift"], low=0.0),
        dynamic=_dynamic(cls, config, seq_keys=True), shift_terminal=_terminal(cls, config), scheduler_class=cls,
    )


def _parse_dpm(cls: str, config: Mapping[str, Any]) -> SchedulerDefaults:
    return SchedulerDefaults(
        sampler="dpmpp_2m", shift=_number(cls, "flow_shift", config["flow_shift"], low=0.0),
        dynamic=_dynamic(cls, config, seq_keys=False), scheduler_class=cls,
    )


_RULES: dict[str, _SchedulerRules] = {
    "UniPCMultistepScheduler": _SchedulerRules(
        defaults={
            "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
            "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "predict_x0": True,
            "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [], "solver_p": None,
            "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "use_flow_sigmas": False, "flow_shift": 1.0, "timestep_spacing": "linspace", "steps_offset": 0,
            "final_sigmas_type": "zero", "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
            "time_shift_type": "exponential", "sigma_min": None, "sigma_max": None, "shift_terminal": None,
        },
        allowed={
            "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
            "disable_corrector": [], "solver_p": None, "thresholding": False, "final_sigmas_type": "zero",
            **_SIGMA_CONVERSIONS, **_BETAS_INERT,
            "dynamic_thresholding_ratio": ANY, "sample_max_value": ANY,      # used only with thresholding
            "timestep_spacing": _TIMESTEP_SPACINGS, "steps_offset": ANY,
            "sigma_min": ANY, "sigma_max": ANY,                              # used only by sigma conversions
            "use_dynamic_shifting": (False, True), "time_shift_type": TIME_SHIFT_TYPES,
        },
        parse=_parse_unipc,
    ),
    "FlowMatchEulerDiscreteScheduler": _SchedulerRules(
        defaults={
            "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
            "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
            "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False,
        },
        allowed={
            "num_train_timesteps": 1000, "invert_sigmas": False, **_SIGMA_CONVERSIONS,
            "use_dynamic_shifting": (False, True), "time_shift_type": TIME_SHIFT_TYPES,
            "stochastic_sampling": (False, True),
            "base_shift": ANY, "max_shift": ANY, "base_image_seq_len": ANY, "max_image_seq_len": ANY,  # checked
        },
        parse=_parse_flow_match_euler,
    ),
    "DPMSolverMultistepScheduler": _SchedulerRules(
        defaults={
            "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
            "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
            "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
            "lambda_min_clipped": -math.inf, "variance_type": None, "timestep_spacing": "linspace",
            "steps_offset": 0, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
            "time_shift_type": "exponential",
        },
        allowed={
            "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "thresholding": False,
            "final_sigmas_type": "zero", "use_lu_lambdas": False, "variance_type": None,
            **_SIGMA_CONVERSIONS, **_BETAS_INERT,
            "dynamic_thresholding_ratio": ANY, "sample_max_value": ANY,      # used only with thresholding
            # At order 2 with final_sigmas_type "zero" the last step is first order whatever these say.
            "lower_order_final": (False, True), "euler_at_final": (False, True),
            "lambda_min_clipped": ANY,                                       # clips timesteps the flow sigmas replace
            "timestep_spacing": _TIMESTEP_SPACINGS, "steps_offset": ANY,
            "use_dynamic_shifting": (False, True),
            "time_shift_type": "exponential",                                # diffusers asserts it when mu is passed
        },
        parse=_parse_dpm,
    ),
}

SUPPORTED_SCHEDULERS: tuple[str, ...] = tuple(_RULES)


def _check_allowed(cls: str, key: str, value: Any, allowed: Any) -> None:
    if allowed is ANY:
        return
    choices = allowed if isinstance(allowed, tuple) else (allowed,)
    if not any(_same(value, choice) for choice in choices):
        wanted = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{cls} option {key}={value!r} is not supported (implemented: {key}={wanted})")


def _same(value: Any, choice: Any) -> bool:
    """Equality that does not let True stand for 1 or 1 for True (JSON has both)."""
    if isinstance(choice, bool) or isinstance(value, bool):
        return value is choice
    return value == choice


def scheduler_defaults(config: Mapping[str, Any], pipeline: str | None = None) -> SchedulerDefaults:
    """The sampling defaults of a diffusers scheduler config (the dict of scheduler_config.json).

    pipeline: the checkpoint's model_index.json `_class_name` (a PIPELINE_SAMPLING key); it decides
        the spacing and whether a dynamic shift can be used. None means a pipeline that calls
        set_timesteps(num_steps) itself (the "scheduler" spacing, as the Wan pipelines).
    Raises ValueError naming the option and its value for anything we do not implement.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"a scheduler config must be a dict, got {type(config).__name__}")
    cls = config.get("_class_name")
    if cls not in _RULES:
        raise ValueError(f"scheduler _class_name={cls!r} is not supported; supported: {', '.join(_RULES)}")
    rules = _RULES[cls]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in rules.defaults)
    if unknown:
        raise ValueError(f"{cls} option {unknown[0]}={config[unknown[0]]!r} is not a diffusers 0.42.1 option "
                         f"of this scheduler; refusing to guess what it changes")
    merged = {**rules.defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, allowed in rules.allowed.items():
        _check_allowed(cls, key, merged[key], allowed)
    defaults = rules.parse(cls, merged)

    if pipeline is None:
        return defaults
    if pipeline not in PIPELINE_SAMPLING:
        raise ValueError(f"pipeline {pipeline!r} has no known sampling convention; known: "
                         f"{', '.join(PIPELINE_SAMPLING)}")
    convention = PIPELINE_SAMPLING[pipeline]
    if defaults.dynamic is not None and not convention.passes_mu:
        raise ValueError(f"{cls} option use_dynamic_shifting=True is not supported under {pipeline}: that "
                         f"pipeline passes no mu to set_timesteps (diffusers raises there)")
    if cls == "DPMSolverMultistepScheduler" and convention.spacing != "scheduler":
        raise ValueError(f"{cls} is not supported under {pipeline}: that pipeline passes sigmas to "
                         f"set_timesteps, which DPMSolverMultistepScheduler does not take (diffusers raises)")
    return dataclasses.replace(defaults, spacing=convention.spacing)


def checkpoint_scheduler_defaults(checkpoint_dir: str | Path) -> SchedulerDefaults | None:
    """scheduler_defaults of a diffusers-layout directory, or None when it has no scheduler config.

    Reads `scheduler/scheduler_config.json` and the pipeline `_class_name` of `model_index.json`
    (when present). A `_class_name` missing from the scheduler config is taken from model_index.json's
    "scheduler" entry.
    """
    root = Path(checkpoint_dir)
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    config = _read_json(path)
    pipeline = None
    index_path = root / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        pipeline = index.get("_class_name")
        entry = index.get("scheduler")
        if "_class_name" not in config and isinstance(entry, list) and len(entry) == 2:
            config = {**config, "_class_name": entry[1]}
    return scheduler_defaults(config, pipeline)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
