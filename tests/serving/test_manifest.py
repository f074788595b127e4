"""The KubeRay RayService manifest (deploy/rayservice.yaml) runs serve_config.yaml's plan: its
serveConfigV2 is that file's configuration, its Ray version the pinned one, and its GPU worker
group holds every deployment of the plan at its largest (autoscaled stages at max_replicas)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from serving.config import AppArgs, deployment_options

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())


def test_serve_config_v2_is_serve_config_yaml(manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert embedded["applications"] == config["applications"], \
        "deploy/rayservice.yaml is out of date: run python deploy/sync_serve_config.py"
    assert embedded == config


def test_the_sync_script_agrees():
    spec = importlib.util.spec_from_file_location("sync", ROOT / "deploy" / "sync_serve_config.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    current = (ROOT / "deploy" / "rayservice.yaml").read_text()
    assert sync.synced_manifest(current, (ROOT / "serve_config.yaml").read_text()) == current


def test_ray_version_is_the_pinned_one(manifest):
    import ray

    pinned = re.search(r'"ray\[serve\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == pinned == ray.__version__


def test_the_gpu_group_holds_the_plan_at_its_largest(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    (app,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    args = AppArgs.model_validate(app["args"])
    need = 0.0
    for name, options in deployment_options(args).items():
        if name == "ImageEncoder":
            continue  # deployed for image-to-video checkpoints only; the plan's model is T2V
        replicas = (options["autoscaling_config"]["max_replicas"] if options["num_replicas"] == "auto"
                    else options["num_replicas"])
        per_replica = (sum(b.get("GPU", 0) for b in options["placement_group_bundles"])
                       if "placement_group_bundles" in options else options["ray_actor_options"]["num_gpus"])
        need += replicas * per_replica
    assert 0 < need <= gpus * group["maxReplicas"], (need, gpus)
    assert args.dit.num_replicas * args.world_size <= gpus  # the DiT groups fill whole GPUs of one pod
    # The API keys reach the ingress replicas' processes (every pod gets the Secret).
    for spec in (cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]):
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["LIGHTX2V_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "lightx2v-api-keys"
