"""Throughput of the Ray Serve graph against the in-process pipeline, in one run (issue 3).

    python bench/serve_throughput.py                 # on the GPU: wan2.1-t2v-1.3b-sized random weights
    python bench/serve_throughput.py --size tiny     # CPU dry run on tiny-wan (checks the script)

1. A random-weight checkpoint of the real Wan2.1 T2V 1.3B sizes is generated once (diffusers
   layout: DiT 1.3B, Wan VAE, umT5-XXL text encoder; the tokenizer is tiny-wan's, ids only)
   into --ckpt-dir. No real weights exist here: the videos are noise, the work is real.
2. Baseline: `LocalPipeline` on the GPU runs the N requests one after another (after one warm-up).
3. Graph: the Serve app on the same GPU with fractional GPUs (TextEncoder, DiT worker group of
   one, VAEDecoder sharing it), the N requests submitted at once over HTTP, polled to the end.
Each request: 480x832, 81 frames, 4 steps, guidance 5 (CFG on), distinct seeds.
Prints one JSON line per measurement, then a summary line with the throughput ratio.
On the GPU machine there is no imageio-ffmpeg binary: MP4s are written with OpenCV there
(stages/video.py picks the first usable encoder; LIGHTX2V_MP4_ENCODER overrides).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dit_sizes import DIT_SIZES  # noqa: E402

SIZES = {
    # DiT of wan2.1-t2v-1.3b, full umT5-XXL, full Wan VAE.
    "1.3b": dict(
        dit=DIT_SIZES["1.3b"],
        t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, vocab_size=256384),
        request=dict(size="832x480", num_frames=81, steps=4, guidance_scale=5.0),
        device="cuda", dtype="bfloat16",
    ),
    "tiny": dict(request=dict(size="64x64", num_frames=9, steps=4, guidance_scale=5.0),
                 device="cpu", dtype="float32"),
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------- checkpoint


def write_random_checkpoint(directory: str, sizes: dict) -> str:
    """Diffusers-layout Wan2.1 T2V checkpoint with random weights at the given sizes."""
    from transformers import UMT5Config, UMT5EncoderModel

    from engine.models.wan.tiny import (MODEL_INDEX, SCHEDULER_CONFIG, make_tokenizer, randomize_,
                                        save_diffusers_module)
    from engine.models.wan.transformer import WanDiTConfig, WanTransformer
    from engine.models.wan.vae import WanVAE, WanVAEConfig

    if os.path.isfile(os.path.join(directory, "model_index.json")):
        return directory
    tmp = directory + ".partial"
    os.makedirs(tmp, exist_ok=True)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"

    def save(module, name: str, config: dict, class_name: str) -> None:
        save_diffusers_module(module, os.path.join(tmp, name), config, class_name, dtype=torch.bfloat16)

    start = time.perf_counter()
    dit_cfg, vae_cfg = WanDiTConfig(**sizes["dit"]), WanVAEConfig()
    # randomize_ draws on the CPU (seeded); transformers' own init of umT5-XXL runs on the GPU.
    save(randomize_(WanTransformer(dit_cfg)), "transformer", dit_cfg.to_dict(), "WanTransformer3DModel")
    save(randomize_(WanVAE(vae_cfg), 1), "vae", vae_cfg.to_dict(), "AutoencoderKLWan")
    with torch.device(init_device):
        t5 = UMT5EncoderModel(UMT5Config(**sizes["t5"])).to(torch.bfloat16).eval()
    t5.save_pretrained(os.path.join(tmp, "text_encoder"))
    del t5
    make_tokenizer().save_pretrained(os.path.join(tmp, "tokenizer"))
    os.makedirs(os.path.join(tmp, "scheduler"), exist_ok=True)
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f)
    index = {k: v for k, v in MODEL_INDEX.items() if k not in ("image_encoder", "image_processor")}
    index["_class_name"] = "WanPipeline"
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(index, f)
    os.rename(tmp, directory)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    emit({"phase": "checkpoint", "path": directory, "seconds": round(time.perf_counter() - start, 1)})
    return directory


def requests(n: int, base: dict) -> list[dict]:
    return [{"prompt": f"a red fox runs through snow, shot {i}", "seed": 1000 + i, **base} for i in range(n)]


# ----------------------------------------------------------------------------- baseline


def run_local(model: str, device: str, dtype: str, reqs: list[dict]) -> dict:
    """The N requests one after another through LocalPipeline (after one warm-up request)."""
    from engine.checkpoint import resolve_checkpoint
    from engine.options import EngineOptions
    from serving.api import build_request
    from stages.pipeline import LocalPipeline

    ckpt = resolve_checkpoint(model)
    pipe = LocalPipeline.from_checkpoint(ckpt, EngineOptions(device=device, dtype=dtype))
    resolved = [build_request(r, ckpt.spec, (ckpt.spec.name, model)) for r in reqs]
    pipe.run(resolved[0])  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    latencies, stage_totals = [], {}
    start = time.perf_counter()
    for r in resolved:
        t = time.perf_counter()
        result = pipe.run(r)
        sync()
        latencies.append(time.perf_counter() - t)
        for k, v in result.timings.items():
            stage_totals[k] = stage_totals.get(k, 0.0) + v
    total = time.perf_counter() - start
    del pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"mode": "local_sequential", "requests": len(reqs), "total_s": round(total, 3),
            "videos_per_min": round(60 * len(reqs) / total, 3),
            "latency_s": _percentiles(latencies),
            "stage_s_per_request": {k: round(v / len(reqs), 3) for k, v in stage_totals.items()}}


# ----------------------------------------------------------------------------- the graph


def run_graph(model: str, device: str, dtype: str, reqs: list[dict], data_dir: str,
              fractions: dict) -> dict:
    """The Serve app on this machine, the N requests submitted at once over HTTP."""
    import ray

    from serving.config import AppArgs
    from serving.launch import free_port, start_service, stop_service

    gpu = device == "cuda"
    ray.init(include_dashboard=False, log_to_driver=False, namespace="bench")
    args = {
        "model": model, "data_dir": data_dir, "device": device, "dtype": dtype, "replica_cpus": 1 if gpu else 0,
        "text_encoder": {"num_gpus": fractions["text"], "max_ongoing_requests": 8},
        "decoder": {"num_gpus": fractions["decoder"], "max_ongoing_requests": 2},
        "dit": {"gpus_per_worker": fractions["dit"], "max_ongoing_requests": 2, "max_queued_requests": 64},
        "ingress": {"max_pending_jobs": 64},
    }
    t = time.perf_counter()
    service = start_service(AppArgs.model_validate(args), port=free_port(), name="bench")
    startup = time.perf_counter() - t
    client = _Http(service.url)
    # Warm-up: one request through every stage.
    _wait_all(client, [client.post("/v1/videos", reqs[0])["id"]])
    start = time.perf_counter()
    ids = [client.post("/v1/videos", r)["id"] for r in reqs]
    finished = _wait_all(client, ids)
    total = time.perf_counter() - start
    failed = [v for v in finished.values() if v["status"] != "completed"]
    latencies = [v["completed_at_perf"] - start for v in finished.values()]
    stop_service()
    return {"mode": "serve_concurrent", "requests": len(reqs), "total_s": round(total, 3),
            "videos_per_min": round(60 * len(reqs) / total, 3),
            "latency_s": _percentiles(latencies), "failed": len(failed),
            "errors": [v["error"] for v in failed][:3], "startup_s": round(startup, 1),
            "gpu_fractions": fractions if gpu else None}


class _Http:
    """Tiny JSON client on urllib (the GPU machine's image may lack httpx)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def post(self, path: str, body: dict) -> dict:
        import urllib.request

        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def get(self, path: str) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.base + path, timeout=600) as r:
            return json.loads(r.read())


