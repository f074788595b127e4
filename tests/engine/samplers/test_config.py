"""Sampling defaults from diffusers scheduler configs (engine.samplers.config), against diffusers 0.42.1."""
from __future__ import annotations

import inspect
import json
import math
import os
import sys

import pytest

from engine.samplers import list_samplers
from engine.samplers.config import (
    PIPELINE_SAMPLING, SUPPORTED_SCHEDULERS, DynamicShift, SchedulerDefaults, checkpoint_scheduler_defaults,
    scheduler_defaults,
)

diffusers = pytest.importorskip("diffusers")

sys.path.insert(0, os.path.dirname(__file__))
from sampler_release_configs import (  # noqa: E402
    QWEN_IMAGE_FLOW_MATCH, RELEASES, WAN21_UNIPC, WAN22_A14B_UNIPC, hunyuan15_flow_match,
)

DPM_FLOW = {
    "_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True,
    "flow_shift": 3.0,
}


# --- the releases ------------------------------------------------------------------------------

@pytest.mark.parametrize("release, config, pipeline, expected", RELEASES, ids=[r[0] for r in RELEASES])
def test_release_defaults(release, config, pipeline, expected):
    sampler, shift, spacing, dynamic, terminal = expected
    d = scheduler_defaults(config, pipeline)
    assert (d.sampler, d.shift, d.spacing, d.dynamic is not None, d.shift_terminal) == expected
    assert d.sampler in list_samplers() and d.scheduler_class == config["_class_name"]
    assert d.schedule_kwargs() == {"dynamic": d.dynamic, "shift_terminal": d.shift_terminal, "spacing": d.spacing}


def test_qwen_image_dynamic_shift_fields():
    d = scheduler_defaults(QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline")
    assert d.dynamic == DynamicShift(base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                                     time_shift_type="exponential")
    # ../shared/notes/qwen_image.md: e^mu = 2.00 at 1024^2, 2.30 at 1328^2.
    assert math.exp(d.dynamic.mu(64 * 64)) == pytest.approx(2.00, abs=0.005)
    assert math.exp(d.dynamic.mu(83 * 83)) == pytest.approx(2.30, abs=0.005)


def test_hunyuan15_config_is_what_diffusers_saves():
    # The release dict equals FlowMatchEulerDiscreteScheduler(shift=5.0)'s config (as the conversion saves it).
    saved = dict(diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0).config)
    ours = hunyuan15_flow_match(5.0)
    assert {k: v for k, v in saved.items() if not k.startswith("_")} == \
        {k: v for k, v in ours.items() if not k.startswith("_")}


@pytest.mark.parametrize("config", [WAN21_UNIPC, WAN22_A14B_UNIPC, QWEN_IMAGE_FLOW_MATCH], ids=["wan21", "wan22", "qwen"])
def test_release_configs_load_in_diffusers_without_unused_keys(config):
    # Guards the release dicts themselves: every key is an option of the class in diffusers 0.42.1.
    cls = getattr(diffusers, config["_class_name"])
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert {k for k in config if not k.startswith("_")} <= params


@pytest.mark.parametrize("cls_name", SUPPORTED_SCHEDULERS)
def test_default_tables_match_diffusers_signatures(cls_name):
    # Our copy of each class's __init__ defaults is diffusers 0.42.1's (a saved config may omit keys).
    from engine.samplers.config import _RULES

    signature = inspect.signature(getattr(diffusers, cls_name).__init__)
    theirs = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    ours = dict(_RULES[cls_name].defaults)
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert value == theirs[key] or (isinstance(value, float) and math.isinf(value) and math.isinf(theirs[key])), key
    assert set(_RULES[cls_name].allowed) <= set(ours)


