"""RIFE frame interpolation speed (issue 21): a Wan clip of 81 frames at 480x832 from 16 to 32 fps
(80 new frames), against the Wan2.1 VAE decode of the same clip, in one run on one GPU.

Random weights at the real sizes (the published v4.25/v4.26 shapes by default; no checkpoint is
downloaded), a smooth moving test pattern as the clip (no scene cuts, so every in-between frame
goes through the model). Per variant, dtype and batch size: the time of `RifeInterpolator.interpolate`
(scene detection, padding, head features and IFNet included; frames already on the GPU), its peak
memory, and for 16-bit runs the error against the float32 run on the same weights. The VAE decode
is the engine's WanVAE in bf16, channels-last, cudnn.benchmark on (as its loader sets it up on CUDA).

    python bench/bench_rife.py --json $OUT/rife.json                 # GPU, real sizes
    python bench/bench_rife.py --tiny --device cpu                   # a quick check on the CPU

Times: CUDA events after a warm-up call, the median of --repeats calls (wall clock on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.models.rife.ifnet import IFNet  # noqa: E402
from engine.models.rife.interpolator import RifeInterpolator  # noqa: E402
from engine.models.rife.loader import VARIANTS  # noqa: E402
from engine.models.rife.tiny import randomize_  # noqa: E402

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS: list[dict] = []


def log(rec: dict) -> None:
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)


def timed(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median ms of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cpu":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory of one call above what was allocated before it (GPU only)."""
    if device == "cpu":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GIB


def moving_clip(frames: int, height: int, width: int, device: str) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1]: a smooth colour pattern moving 3 px right and 1 px down per frame."""
    y = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1)
    x = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width)
    i = torch.arange(frames, device=device, dtype=torch.float32).view(frames, 1, 1)
    xs, ys = x - 3.0 * i, y - 1.0 * i
    rgb = (0.5 + 0.4 * torch.sin(xs / 23 + ys / 31), 0.5 + 0.4 * torch.cos(ys / 17 - xs / 29),
           0.5 + 0.4 * torch.sin((xs + ys) / 19))
    return torch.stack(rgb, -1)


def section_rife(args, clip: torch.Tensor) -> None:
    for name in args.variants:
        config = VARIANTS[name].config
        base_model = randomize_(IFNet(config), seed=0)
        reference = None
        for dtype_name in args.dtypes:
            model = IFNet(config)
            model.load_state_dict(base_model.state_dict())
            model = model.to(args.device, DTYPES[dtype_name]).eval().requires_grad_(False)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            for batch in args.batch_sizes:
                interp = RifeInterpolator(model, batch_size=batch)
                run = lambda: interp.interpolate(clip, args.fps, args.fps * args.factor)  # noqa: E731
                ms = timed(run, args.device, args.repeats)
                peak = peak_gib(run, args.device)
                out = run()
                rec = dict(section="rife", variant=name, dtype=dtype_name, batch=batch,
                           channels_last=args.channels_last, frames_in=clip.shape[0], frames_out=out.shape[0],
                           size=f"{clip.shape[1]}x{clip.shape[2]}", ms=ms,
                           ms_per_new_frame=ms / (out.shape[0] - clip.shape[0]), peak_gib=peak)
                if dtype_name == "float32" and reference is None:
                    reference = out
                elif reference is not None:
                    err = (out - reference).abs()
                    rec.update(max_abs_err_vs_fp32=err.max().item(), mean_abs_err_vs_fp32=err.mean().item(),
                               frac_pixels_off_by_over_1_255=(err > 1 / 255).float().mean().item())
                log(rec)
                del out
            del model
            if args.device != "cpu":
                torch.cuda.empty_cache()


def section_vae(args, frames: int, height: int, width: int) -> None:
    from engine.models.wan.vae import WanVAE, WanVAEConfig

    if args.tiny:
        from engine.models.wan.tiny import vae_config

        config = vae_config()
    else:
        config = WanVAEConfig()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    torch.manual_seed(2)
    with torch.device(args.device):
        vae = WanVAE(config).to(dtype).eval().requires_grad_(False)
    if args.device != "cpu":
        vae.to_channels_last()
        torch.backends.cudnn.benchmark = True
    z = torch.randn(1, config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8, device=args.device, dtype=dtype)
    with torch.no_grad():
        ms = timed(lambda: vae.decode(z), args.device, args.repeats)
        peak = peak_gib(lambda: vae.decode(z), args.device)
    log(dict(section="vae", impl="engine WanVAE", dtype=str(dtype).removeprefix("torch."), frames=frames,
             size=f"{height}x{width}", ms=ms, peak_gib=peak))
    torch.backends.cudnn.benchmark = False


def summary() -> None:
    vae = [r for r in RESULTS if r["section"] == "vae"]
    print("\n| what | variant | dtype | batch | frames | ms | ms / new frame | x VAE decode | peak GiB "
          "| max abs err vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS:
        ratio = f"{r['ms'] / vae[0]['ms']:.2f}" if vae and r["section"] == "rife" else ""
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else ""
        if r["section"] == "rife":
            err = f"{r['max_abs_err_vs_fp32']:.2e}" if "max_abs_err_vs_fp32" in r else ""
            print(f"| interpolate {r['size']} | {r['variant']} | {r['dtype']} | "
                  f"{r['batch']} | {r['frames_in']} -> {r['frames_out']} | {r['ms']:.1f} | "
                  f"{r['ms_per_new_frame']:.2f} | "
                  f"{ratio} | {peak} | {err} |")
        else:
            print(f"| VAE decode {r['size']} | | {r['dtype']} | | {r['frames']} | {r['ms']:.1f} | | 1.00 | {peak} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="9 frames of 64x64, the tiny variant (a CPU check)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", default="480x832", help="HxW")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--variants", default="4.25", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch-sizes", default="8")
    p.add_argument("--channels-last", action="store_true", help="the IFNet's convolutions channels-last")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--json", default=None, help="write all records here")
    args = p.parse_args()
    if args.tiny:
        args.frames, args.size, args.repeats = 9, "64x64", 1
        if args.variants == "4.25":
            args.variants = "tiny"
    args.variants = args.variants.split(",")
    args.dtypes = args.dtypes.split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    height, width = (int(v) for v in args.size.split("x"))
    if args.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False          # the float32 run is the accuracy reference
        log(dict(section="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__))

    clip = moving_clip(args.frames, height, width, args.device)
    section_rife(args, clip)
    if not args.skip_vae:
        section_vae(args, args.frames, height, width)
    summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
