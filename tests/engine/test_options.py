"""EngineOptions / ParallelConfig: bad values are refused at construction, naming the field."""
from __future__ import annotations

import dataclasses

import pytest

from engine.options import EngineOptions, ParallelConfig


@pytest.mark.parametrize("kwargs,field", [
    ({"device": "gpu"}, "device"),
    ({"dtype": "fp32"}, "dtype"),
    ({"quantization": "int4"}, "quantization"),
    ({"offload": "disk"}, "offload"),
    ({"attention": ""}, "attention"),
    ({"compile": "yes"}, "compile"),
    ({"cfg_batch": 1}, "cfg_batch"),
    ({"vae_tiling": 1}, "vae_tiling"),
    ({"parallel": {"cfg": 2}}, "parallel"),
])
def test_bad_engine_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must"):
        EngineOptions(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"cfg": 3}, "parallel.cfg"), ({"cfg": True}, "parallel.cfg"),
    ({"ulysses": 0}, "parallel.ulysses"), ({"ulysses": True}, "parallel.ulysses"),
    ({"ulysses": 2.0}, "parallel.ulysses"),
])
def test_bad_parallel_degrees_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must"):
        ParallelConfig(**kwargs)


def test_options_are_frozen_and_copied_on_change():
    opts = EngineOptions(device="cuda:1", parallel=ParallelConfig(cfg=2, ulysses=2))
    assert opts.torch_device.index == 1 and opts.parallel.world_size == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.dtype = "bfloat16"  # type: ignore[misc]
    other = opts.with_(dtype="bfloat16")
    assert other.dtype == "bfloat16" and opts.dtype == "float32"
