"""The `lightx2v` command: `generate` (in process), `serve` (Ray Serve), `models` (registry).

`serve` is imported lazily so that `generate` never imports Ray Serve.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence, get_args

from engine.options import DType, Offload, Quantization


def _size(value: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (height, width)."""
    try:
        w, h = value.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT, e.g. 832x480; got {value!r}") from None


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-wan", help="registry name or local checkpoint dir (default tiny-wan)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--image", default=None, help="input image file (image-to-video)")
    p.add_argument("--video-length", type=int, default=None, help="number of frames (4k+1)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, e.g. 832x480")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("-o", "--output", required=True, help="output .mp4 path")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    add_engine_arguments(p)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Engine-option flags shared by `generate` and `serve` (checked by EngineOptions / AppArgs)."""
    p.add_argument("--dtype", default=None, choices=list(get_args(DType)),
                   help="bfloat16 on cuda, float32 on cpu by default")
    import engine.kernels  # noqa: F401  (registers the quantized attention backends)
    from engine.attention import list_backends

    p.add_argument("--attention", default="sdpa", choices=list_backends(),
                   help="attention backend (default sdpa; cudnn_fp8 / sage_fp8 / sage_int8 need a GPU)")
    p.add_argument("--quantization", default="none", choices=list(get_args(Quantization)))
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (faster on GPU after warm-up)")
    p.add_argument("--offload", default="none", choices=list(get_args(Offload)),
                   help="CPU offload of the DiT: model (weights in pinned CPU memory) or block (streamed per block)")
    p.add_argument("--vae-tiling", action="store_true", help="decode the VAE in spatial tiles (bounded memory)")
    p.add_argument("--cfg-batch", action="store_true",
                   help="run the two guidance branches as one batch-2 forward (default: two batch-1 forwards)")
    p.add_argument("--cfg-parallel", type=int, default=1,
                   help="CFG-parallel degree (1 or 2): 2 runs the two guidance branches on different ranks")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="Ulysses sequence-parallel degree (must divide the attention heads); "
                        "world size = cfg-parallel x ulysses-degree worker processes (one GPU each on cuda)")


def default_dtype(device: str) -> str:
    """float32 on the CPU, bfloat16 on GPUs."""
    return "float32" if device == "cpu" else "bfloat16"


def generate_main(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError
    from tqdm import tqdm

    from engine.loading import resolve_checkpoint
    from lightx2v import LightX2V
    from lightx2v.api import build_request
    from stages.request import describe_error

    # 1. Validate the request against the model's spec before loading any weights.
    kwargs = dict(
        negative_prompt=args.negative_prompt, image=args.image, video_length=args.video_length,
        resolution=args.size, steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift,
        sampler=args.sampler, seed=args.seed, fps=args.fps,
    )
    try:
        build_request(args.prompt, **kwargs).resolve(resolve_checkpoint(args.model).spec)
    except (ValidationError, ValueError, OSError) as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2

    # 2. Load.
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or default_dtype(device)
    t0 = time.perf_counter()
    parallel = {"cfg": args.cfg_parallel, "ulysses": args.ulysses_degree}
    try:
        model = LightX2V.from_pretrained(args.model, device=device, dtype=dtype, attention=args.attention,
                                         quantization=args.quantization, compile=args.compile,
                                         offload=args.offload, vae_tiling=args.vae_tiling,
                                         cfg_batch=args.cfg_batch, parallel=parallel)
    except (ValueError, RuntimeError) as e:  # a Ulysses degree the heads do not divide, no CUDA, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0

    # 3. Generate, with a progress bar over the denoising steps.
    bar = None

    def progress(step: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
        bar.update(step - bar.n)
        if step == total:
            bar.close()

    try:
        path = model.generate(args.prompt, **kwargs, output_type="mp4", output_path=args.output,
                              progress=progress)
    finally:
        if bar is not None:
            bar.close()
        model.close()

    # 4. Summary: what ran, and the time per stage.
    req = model.last_result.request
    print(f"wrote {path}: {req.num_frames} frames, {req.width}x{req.height}, {req.fps} fps, "
          f"seed {req.seed}, {req.steps} steps ({req.sampler}), guidance {req.guidance_scale}")
    print(format_timings({"load": load_s, **model.last_result.timings}))
    return 0


def format_timings(timings: dict[str, float]) -> str:
    """A small table: stage, seconds, share of the generation (load excluded from the share)."""
    total = sum(v for k, v in timings.items() if k != "load")
    rows = [("stage", "seconds", "share")]
    for name, secs in timings.items():
        share = "" if name == "load" or total == 0 else f"{100 * secs / total:.1f}%"
        rows.append((name, f"{secs:.3f}", share))
    rows.append(("total", f"{total:.3f}", "100.0%" if total else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def models_main(args: argparse.Namespace) -> int:
    from engine.registry import list_specs

    for spec in list_specs():
        d = spec.defaults
        tasks = "+".join(sorted(spec.tasks))
        print(f"{spec.name:<24} {tasks:<8} {d.width}x{d.height} {d.num_frames} frames {d.fps} fps, "
              f"{d.steps} steps  {spec.description}")
    return 0


def quantize_main(args: argparse.Namespace) -> int:
    from engine.quant.checkpoint import quantize_checkpoint

    t0 = time.perf_counter()
    try:
        out = quantize_checkpoint(args.model, args.output, args.quantization)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (DiT pre-quantized to {args.quantization}, {time.perf_counter() - t0:.1f} s); "
          f"load it with quantization={args.quantization!r}")
    return 0


def build_parser(serve_arguments: bool = False) -> argparse.ArgumentParser:
    """`serve_arguments`: add the serve subcommand's flags (imports serving.launch)."""
    parser = argparse.ArgumentParser(prog="lightx2v", description="Video generation (Wan2.1, ...)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video in this process")
    add_generate_arguments(gen)
    gen.set_defaults(func=generate_main)
    sub.add_parser("models", help="list the model registry").set_defaults(func=models_main)
    quant = sub.add_parser("quantize", help="write a copy of a diffusers-layout checkpoint with its DiT "
                                            "pre-quantized (loads with half the DiT memory, no 16-bit copy)")
    quant.add_argument("model", help="diffusers-layout checkpoint folder (or a registry name)")
    quant.add_argument("--quantization", required=True, choices=["fp8", "int8"])
    quant.add_argument("-o", "--output", required=True, help="new folder (must not exist or be empty)")
    quant.set_defaults(func=quantize_main)
    serve = sub.add_parser("serve", help="start the Ray Serve app (see serving/launch.py)")
    if serve_arguments:
        from serving.launch import add_serve_arguments

        add_serve_arguments(serve)
    serve.set_defaults(func=_serve_main)
    return parser


def _serve_main(args: argparse.Namespace) -> int:
    from serving.launch import serve_main

    return serve_main(args) or 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Serve's flags belong to serving/launch.py: import it only for that subcommand.
    parser = build_parser(serve_arguments=bool(argv) and argv[0] == "serve")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
