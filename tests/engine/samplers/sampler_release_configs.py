"""scheduler/scheduler_config.json of the diffusers releases, as shipped, and their pipelines.

Sources: diffusers scripts/convert_wan_to_diffusers.py (UniPCMultistepScheduler(prediction_type=
"flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=...): 3.0 for Wan2.1
T2V/I2V and Wan2.2 A14B, 5.0 for Wan2.2 TI2V-5B; boundary_ratio 0.875 T2V, 0.9 I2V), saved with
the keys of the diffusers version that converted them (Wan2.1 0.33.0.dev0, Wan2.2 0.35.0.dev0);
scripts/convert_hunyuan_video1_5_to_diffusers.py (FlowMatchEulerDiscreteScheduler(shift=...): 5.0
480p, 9.0 720p T2V, 7.0 720p I2V); Qwen/Qwen-Image's scheduler_config.json
(../shared/notes/qwen_image.md).
"""
from __future__ import annotations

WAN21_UNIPC = {
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}

WAN22_A14B_UNIPC = {
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.35.0.dev0",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "time_shift_type": "exponential", "timestep_spacing": "linspace", "trained_betas": None,
    "use_beta_sigmas": False, "use_dynamic_shifting": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False,
}

WAN22_TI2V_UNIPC = {**WAN22_A14B_UNIPC, "flow_shift": 5.0}

QWEN_IMAGE_FLOW_MATCH = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def hunyuan15_flow_match(shift: float) -> dict:
    """FlowMatchEulerDiscreteScheduler(shift=shift).save_config() (HunyuanVideo-1.5 conversions)."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.36.0.dev0",
        "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096,
        "max_shift": 1.15, "num_train_timesteps": 1000, "shift": shift, "shift_terminal": None,
        "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
        "use_dynamic_shifting": False, "use_exponential_sigmas": False, "use_karras_sigmas": False,
    }


# (release, scheduler config, model_index.json _class_name, expected defaults:
#  sampler, shift, spacing, dynamic?, shift_terminal)
RELEASES = [
    ("wan2.1-t2v", WAN21_UNIPC, "WanPipeline", ("unipc", 3.0, "scheduler", False, None)),
    ("wan2.1-i2v", WAN21_UNIPC, "WanImageToVideoPipeline", ("unipc", 3.0, "scheduler", False, None)),
    ("wan2.2-t2v-a14b", WAN22_A14B_UNIPC, "WanPipeline", ("unipc", 3.0, "scheduler", False, None)),
    ("wan2.2-i2v-a14b", WAN22_A14B_UNIPC, "WanImageToVideoPipeline", ("unipc", 3.0, "scheduler", False, None)),
    ("wan2.2-ti2v-5b", WAN22_TI2V_UNIPC, "WanPipeline", ("unipc", 5.0, "scheduler", False, None)),
    ("qwen-image", QWEN_IMAGE_FLOW_MATCH, "QwenImagePipeline", ("euler", 1.0, "linear", True, 0.02)),
    ("qwen-image-edit", QWEN_IMAGE_FLOW_MATCH, "QwenImageEditPlusPipeline", ("euler", 1.0, "linear", True, 0.02)),
    ("hunyuan15-480p-t2v", hunyuan15_flow_match(5.0), "HunyuanVideo15Pipeline",
     ("euler", 5.0, "linear_to_zero", False, None)),
    ("hunyuan15-720p-t2v", hunyuan15_flow_match(9.0), "HunyuanVideo15Pipeline",
     ("euler", 9.0, "linear_to_zero", False, None)),
    ("hunyuan15-720p-i2v", hunyuan15_flow_match(7.0), "HunyuanVideo15ImageToVideoPipeline",
     ("euler", 7.0, "linear_to_zero", False, None)),
]
