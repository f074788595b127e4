"""The `lightx2v` command: `generate` (in process), `serve` (Ray Serve), `quantize`, `models`.

The flags are derived, not listed: `generate` has one per request field (GenerationRequest) and
one per engine option (EngineOptions); `serve` one per plain field of the serve config
(serving/config.py `AppArgs`, whose engine options are EngineOptions'). Names, types, choices,
defaults and help texts come from the declarations; lightx2v/arguments.py's `ARGUMENTS` keeps
today's names (`--video-length`, `--size WxH`, `--cfg-parallel`, ...). A new field is a new flag
with no edit here.

`serve` imports Ray Serve only when it runs: `generate` never imports it.

    lightx2v generate --prompt "a fox" -o fox.mp4     # or: python -m lightx2v.cli generate ...
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Iterable, Literal, Sequence, get_args, get_origin

from engine.options import EngineOptions, Quantization, default_dtype, option_fields
from lightx2v.arguments import (Argument, Override, literal_choices, model_arguments, option_arguments,
                                request_arguments, strip_optional)

# ----------------------------------------------------------------------------- flags from arguments


def add_argument(parser: argparse.ArgumentParser, arg: Argument) -> None:
    """The flag of `arg` (none when `arg.flags` is empty): a Literal gives choices, a bool a
    switch, a list several values; the help is the field's docstring and default. The flag's own
    default is None, so only given flags are passed on and the declared default applies."""
    if not arg.flags:
        return
    o, annotation = arg.override, strip_optional(arg.annotation)
    choices = o.choices() if o.choices else literal_choices(annotation)
    kwargs: dict[str, Any] = {"dest": arg.name, "default": None, "help": _help(arg)}
    if o.parse:
        kwargs["type"] = _typed(o.parse)
    elif choices:
        kwargs.update(choices=list(choices), type=type(choices[0]))
    elif annotation is bool:
        kwargs["action"] = "store_true" if arg.default is False else argparse.BooleanOptionalAction
    elif get_origin(annotation) in (list, tuple, set, frozenset):
        kwargs.update(nargs="+", type=_scalar((get_args(annotation) or (str,))[0]))
    else:
        kwargs["type"] = _scalar(annotation)
    if o.metavar:
        kwargs["metavar"] = o.metavar
    if arg.required:
        kwargs["required"] = True
    parser.add_argument(*arg.flags, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, arguments: Iterable[Argument]) -> None:
    for arg in arguments:
        add_argument(parser, arg)


def given(ns: argparse.Namespace, arguments: Iterable[Argument]) -> dict[str, Any]:
    """The values of the flags that were given, by argument name."""
    return {a.name: getattr(ns, a.name) for a in arguments
            if a.flags and getattr(ns, a.name, None) is not None}


def _scalar(annotation: Any):
    return annotation if annotation in (int, float, str) else str


def _typed(parse):
    def typed(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    typed.__name__ = parse.__name__  # argparse names it in "invalid ... value"
    return typed


def _help(arg: Argument) -> str:
    parts = [arg.doc] if arg.doc else []
    if arg.opens_files:
        parts.append("A file path here.")
    if arg.override.run_time_default:
        parts.append(f"(default: {arg.override.run_time_default})")
    elif arg.default is None:
        if arg.none_means and not arg.required:
            parts.append(f"(default: {arg.none_means})")
    elif not (strip_optional(arg.annotation) is bool and arg.default is False):
        parts.append(f"(default: {arg.default})")
    return " ".join(parts).replace("%", "%%")


def _is_plain(arg: Argument) -> bool:
    """A field one flag can set: a scalar, a Literal or a list of scalars (not a nested config)."""
    annotation = strip_optional(arg.annotation)
    if get_origin(annotation) is Literal or annotation in (str, int, float, bool):
        return True
    return get_origin(annotation) in (list, tuple) and all(a in (str, int, float, Ellipsis) for a in get_args(annotation))


# ----------------------------------------------------------------------------- generate


def generate_arguments() -> tuple[Argument, ...]:
    """`lightx2v generate`'s derived flags: the request's fields, then the engine options."""
    return request_arguments() + option_arguments(option_fields(EngineOptions))


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-wan",
                   help="local checkpoint dir, registry name or alias (Wan2.1-T2V-14B) or Hugging Face hub id "
                        "(Wan-AI/Wan2.1-T2V-14B-Diffusers), looked for in $LIGHTX2V_MODEL_ROOT and the Hugging "
                        "Face cache (default tiny-wan)")
    add_model_source_arguments(p)
    p.add_argument("-o", "--output", required=True, help="output file path (.mp4 for a video model, .png for "
                                                         "an image model)")
    add_arguments(p, generate_arguments())


def add_model_source_arguments(p: argparse.ArgumentParser, revision: bool = True) -> None:
    """--download (and --revision): where a model that is not on this machine comes from."""
    p.add_argument("--download", action="store_true",
                   help="download the model from the Hugging Face Hub (into its cache, with a progress bar) "
                        "when it is found neither locally nor in the cache")
    if revision:
        p.add_argument("--revision", default=None,
                       help="Hugging Face revision (branch, tag or commit) of a hub model (default main)")


def generate_main(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError
    from tqdm import tqdm

    from engine.checkpoint import resolve_checkpoint
    from engine.options import options_from_flat
    from lightx2v.api import LightX2V
    from lightx2v.arguments import build_request
    from stages.request import describe_error

    request = given(args, request_arguments())
    flat = given(args, option_arguments(option_fields(EngineOptions)))
    flat.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    flat.setdefault("dtype", default_dtype(flat["device"]))

    # 1. Find (or download) the model; validate the request against its spec, and the engine
    #    options, before loading.
    source = {"revision": args.revision} if args.revision is not None else {}
    try:
        ckpt = resolve_checkpoint(args.model, download=args.download, **source)
        resolved = build_request(**request).resolve(ckpt.spec)
        options = options_from_flat(EngineOptions, flat)
    except (ValidationError, ValueError, OSError) as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    suffix = "." + resolved.output_type
    if not args.output.lower().endswith(suffix):
        print(f"error: -o {args.output}: {ckpt.spec.name} writes {resolved.output_type.upper()} "
              f"({ckpt.spec.modality} model); name the file *{suffix}", file=sys.stderr)
        return 2

    # 2. Load (the facade's keywords are the options' fields).
    t0 = time.perf_counter()
    keywords = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                if f.name not in ("device", "dtype")}
    try:
        model = LightX2V.from_pretrained(args.model, options.device, options.dtype, **source, **keywords)
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
        path = model.generate(**request, output_path=args.output, progress=progress)
    finally:
        if bar is not None:
            bar.close()
        model.close()

    # 4. Summary: what ran, and the time per stage.
    req = model.last_result.request
    what = "image" if req.modality == "image" else f"{req.output_num_frames} frames"
    fps = "" if req.modality == "image" else f", {req.output_fps} fps"
    print(f"wrote {path}: {what}, {req.width}x{req.height}{fps}, seed {req.seed}, {req.steps} steps "
          f"({req.sampler}), guidance {req.guidance_scale}")
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


# ----------------------------------------------------------------------------- serve


def serve_arguments() -> tuple[Argument, ...]:
    """`lightx2v serve`'s derived flags: every plain field of `AppArgs` (its engine options
    included; nested deployment configs stay in serve_config.yaml)."""
    from serving.config import AppArgs

    return tuple(a for a in model_arguments(AppArgs) if _is_plain(a))


def service_arguments() -> tuple[Argument, ...]:
    """`lightx2v serve`'s service flags, one per field of serving/settings.py `ServiceSettings`
    (API keys, CORS origins, body and image limits, ingress replicas); `--api-key KEY [KEY ...]`
    for `api_keys`."""
    from serving.settings import ServiceSettings

    renamed = {"api_keys": Override(flags=("--api-key",), metavar="KEY")}
    return tuple(dataclasses.replace(a, override=renamed.get(a.name, a.override))
                 for a in option_arguments(option_fields(ServiceSettings)))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's flags: HTTP options, then each maps to an `AppArgs` field."""
    from serving.config import IngressArgs
    from serving.launch import APP_NAME

    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--name", default=APP_NAME, help="Serve application name (for handles)")
    derived = serve_arguments()
    add_arguments(p, [a for a in derived if a.name != "model"])
    (model,) = (a for a in derived if a.name == "model")
    p.add_argument("--model", action="append", default=None, metavar="MODEL",
                   help=f"{model.doc} Repeat it to serve several models behind one HTTP entrance, which "
                        f"routes on the request's `model` (default: {model.default})")
    add_model_source_arguments(p, revision=False)
    (pending,) = (a for a in model_arguments(IngressArgs) if a.name == "max_pending_jobs")
    add_argument(p, pending)  # ingress.max_pending_jobs
    add_arguments(p, service_arguments())


