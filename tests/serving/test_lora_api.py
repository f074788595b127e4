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


def test_lora_set_id_is_the_routing_key():
    from serving.deployments import lora_set_id

    one = build_request({"prompt": "a fox", "lora": [{"name": "b", "strength": 0.5}, {"name": "a"}]}, SPEC,
                        ("tiny-wan",))
    same = build_request({"prompt": "a fox", "lora": [{"name": "a"}, {"name": "b", "strength": 0.5}]}, SPEC,
                         ("tiny-wan",))
    assert lora_set_id(one) == lora_set_id(same) != "" and "b@0.5" in lora_set_id(one)
    assert lora_set_id(build_request({"prompt": "a fox"}, SPEC, ("tiny-wan",))) == ""


@pytest.mark.ray
def test_a_lora_by_name_through_the_service(served, tmp_path_factory, poll):
    """The graph with a lora_dir: a LoRA by name changes the video, the next request without it
    equals the first plain one (nothing leaks), a name not in the folder fails the job clearly."""
    import httpx
    import torch
    from ray import serve
    from safetensors.torch import save_file

    from serving.app import build_app
    from stages.video import read_mp4

    lora_dir = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(9)
    sd = {}
    for i in range(2):                       # tiny-wan: width 32, 2 blocks
        for name in ("self_attn.q", "cross_attn.o", "ffn.2"):
            out_dim, in_dim = (32, 64) if name == "ffn.2" else (32, 32)
            sd[f"diffusion_model.blocks.{i}.{name}.lora_down.weight"] = torch.randn(4, in_dim, generator=g)
            sd[f"diffusion_model.blocks.{i}.{name}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g)
            sd[f"diffusion_model.blocks.{i}.{name}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(lora_dir / "style.safetensors"))
    app = build_app({"model": "tiny-wan", "data_dir": str(tmp_path_factory.mktemp("lora-data")),
                     "replica_cpus": 0, "lora_dir": str(lora_dir)})
    serve.run(app, name="lora", route_prefix="/lora")
    try:
        with httpx.Client(base_url=f"{served.base_url}/lora", timeout=60) as client:
            def video(**extra):
                r = client.post("/v1/videos", json={"prompt": "a fox", "size": "48x32", "num_frames": 5,
                                                    "steps": 2, "seed": 3, **extra})
                assert r.status_code == 200, r.text
                final = poll(client, r.json()["id"], timeout=120)[-1]
                if final["status"] != "completed":
                    return final
                return read_mp4(client.get(f"/v1/videos/{final['id']}/content").content).frames.astype(float)

            plain = video()
            styled = video(lora=[{"name": "style", "strength": 1.0}])
            again = video()
            assert abs(styled - plain).mean() > 1.0 and abs(again - plain).max() == 0
            failed = video(lora=[{"name": "other"}])
            assert failed["status"] == "failed" and "other" in failed["error"]["message"]
    finally:
        serve.delete("lora")
