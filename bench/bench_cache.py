"""Feature caching and step distillation, whole pipeline (text encode, denoise, VAE decode to frames):

  1. no cache vs TeaCache vs MagCache at the model's defaults with CFG (Wan2.1-T2V-14B, 480p,
     81 frames, 50 steps; each cache at the entry's calibrated defaults, or --cache-options):
     time per stage, and the final latents' deviation from the no-cache latents of this call
     (or of --baseline-latents, saved by an earlier call with --save-latents);
  2. the 4-step distilled schedule without CFG (`wan2.1-t2v-14b-distill`: the full distilled DiT
     with --distill-model, or the base model with --distill-lora) vs the 50-step CFG run.

    python bench/bench_cache.py --json $OUT/cache.json                                   # all runs
    python bench/bench_cache.py --runs none,magcache --save-latents $OUT/lat --json ...  # split calls
    python bench/bench_cache.py --runs distill --distill-lora loras/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors
    python bench/bench_cache.py --tiny                                                   # CPU smoke run

Each run is one warm request first (2 steps; first-call costs), then the timed request with the
same seed. One JSON line per run (also appended to --json as it finishes, so a call cut short keeps
what it measured). The distilled model is loaded after the cached runs' model is released.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightx2v import LightX2V  # noqa: E402
from stages.request import GenerationRequest  # noqa: E402

PROMPT = ("Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a "
          "spotlighted stage.")
TINY_CACHE_OPTIONS = {  # tiny-wan has no published calibration: synthetic but skipping options
    "magcache": {"mag_ratios": [1.0, 1.0, 0.995, 0.99, 0.99, 0.985, 0.98, 0.97], "threshold": 0.05,
                 "max_skip_steps": 2},
    "teacache": {"coefficients": [1.0, 0.0], "threshold": 1.0, "ret_steps": 2},
}


class Recorder:
    """Wraps the pipeline's denoise stage: keeps the last latents and the last feature cache."""

    def __init__(self, stage) -> None:
        self.stage, self.latents, self.cache = stage, None, None
        make = stage._feature_cache

        def feature_cache(request):
            self.cache = make(request)
            return self.cache

        stage._feature_cache = feature_cache

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def __call__(self, *args, **kwargs):
        out = self.stage(*args, **kwargs)
        self.latents = out.latents
        return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_request(model: LightX2V, recorder: Recorder, device: str, **fields) -> dict:
    """A 2-step warm request, then the timed one; its stage times, total and latents."""
    pipeline = model.pipeline
    warm = fields if model.spec.defaults.timesteps is not None else dict(fields, steps=2)
    pipeline.run(GenerationRequest(**warm))
    sync(device)
    start = time.perf_counter()
    result = pipeline.run(GenerationRequest(**fields))
    sync(device)
    total = time.perf_counter() - start
    cache = recorder.cache
    return {"total_s": round(total, 3), "stages_s": {k: round(v, 3) for k, v in result.timings.items()},
            "steps": result.request.steps, "guidance_scale": result.request.guidance_scale,
            "cache": result.request.cache, "cache_options": result.request.cache_options,
            "skipped_steps": None if cache is None else cache.skipped_steps(),
            "latents": recorder.latents}


def load(model_name: str, args, **kwargs) -> tuple[LightX2V, Recorder]:
    model = LightX2V.from_pretrained(model_name, device=args.device, dtype=args.dtype, **kwargs)
    recorder = Recorder(model.pipeline.denoise)
    model.pipeline.denoise = recorder
    return model, recorder


def release(model: LightX2V) -> None:
    model.close()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def emit(line: dict, path: str | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Wan2.1-T2V-14B")
    p.add_argument("--spec-name", default="wan2.1-t2v-14b")
    p.add_argument("--runs", default="none,teacache,magcache,distill",
                   help="comma-separated: none, teacache, magcache, distill")
    p.add_argument("--size", default="832x480", help="WIDTHxHEIGHT")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-options", default=None, help='JSON {"teacache": {...}, "magcache": {...}}')
    p.add_argument("--distill-model", default=None, help="the full distilled checkpoint (a folder)")
    p.add_argument("--distill-lora", default=None, help="the distill LoRA, merged into --model at load")
    p.add_argument("--save-latents", default=None, help="folder: write each run's latents there")
    p.add_argument("--baseline-latents", default=None, help="the no-cache latents (.pt) of an earlier call")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny-wan on the CPU, small sizes (a smoke run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cache_options = json.loads(args.cache_options) if args.cache_options else {}
    if args.tiny:
        args.model, args.spec_name, args.device, args.dtype = "tiny-wan", None, "cpu", "float32"
        args.size, args.frames, args.steps = "64x64", 9, 8
        cache_options = {**TINY_CACHE_OPTIONS, **cache_options}
    width, height = (int(v) for v in args.size.lower().split("x"))
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - {"none", "teacache", "magcache", "distill"}
    if unknown:
        p.error(f"unknown run(s) {sorted(unknown)}")
    if args.save_latents:
        os.makedirs(args.save_latents, exist_ok=True)
    common = dict(prompt=PROMPT, num_frames=args.frames, height=height, width=width, seed=args.seed,
                  output_type="np")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    baseline = torch.load(args.baseline_latents) if args.baseline_latents else None
    baseline_s = None

    # 1. no cache / TeaCache / MagCache, 50 steps with CFG
    cached_runs = [r for r in runs if r != "distill"]
    if cached_runs:
        model, recorder = load(args.model, args, spec_name=args.spec_name)
        for run in cached_runs:
            fields = dict(common, steps=args.steps, guidance_scale=args.guidance_scale)
            if run != "none":
                fields.update(cache=run, cache_options=cache_options.get(run))
            out = timed_request(model, recorder, args.device, **fields)
            latents = out.pop("latents")
            if run == "none":
                baseline, baseline_s = latents, out["total_s"]
            if args.save_latents:
                torch.save(latents, os.path.join(args.save_latents, f"{run}.pt"))
            out["latent_rel_err_vs_none"] = None if baseline is None else rel_err(latents, baseline)
            out["speedup_vs_none"] = None if baseline_s is None else round(baseline_s / out["total_s"], 3)
            emit({"bench": "cache", "run": run, "model": model.spec.name, "device": device_name,
                  "size": f"{width}x{height}", "frames": args.frames, **out}, args.json)
        release(model)

    # 2. the 4-step distilled schedule, no CFG
    if "distill" in runs:
        if args.tiny:   # tiny-wan has no distilled entry: the same 4 steps, shift 5, Euler, no CFG
            model, recorder = load(args.model, args)
            fields = dict(common, steps=4, guidance_scale=1.0, shift=5.0, sampler="euler")
        else:
            if args.distill_model is None and args.distill_lora is None:
                p.error("the distill run needs --distill-model (full checkpoint) or --distill-lora (base + LoRA)")
            source = args.distill_model or args.model
            extra = {"lora_path": args.distill_lora} if args.distill_lora else {}
            model, recorder = load(source, args, spec_name="wan2.1-t2v-14b-distill", **extra)
            fields = dict(common)
        out = timed_request(model, recorder, args.device, **fields)
        out.pop("latents")
        out["speedup_vs_none"] = None if baseline_s is None else round(baseline_s / out["total_s"], 3)
        emit({"bench": "cache", "run": "distill", "model": model.spec.name, "device": device_name,
              "size": f"{width}x{height}", "frames": args.frames,
              "form": "tiny" if args.tiny else ("lora" if args.distill_lora else "full"), **out}, args.json)
        release(model)


if __name__ == "__main__":
    main()
