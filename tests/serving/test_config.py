"""AppArgs validation, deployment options computed in one place, serve_config.yaml."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serving.config import AppArgs, deployment_options

ROOT = Path(__file__).resolve().parents[2]


def _yaml_app() -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    return app


def test_cpu_mode_requests_no_gpus():
    opts = deployment_options(AppArgs(replica_cpus=0))
    for name, o in opts.items():
        assert o["ray_actor_options"]["num_gpus"] == 0, name
        assert o["ray_actor_options"]["num_cpus"] == 0, name
    assert "placement_group_bundles" not in opts["DiTGroup"]


def test_gpu_mode_placement_group_follows_parallel_degrees():
    args = AppArgs(device="cuda", dtype="bfloat16", cfg_parallel=2, ulysses_degree=2,
                   dit={"gpus_per_worker": 0.8}, decoder={"num_gpus": 0.2})
    dit = deployment_options(args)["DiTGroup"]
    assert dit["placement_group_bundles"] == [{"CPU": 1.0}] + [{"GPU": 0.8, "CPU": 1.0}] * 4
    assert dit["placement_group_strategy"] == "STRICT_PACK"
    assert dit["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}  # fits bundle 0, no CUDA
    assert deployment_options(args)["VAEDecoder"]["ray_actor_options"]["num_gpus"] == 0.2


def test_autoscaling_and_queue_bounds():
    args = AppArgs(decoder={"num_replicas": "auto", "min_replicas": 1, "max_replicas": 4,
                            "target_ongoing_requests": 1, "max_queued_requests": 7})
    dec = deployment_options(args)["VAEDecoder"]
    assert dec["num_replicas"] == "auto"
    assert dec["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1}
    assert dec["max_queued_requests"] == 7
    for name, o in deployment_options(args).items():  # Serve's own rejections: 503 + Retry-After
        assert o["backpressure_config"] == {"status_code": 503, "retry_after_s": args.ingress.retry_after_s}, name


@pytest.mark.parametrize("bad,field", [
    ({"cfg_parallel": 3}, "cfg_parallel"),
    ({"device": "tpu"}, "device"),
    ({"decoder": {"min_replicas": 3, "max_replicas": 2}}, "decoder.min_replicas"),
    ({"dtype": "bfloat16"}, "dtype"),  # on cpu
    ({"dit": {"gpus_per_worker": 0}}, "gpus_per_worker"),
    ({"bogus": 1}, "bogus"),
    ({"text_encoder": {"num_replicas": 0}}, "text_encoder.num_replicas"),
    ({"dit": {"num_replicas": -1}}, "dit.num_replicas"),
])
def test_bad_args_name_the_field(bad, field):
    with pytest.raises(ValidationError) as info:
        AppArgs(**bad)
    assert field in str(info.value)


def test_serve_config_yaml_is_valid_and_plans_the_8_gpu_node():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    app = _yaml_app()
    assert app["import_path"] == "serving.app:build_app"
    args = AppArgs.model_validate(app["args"])
    opts = deployment_options(args)
    # The DiT groups take whole GPUs' worth of bundles; the small stages fit the rest.
    dit_replicas = args.dit.num_replicas
    dit_gpus = dit_replicas * args.world_size * args.dit.gpus_per_worker
    small = (args.text_encoder.num_replicas * args.text_encoder.num_gpus
             + args.image_encoder.num_replicas * args.image_encoder.num_gpus
             + args.decoder.max_replicas * args.decoder.num_gpus)
    assert dit_replicas * args.world_size == 8
    assert dit_gpus + small <= 8.0 + 1e-9
    assert len(opts["DiTGroup"]["placement_group_bundles"]) == 1 + args.world_size


def test_build_app_from_yaml_on_a_cpu_copy(tmp_path):
    from ray.serve import Application

    from serving.app import build_app

    args = dict(_yaml_app()["args"])
    args.update(model="tiny-wan", device="cpu", dtype="float32", data_dir=str(tmp_path),
                cfg_parallel=1, ulysses_degree=1, replica_cpus=0)
    for stage in ("text_encoder", "image_encoder", "decoder"):
        args[stage] = {**args[stage], "num_gpus": 0}
    assert isinstance(build_app(args), Application)


def test_two_model_config_is_valid_and_fits_the_8_gpu_node():
    """deploy/serve_config_video_and_image.yaml: Serve's schema, every model's AppArgs, one shared
    job store, and the GPUs every deployment asks for (at its maximum replicas) fit 8."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "serve_config_video_and_image.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serving.router:build_service"
    models = [AppArgs.model_validate(m) for m in app["args"]["models"]]
    assert len({m.data_dir for m in models}) == 1
    gpus = 0.0
    for m in models:
        gpus += m.dit.num_replicas * m.world_size * m.dit.gpus_per_worker
        gpus += m.text_encoder.num_replicas * m.text_encoder.num_gpus
        gpus += m.image_encoder.num_replicas * m.image_encoder.num_gpus
        gpus += m.decoder.max_replicas * m.decoder.num_gpus
    whole = sum(m.dit.num_replicas * m.world_size for m in models)
    assert whole <= 8 and gpus <= 8.0 + 1e-9
