"""The DiT worker group of one (Ray actor, NCCL process group) against the plain in-process
denoise path, in the same run, on one GPU (issue 4: "the group of one over NCCL runs at the speed
of the plain path").

Both paths run `stages.DenoiseStage` on the same checkpoint (Wan2.1-1.3B-sized random bf16 weights
written to a temporary diffusers-layout folder), the same request (480x832, 81 frames, 2 steps,
CFG on) and the same inputs. The group path is measured as a caller sees it: the Ray call with
the payloads in and the latents back. The two paths alternate for --repeats rounds after a warm-up
of each; the median is reported. Prints JSON lines (one per measurement, then a summary).

    python bench/group_vs_plain.py                      # on the GPU machine (lead)
    python bench/group_vs_plain.py --size tiny --device cpu --frames 5 --height 32 --width 48
                                                        # CPU smoke run (gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dit_sizes import DIT_SIZES as SIZES  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def write_checkpoint(directory: str, size: str, device: str) -> str:
    """A diffusers-layout folder with only `transformer/` (random weights, default init, bf16)."""
    from engine.tiny import save_diffusers_module
    from engine.models.wan.transformer import WanDiTConfig, WanTransformer

    config = WanDiTConfig(**SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer(config)
    save_diffusers_module(model, os.path.join(directory, "transformer"), config.to_dict(),
                          "WanTransformer3DModel", dtype=torch.bfloat16)
    del model
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "_diffusers_version": "0.42.1"}, f)
    return directory


def make_inputs(spec, args):
    """The request and text embeddings both paths run (CFG on: a negative branch)."""
    from stages.payloads import TextEmbeds
    from stages.request import GenerationRequest

    request = GenerationRequest(prompt="bench", num_frames=args.frames, height=args.height,
                                width=args.width, steps=args.steps, guidance_scale=5.0, seed=0,
                                output_type="latent").resolve(spec)
    g = torch.Generator().manual_seed(1)
    text_dim = SIZES[args.size]["text_dim"]
    text = TextEmbeds(context=torch.randn(spec.text_len, text_dim, generator=g),
                      negative_context=torch.randn(spec.text_len, text_dim, generator=g))
    return request, text


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    p.add_argument("--device", default="cuda", help="cuda (NCCL group) or cpu (gloo group)")
    p.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", default=None, help="reuse a folder written by an earlier run")
    args = p.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    import ray

    from cluster.dit_worker import DiTWorker
    from cluster.worker_group import WorkerGroup
    from engine.checkpoint import resolve_checkpoint
    from engine.options import EngineOptions
    from stages.denoise import DenoiseStage

    options = EngineOptions(device=args.device, dtype=dtype)
    tmp = None
    ckpt_dir = args.checkpoint
    if ckpt_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="group-vs-plain-")
        t0 = time.perf_counter()
        ckpt_dir = write_checkpoint(tmp.name, args.size, args.device)
        emit({"event": "checkpoint_written", "size": args.size, "seconds": round(time.perf_counter() - t0, 2)})
    ckpt = resolve_checkpoint(ckpt_dir)
    request, text = make_inputs(ckpt.spec, args)
    common = {"size": args.size, "device": args.device, "dtype": dtype, "frames": args.frames,
              "height": args.height, "width": args.width, "steps": args.steps,
              "latent_shape": list(request.latent_shape)}

    # 1. The plain path: DenoiseStage in this process.
    plain = DenoiseStage.from_checkpoint(ckpt, options)

    # 2. The group of one: a Ray actor with its own process group (NCCL on the GPU).
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    gpus = 1.0 if args.device.startswith("cuda") else 0.0
    group = WorkerGroup(DiTWorker, 1, gpus_per_worker=gpus, timeout_s=1800)
    group.start()
    group.get(group.call("load_model", ckpt, options))
    emit({"event": "group_started", "backend": group.backend, "ranks": [r.describe() for r in group.ranks]})

    def run_plain():
        sync(args.device)
        t0 = time.perf_counter()
        out = plain(request, text, None).latents
        sync(args.device)
        return time.perf_counter() - t0, out

    def run_group():
        t0 = time.perf_counter()
        out = group.get(group.call("denoise", request, text, None, f"bench-{time.time_ns()}"))[0].latents
        return time.perf_counter() - t0, out

    try:
        # 3. Warm-up of each, then alternate.
        _, ref = run_plain()
        _, got = run_group()
        rel = float((got - ref).abs().max() / ref.abs().max())
        emit({"event": "warm_up_done", "max_rel_diff_group_vs_plain": rel, **common})
        times: dict[str, list[float]] = {"plain": [], "group1": []}
        for i in range(args.repeats):
            for name, fn in (("plain", run_plain), ("group1", run_group)):
                seconds, _ = fn()
                times[name].append(seconds)
                emit({"path": name, "repeat": i, "seconds": round(seconds, 4),
                      "per_step_s": round(seconds / args.steps, 4), **common})
        plain_s, group_s = statistics.median(times["plain"]), statistics.median(times["group1"])
        emit({"summary": True, "plain_median_s": round(plain_s, 4), "group1_median_s": round(group_s, 4),
              "group1_over_plain": round(group_s / plain_s, 4), "backend": group.backend,
              "max_rel_diff_group_vs_plain": rel, **common})
    finally:
        group.shutdown()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