def test_missing_keys_take_diffusers_defaults():
    # A FlowMatchEuler config with only a class name: shift 1, no dynamic shift, euler.
    d = scheduler_defaults({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert d == SchedulerDefaults(sampler="euler", shift=1.0, scheduler_class="FlowMatchEulerDiscreteScheduler")
    # and with use_dynamic_shifting, the defaults 0.5 / 1.15 / 256 / 4096 (what calculate_shift gets too)
    d = scheduler_defaults({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    assert d.dynamic == DynamicShift()


# --- options mapped to samplers ------------------------------------------------------------------

def test_stochastic_sampling_selects_euler_a():
    d = scheduler_defaults({**hunyuan15_flow_match(5.0), "stochastic_sampling": True}, "HunyuanVideo15Pipeline")
    assert (d.sampler, d.shift) == ("euler_a", 5.0)


def test_dpm_solver_config():
    d = scheduler_defaults(DPM_FLOW, "WanPipeline")
    assert (d.sampler, d.shift, d.spacing, d.dynamic) == ("dpmpp_2m", 3.0, "scheduler", None)
    d = scheduler_defaults({**DPM_FLOW, "use_dynamic_shifting": True})
    assert d.dynamic == DynamicShift()


def test_unipc_dynamic_shift_takes_the_pipeline_defaults():
    d = scheduler_defaults({**WAN21_UNIPC, "use_dynamic_shifting": True, "time_shift_type": "linear",
                            "shift_terminal": 0.1}, "QwenImagePipeline")
    assert d.dynamic == DynamicShift(time_shift_type="linear") and d.shift_terminal == 0.1


@pytest.mark.parametrize("value", [None, 0, 0.0])
def test_shift_terminal_off_values(value):
    assert scheduler_defaults({**QWEN_IMAGE_FLOW_MATCH, "shift_terminal": value}).shift_terminal is None


@pytest.mark.parametrize("key, value", [
    ("beta_schedule", "scaled_linear"), ("beta_start", 0.00085), ("trained_betas", [0.1, 0.2]),
    ("timestep_spacing", "trailing"), ("steps_offset", 1), ("rescale_betas_zero_snr", True),
    ("dynamic_thresholding_ratio", 0.9), ("sample_max_value", 2.0), ("sigma_min", 0.002),
])
def test_options_without_effect_on_flow_sampling_are_accepted(key, value):
    assert scheduler_defaults({**WAN21_UNIPC, key: value}) == scheduler_defaults(WAN21_UNIPC)


# --- refused options -------------------------------------------------------------------------------

@pytest.mark.parametrize("config, match", [
    ({**WAN21_UNIPC, "use_karras_sigmas": True}, "UniPCMultistepScheduler option use_karras_sigmas=True is not supported"),
    ({**WAN21_UNIPC, "use_exponential_sigmas": True}, "use_exponential_sigmas=True"),
    ({**WAN21_UNIPC, "use_beta_sigmas": True}, "use_beta_sigmas=True"),
    ({**WAN21_UNIPC, "solver_order": 3}, "solver_order=3 is not supported"),
    ({**WAN21_UNIPC, "solver_order": 1}, "solver_order=1 is not supported"),
    ({**WAN21_UNIPC, "prediction_type": "epsilon"}, "prediction_type='epsilon' is not supported"),
    ({**WAN21_UNIPC, "use_flow_sigmas": False}, "use_flow_sigmas=False"),
    ({**WAN21_UNIPC, "solver_type": "bh1"}, "solver_type='bh1'"),
    ({**WAN21_UNIPC, "predict_x0": False}, "predict_x0=False"),
    ({**WAN21_UNIPC, "lower_order_final": False}, "lower_order_final=False"),
    ({**WAN21_UNIPC, "disable_corrector": [0]}, r"disable_corrector=\[0\]"),
    ({**WAN21_UNIPC, "thresholding": True}, "thresholding=True"),
    ({**WAN21_UNIPC, "final_sigmas_type": "sigma_min"}, "final_sigmas_type='sigma_min'"),
    ({**WAN21_UNIPC, "num_train_timesteps": 2000}, "num_train_timesteps=2000"),
    ({**WAN21_UNIPC, "timestep_spacing": "quadratic"}, "timestep_spacing='quadratic'"),
    ({**WAN21_UNIPC, "solver_p": {"_class_name": "DDIMScheduler"}}, "solver_p="),
    ({**WAN21_UNIPC, "flow_shift": 0}, "flow_shift=0 is not supported: it must be a number > 0"),
    ({**WAN21_UNIPC, "flow_shift": "3"}, "flow_shift='3'"),
    ({**WAN21_UNIPC, "use_dynamic_shifting": 1}, "use_dynamic_shifting=1"),
    ({**WAN21_UNIPC, "time_shift_type": "cosine"}, "time_shift_type='cosine'"),
    ({**QWEN_IMAGE_FLOW_MATCH, "invert_sigmas": True}, "FlowMatchEulerDiscreteScheduler option invert_sigmas=True"),
    ({**QWEN_IMAGE_FLOW_MATCH, "use_karras_sigmas": True}, "use_karras_sigmas=True"),
    ({**QWEN_IMAGE_FLOW_MATCH, "time_shift_type": "cosine"}, "time_shift_type='cosine'"),
    ({**QWEN_IMAGE_FLOW_MATCH, "shift_terminal": 1.5}, r"shift_terminal=1.5 is not supported: it must be a number in \(0, 1\)"),
    ({**QWEN_IMAGE_FLOW_MATCH, "base_shift": None}, "base_shift=None is not supported with use_dynamic_shifting=True"),
    ({**QWEN_IMAGE_FLOW_MATCH, "max_image_seq_len": 256}, "max_image_seq_len must differ"),
    ({**QWEN_IMAGE_FLOW_MATCH, "shift": -1.0}, "shift=-1.0 is not supported"),
    ({**DPM_FLOW, "algorithm_type": "sde-dpmsolver++"}, "DPMSolverMultistepScheduler option algorithm_type='sde-dpmsolver\\+\\+'"),
    ({**DPM_FLOW, "solver_order": 3}, "solver_order=3"),
    ({**DPM_FLOW, "solver_type": "heun"}, "solver_type='heun'"),
    ({**DPM_FLOW, "use_lu_lambdas": True}, "use_lu_lambdas=True"),
    ({**DPM_FLOW, "variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({**DPM_FLOW, "use_dynamic_shifting": True, "time_shift_type": "linear"}, "time_shift_type='linear'"),
    ({**DPM_FLOW, "shift_terminal": 0.1}, "shift_terminal=0.1 is not a diffusers 0.42.1 option"),
    ({**WAN21_UNIPC, "use_magic_sigmas": True}, "use_magic_sigmas=True is not a diffusers 0.42.1 option"),
    ({**WAN21_UNIPC, "_class_name": "EulerDiscreteScheduler"}, "_class_name='EulerDiscreteScheduler' is not supported"),
    ({k: v for k, v in WAN21_UNIPC.items() if k != "_class_name"}, "_class_name=None is not supported"),
])
def test_unsupported_options_are_refused_by_name(config, match):
    with pytest.raises(ValueError, match=match):
        scheduler_defaults(config)


def test_non_dict_config_is_refused():
    with pytest.raises(ValueError, match="must be a dict"):
        scheduler_defaults([("_class_name", "UniPCMultistepScheduler")])


@pytest.mark.parametrize("config, pipeline, match", [
    (QWEN_IMAGE_FLOW_MATCH, "WanPipeline", "use_dynamic_shifting=True is not supported under WanPipeline"),
    (QWEN_IMAGE_FLOW_MATCH, "HunyuanVideo15Pipeline", "passes no mu"),
    (DPM_FLOW, "QwenImagePipeline", "DPMSolverMultistepScheduler is not supported under QwenImagePipeline"),
    (WAN21_UNIPC, "FluxKontextPipeline", "pipeline 'FluxKontextPipeline' has no known sampling convention"),
])
def test_config_and_pipeline_that_diffusers_cannot_run_are_refused(config, pipeline, match):
    with pytest.raises(ValueError, match=match):
        scheduler_defaults(config, pipeline)


def test_diffusers_really_refuses_those_combinations():
    # The two refusals above mirror diffusers: no mu with use_dynamic_shifting, no sigmas for DPM.
    flow = diffusers.FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_FLOW_MATCH)
    with pytest.raises(ValueError, match="mu"):
        flow.set_timesteps(10)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(DPM_FLOW)
    assert "sigmas" not in inspect.signature(dpm.set_timesteps).parameters


def test_every_known_pipeline_exists_in_diffusers():
    for name in PIPELINE_SAMPLING:
        assert hasattr(diffusers, name), name


# --- checkpoint directories ----------------------------------------------------------------------

def write_checkpoint(root, scheduler: dict | None, pipeline: str | None = None, index_scheduler=None):
    root.mkdir(parents=True, exist_ok=True)
    if scheduler is not None:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    if pipeline is not None:
        index = {"_class_name": pipeline, "_diffusers_version": "0.35.0.dev0"}
        if index_scheduler is not None:
            index["scheduler"] = index_scheduler
        (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_checkpoint_defaults_read_scheduler_and_pipeline(tmp_path):
    root = write_checkpoint(tmp_path / "qwen", QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline")
    assert checkpoint_scheduler_defaults(root) == scheduler_defaults(QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline")
    root = write_checkpoint(tmp_path / "wan", WAN22_A14B_UNIPC, "WanPipeline")
    assert checkpoint_scheduler_defaults(str(root)).shift == 3.0


def test_checkpoint_without_scheduler_config_has_no_defaults(tmp_path):
    assert checkpoint_scheduler_defaults(write_checkpoint(tmp_path / "official", None)) is None


def test_checkpoint_class_name_from_model_index(tmp_path):
    config = {k: v for k, v in WAN21_UNIPC.items() if k != "_class_name"}
    root = write_checkpoint(tmp_path / "c", config, "WanPipeline", ["diffusers", "UniPCMultistepScheduler"])
    assert checkpoint_scheduler_defaults(root).sampler == "unipc"


def test_checkpoint_with_unsupported_scheduler_is_refused(tmp_path):
    root = write_checkpoint(tmp_path / "k", {**WAN21_UNIPC, "use_karras_sigmas": True}, "WanPipeline")
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        checkpoint_scheduler_defaults(root)


def test_checkpoint_with_broken_json_is_refused(tmp_path):
    root = write_checkpoint(tmp_path / "b", WAN21_UNIPC)
    (root / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*scheduler_config.json"):
        checkpoint_scheduler_defaults(root)
