"""The Videos API takes a request's LoRAs by name (resolved in the service's lora_dir by the DiT
workers) and refuses paths; cache and cache_options reach the resolved request."""
from __future__ import annotations

import pytest

import engine.models.wan.family  # noqa: F401  (registers the Wan entries)
from engine.registry import _REGISTRY
from serving.api import ApiError, build_request

SPEC = _REGISTRY["tiny-wan"]


def test_lora_by_name_is_taken_a_path_is_refused():
    request = build_request({"prompt": "a fox", "lora": [{"name": "style", "strength": 0.5}]}, SPEC, ("tiny-wan",))
    assert [(lora.name, lora.path, lora.strength) for lora in request.lora] == [("style", None, 0.5)]
    for lora in ({"path": "/etc/passwd"}, {"path": "style.safetensors", "strength": 1.0}):
        with pytest.raises(ApiError, match=r"lora\[0\].path: not accepted by the service") as info:
            build_request({"prompt": "a fox", "lora": [lora]}, SPEC, ("tiny-wan",))
        assert info.value.status == 400
    for name in ("../style", "sub/style", "/abs"):
        with pytest.raises(ApiError, match="lora name must be a file name") as info:
            build_request({"prompt": "a fox", "lora": [{"name": name}]}, SPEC, ("tiny-wan",))
        assert info.value.status == 422


def test_cache_fields_reach_the_request():
    request = build_request({"prompt": "a fox", "cache": "teacache",
                             "cache_options": {"coefficients": [1.0, 0.0], "threshold": 0.2}}, SPEC, ("tiny-wan",))
    assert request.cache == "teacache" and request.cache_options["ret_steps"] == 5
    with pytest.raises(ApiError, match="cache_options: .*required") as info:
        build_request({"prompt": "a fox", "cache": "magcache"}, SPEC, ("tiny-wan",))
    assert info.value.status == 400