def serve_main(args: argparse.Namespace) -> int:
    """With --download, the model is fetched here first (into the Hugging Face cache, which the
    service's replicas then read at start-up); the service itself never downloads."""
    from serving.launch import serve_main as run

    if args.download:
        from engine.checkpoint import resolve_checkpoint
        from serving.config import AppArgs

        try:
            for model in args.model or [AppArgs.model_fields["model"].default]:
                resolve_checkpoint(model, download=True)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run(args) or 0


# ----------------------------------------------------------------------------- quantize, models


def quantize_main(args: argparse.Namespace) -> int:
    from engine.checkpoint import quantize_checkpoint

    t0 = time.perf_counter()
    try:
        out = quantize_checkpoint(args.model, args.output, args.quantization)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (DiT pre-quantized to {args.quantization}, {time.perf_counter() - t0:.1f} s); "
          f"load it with quantization={args.quantization!r}")
    return 0


def models_main(args: argparse.Namespace) -> int:
    from engine.registry import list_specs

    for spec in list_specs():
        d = spec.defaults
        tasks = "+".join(sorted(spec.tasks))
        shape = f"{d.num_frames} frames {d.fps} fps" if spec.modality == "video" else "image"
        experts = f", {len(spec.experts)} experts" if len(spec.experts) > 1 else ""
        print(f"{spec.name:<40} {tasks:<8} {d.width}x{d.height} {shape}, {d.steps} steps, {d.sampler} "
              f"shift {d.shift:g}{experts}  {spec.description}")
    return 0


# ----------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightx2v", description="Video generation (Wan2.1, Wan2.2)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video in this process")
    add_generate_arguments(gen)
    gen.set_defaults(func=generate_main)
    sub.add_parser("models", help="list the model registry").set_defaults(func=models_main)
    quant = sub.add_parser("quantize", help="write a copy of a diffusers-layout checkpoint with its DiT "
                                            "pre-quantized (loads with half the DiT memory, no 16-bit copy)")
    quant.add_argument("model", help="diffusers-layout checkpoint folder (or a registry name)")
    quant.add_argument("--quantization", required=True, choices=[q for q in get_args(Quantization) if q != "none"])
    quant.add_argument("-o", "--output", required=True, help="new folder (must not exist or be empty)")
    quant.set_defaults(func=quantize_main)
    serve = sub.add_parser("serve", help="start the Ray Serve app (serving/launch.py)")
    add_serve_arguments(serve)
    serve.set_defaults(func=serve_main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
