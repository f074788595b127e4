"""Published TeaCache / MagCache calibrations of the Wan2.1 entries, registered with engine.cache.

Sources (values copied as published; see ../shared/notes/caching_lora_distill.md):
- MagCache: Zehong-Ma/MagCache `MagCache4Wan2.1/magcache_generate.py`: the interleaved
  conditional/unconditional ratio lists, of which the conditional half (even entries, after the
  leading padding 1.0) is kept, as diffusers' MagCache takes one list (`docs/source/en/optimization/cache.md`);
  threshold / K / retention from `MagCache4Wan2.1/README.md` (1.3B: E0.12 K4 R0.2; 14B and I2V: E0.24 K6 R0.2).
- TeaCache: ali-vilab/TeaCache `TeaCache4Wan2.1/teacache_generate.py`, the `use_ret_steps`
  coefficients (the signal is the blocks' timestep modulation, engine/cache.py) with 5 retention
  steps; thresholds: the README's `use_ret_steps` "slow" column (1.3B 0.05, 14B 0.10, I2V 0.20).

Wan2.2 entries have no default here (MagCache4Wan2.2 calibrates the high-noise expert only):
requests pass their own `cache_options`.
"""
from __future__ import annotations

from engine.cache import register_calibration

MAG_RATIOS_T2V_1_3B = (
    1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511,
    0.99535, 0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419,
    0.99396, 0.99388, 0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005,
    0.98944, 0.98849, 0.98758, 0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717, 0.9741,
    0.97003, 0.96538, 0.9593, 0.95086, 0.94013, 0.92402, 0.90241, 0.86821, 0.81838,
)

MAG_RATIOS_T2V_14B = (
    1.0, 1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434, 0.99533,
    0.99468, 0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347, 0.99418,
    0.99271, 0.99313, 0.99215, 0.99218, 0.99216, 0.99163, 0.99138, 0.98982, 0.98996, 0.9887,
    0.98772, 0.98767, 0.98573, 0.98501, 0.9838, 0.98177, 0.98037, 0.97678, 0.97546, 0.97184,
    0.96711, 0.96349, 0.95629, 0.94926, 0.93964, 0.92511, 0.90693, 0.8796, 0.86111,
)

MAG_RATIOS_I2V_480P = (
    1.0, 0.98783, 0.97559, 0.98311, 0.98202, 0.9888, 0.98762, 0.98957, 0.99052, 0.99383,
    0.98857, 0.99065, 0.98845, 0.99057, 0.98957, 0.98601, 0.98823, 0.98756, 0.98808, 0.98721,
    0.98571, 0.98543, 0.98157, 0.98411, 0.97952, 0.98149, 0.9774, 0.97825, 0.97355, 0.97085,
    0.97056, 0.96588, 0.96113, 0.9567, 0.94961, 0.93973, 0.93217, 0.91878, 0.90955, 0.92617,
)

MAG_RATIOS_I2V_720P = (
    1.0, 0.99428, 0.98588, 0.98273, 0.99018, 0.98911, 0.98646, 0.99454, 0.9891, 0.99124,
    0.99102, 0.99215, 0.99515, 0.99576, 0.99068, 0.99097, 0.99166, 0.99041, 0.99201, 0.99101,
    0.98599, 0.98845, 0.98848, 0.98862, 0.98718, 0.98497, 0.98264, 0.98389, 0.97938, 0.97535,
    0.97498, 0.973, 0.96827, 0.96261, 0.95335, 0.94649, 0.93397, 0.91636, 0.89088, 0.8679,
)

TEA_COEFFICIENTS_T2V_1_3B = (-52186.2437, 9230.41404, -528.275948, 13.6987616, -0.0499875664)

TEA_COEFFICIENTS_T2V_14B = (-303318.725, 49053.7029, -2655.30556, 58.7365115, -0.315583525)

TEA_COEFFICIENTS_I2V_480P = (257151.496, -35422.9917, 1402.86849, -13.5890334, 0.132517977)

TEA_COEFFICIENTS_I2V_720P = (8107.0546, 2133.93892, -372.934672, 16.6203073, -0.0417769401)

_CALIBRATIONS = {
    # entry: (mag_ratios, magcache threshold, K, TeaCache coefficients, TeaCache threshold)
    "wan2.1-t2v-1.3b": (MAG_RATIOS_T2V_1_3B, 0.12, 4, TEA_COEFFICIENTS_T2V_1_3B, 0.05),
    "wan2.1-t2v-14b": (MAG_RATIOS_T2V_14B, 0.24, 6, TEA_COEFFICIENTS_T2V_14B, 0.10),
    "wan2.1-i2v-14b-480p": (MAG_RATIOS_I2V_480P, 0.24, 6, TEA_COEFFICIENTS_I2V_480P, 0.20),
    "wan2.1-i2v-14b-720p": (MAG_RATIOS_I2V_720P, 0.24, 6, TEA_COEFFICIENTS_I2V_720P, 0.20),
}


def register() -> None:
    """Register every calibration above (called once, when the Wan entries are registered)."""
    for name, (ratios, mag_threshold, k, coefficients, tea_threshold) in _CALIBRATIONS.items():
        register_calibration(name, "magcache", {"mag_ratios": ratios, "threshold": mag_threshold,
                                                 "max_skip_steps": k, "retention_ratio": 0.2})
        register_calibration(name, "teacache", {"coefficients": coefficients, "threshold": tea_threshold,
                                                 "ret_steps": 5})