def _wait_all(client: _Http, ids: list[str], poll_s: float = 0.1) -> dict[str, dict]:
    done: dict[str, dict] = {}
    while len(done) < len(ids):
        for i in ids:
            if i in done:
                continue
            v = client.get(f"/v1/videos/{i}")
            if v["status"] in ("completed", "failed"):
                v["completed_at_perf"] = time.perf_counter()
                done[i] = v
        time.sleep(poll_s)
    return done


def _percentiles(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": round(statistics.median(values), 3), "max": round(values[-1], 3),
            "mean": round(statistics.fmean(values), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "wan2.1-t2v-1.3b-random"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--text-gpu", type=float, default=0.1, help="GPU fraction of the text encoder")
    parser.add_argument("--dit-gpu", type=float, default=0.6, help="GPU fraction of the DiT worker")
    parser.add_argument("--decoder-gpu", type=float, default=0.3, help="GPU fraction of the decoder")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--text-layers", type=int, default=None,
                        help="umT5 encoder layers of the random checkpoint (default: the real 24); fewer "
                             "saves writing and loading ~11 GB twice when device time is short")
    parser.add_argument("--json", default=None, help="also write all records to this file")
    ns = parser.parse_args()
    cfg = SIZES[ns.size]
    if ns.text_layers is not None and "t5" in cfg:
        cfg = {**cfg, "t5": {**cfg["t5"], "num_layers": ns.text_layers, "num_decoder_layers": ns.text_layers}}
    device, dtype = cfg["device"], cfg["dtype"]
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--size 1.3b needs a CUDA GPU (use --size tiny for a CPU dry run)")
    model = "tiny-wan" if ns.size == "tiny" else write_random_checkpoint(ns.ckpt_dir, cfg)
    reqs = requests(ns.requests, cfg["request"])
    emit({"phase": "config", "size": ns.size, "text_layers": cfg.get("t5", {}).get("num_layers"), "model": model, "device": device, "dtype": dtype,
          "requests": ns.requests, "request": cfg["request"],
          "gpu": torch.cuda.get_device_name() if device == "cuda" else None})
    records = []
    if not ns.skip_local:
        records.append(run_local(model, device, dtype, reqs))
        emit(records[-1])
    data_dir = ns.data_dir or tempfile.mkdtemp(prefix="serve-bench-")
    fractions = {"text": ns.text_gpu, "dit": ns.dit_gpu, "decoder": ns.decoder_gpu}
    records.append(run_graph(model, device, dtype, reqs, data_dir, fractions))
    emit(records[-1])
    if len(records) == 2:
        local, graph = records
        emit({"summary": "serve_vs_local", "throughput_ratio": round(graph["videos_per_min"] / local["videos_per_min"], 3),
              "local_videos_per_min": local["videos_per_min"], "serve_videos_per_min": graph["videos_per_min"]})
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
