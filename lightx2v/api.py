"""`LightX2V`: load a model once, generate videos in this process. No logic of its own: it
builds engine options and a request and runs the stages' LocalPipeline.

The keywords are derived from the declarations (lightx2v/arguments.py): every `EngineOptions`
field is a keyword of `from_pretrained`, every `GenerationRequest` field one of `generate`, with
their types, defaults and docstrings; a new field is a new keyword with no edit here.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image

from engine.options import EngineOptions, Offload, ParallelConfig
from lightx2v.arguments import (build_request, describe, facade_option_arguments, parameters,
                                request_arguments, request_signature)
from stages.denoise import CancelFn, ProgressFn
from stages.pipeline import GenerationResult, LocalPipeline

GENERATE_POSITIONAL = ("prompt", "negative_prompt", "image", "video_length", "resolution", "steps",
                       "guidance_scale", "shift", "sampler", "seed", "fps", "latents", "output_type")
"""`generate`'s positional parameters in issue 2's order (then `output_path`), kept for callers
who pass them by position. Every other request argument is keyword-only."""


def build_engine_options(device: str, dtype: str, engine_options: dict[str, Any]) -> EngineOptions:
    """EngineOptions from the facade's keywords; `parallel` may be a dict {"cfg": .., "ulysses": ..}."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but CUDA is not available on this machine; "
                           "pass device=\"cpu\" (with dtype=\"float32\") to run on the CPU")
    options = dict(engine_options)
    parallel = options.pop("parallel", None)
    if isinstance(parallel, dict):
        unknown_keys = sorted(set(parallel) - set(ParallelConfig.__dataclass_fields__))
        if unknown_keys:
            raise TypeError(f"unknown parallel key(s) {', '.join(map(str, unknown_keys))}; known: "
                            f"{', '.join(ParallelConfig.__dataclass_fields__)}")
        parallel = ParallelConfig(**parallel)
    if parallel is not None and not isinstance(parallel, ParallelConfig):
        raise TypeError(f'parallel must be a dict such as {{"cfg": 2, "ulysses": 2}} or a ParallelConfig, '
                        f"got {type(parallel).__name__}")
    if parallel is not None:
        options["parallel"] = parallel
    known = set(EngineOptions.__dataclass_fields__) - {"device", "dtype"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return EngineOptions(device=device, dtype=dtype, **options)


def recommended_offload(spec, options: EngineOptions) -> Offload:
    """The offload `offload=True` stands for, for this model and these options:

    - "expert" for a model with two experts (Wan2.2 A14B): only the active expert's weights are
      on the GPU, the idle one waits in pinned CPU memory and is swapped in once per phase, so
      the GPU holds half the DiT weights for two copies per request; it works with parallel
      ranks and with compile;
    - "block" for one DiT: the DiT blocks stream from pinned CPU memory through two GPU slots
      with prefetch, overlapping the copies with compute (the smallest GPU footprint, at about
      the same speed: docs/BENCHMARKS.md); with compile=True (which "block" does not support)
      "model" instead (the whole DiT copied in once per request).

    A one-DiT model on parallel ranks has no offload mode ("model" and "block" are for one GPU):
    ValueError."""
    if len(spec.experts) >= 2:
        return "expert"
    if options.parallel.world_size > 1:
        raise ValueError(f"offload=True: {spec.name} has one DiT, and its offload modes ('model', 'block') "
                         f"run on one GPU, not with parallel world size {options.parallel.world_size}; "
                         "pass offload=False")
    return "model" if options.compile else "block"


def _offload_choice(value: Any) -> bool | None:
    """True/False for the facade's boolean offload, None for a mode name; anything else is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in get_args(Offload):
        return None
    raise ValueError(f"offload must be True (the model's recommended mode), False (none) or one of "
                     f"{', '.join(get_args(Offload))}; got {value!r}")


class LightX2V:
    """A loaded model. `generate` runs one request; `last_result` keeps its seed and timings."""

    def __init__(self, pipeline: LocalPipeline, options) -> None:
        self.pipeline = pipeline
        self.options = options
        self.last_result: GenerationResult | None = None

    @classmethod
    def from_pretrained(cls, model: str, device: str = "cuda", dtype: str = "bfloat16", *,
                        spec_name: str | None = None, download: bool = False, revision: str | None = None,
                        wait_for_gpus: bool = False, **engine_options: Any) -> "LightX2V":
        """`model`: a local checkpoint directory (either layout), a registry name or alias
        ("tiny-wan", "Wan2.1-T2V-14B", case-insensitive) or a Hugging Face hub id
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers"). A name's weights are looked for in
        $LIGHTX2V_MODEL_ROOT/<name>, then in the Hugging Face cache (HF_HOME, HF_HUB_CACHE) at
        `revision` (branch, tag or commit; default "main"); with `download=True` a model found
        nowhere is downloaded into that cache (with a progress bar; refused when HF_HUB_OFFLINE
        is set). Found nowhere: an error listing every place looked (engine.checkpoint.resolve_checkpoint).
        `spec_name`: the registry entry whose defaults a directory should use when its config
        cannot tell (e.g. "wan2.1-i2v-14b-720p": 480p and 720p I2V share one architecture).
        `offload`: a mode name, or True for the model's recommended mode (`recommended_offload`:
        "expert" for two-expert models, else "block"), False for none.
        `wait_for_gpus` (parallel > 1 on an autoscaling Ray cluster): wait up to 10 minutes for
        the DiT group's GPUs instead of refusing a group larger than the cluster's current GPUs.
        `device`, `dtype` (here "cuda" and "bfloat16" by default) and the other keywords are the
        engine options (EngineOptions), `parallel` also as a dict such as {"cfg": 2, "ulysses": 2}:
        """
        from engine.checkpoint import resolve_checkpoint

        offload = _offload_choice(engine_options.get("offload", "none"))
        if offload is not None:  # True / False: decided once the model is known
            engine_options = {**engine_options, "offload": "none"}
        options = build_engine_options(device, dtype, engine_options)
        ckpt = resolve_checkpoint(model, spec_name=spec_name, revision=revision, download=download)
        if offload:
            options = options.with_(offload=recommended_offload(ckpt.spec, options))
        denoise = None
        if options.parallel.world_size > 1:
            # The DiT runs on cfg x ulysses worker processes (Ray is started locally if needed);
            # the other stages run here.
            from cluster.group_denoise import GroupDenoiseStage

            denoise = GroupDenoiseStage.start(ckpt, options, wait_for_gpus=wait_for_gpus)
        try:
            return cls(LocalPipeline.from_checkpoint(ckpt, options, denoise=denoise), options)
        except BaseException:
            if denoise is not None:
                denoise.shutdown()
            raise

    def close(self) -> None:
        """Stop the DiT worker group when the model runs on one (parallel > 1); else nothing."""
        shutdown = getattr(self.pipeline.denoise, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "LightX2V":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def spec(self):
        """The model's registry entry (defaults, strides, tasks)."""
        return self.pipeline.spec

    def generate(self, *args: Any, progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None, **kwargs: Any):
        """Generate one video (video models) or image (image models).

        The parameters are the request's fields (GenerationRequest; the signature and the list
        below), None meaning the model's default, and `output_path`. Returns, by output_type:
        "mp4" / "png" (the defaults of video / image models) -> the written file's path
        (output_path, or a new temp file); "np" -> float32 in [0, 1], (frames, H, W, 3) for a
        video, (H, W, 3) for an image; "pil" (image models) -> a PIL image; "latent" -> the final
        latents (C, F_lat, H_lat, W_lat).
        `progress(step, total)` is called after each denoising step; `should_cancel()` is
        polled between steps. The request's arguments:
        """
        values = dict(_GENERATE.bind(*args, **kwargs).arguments)
        output_path = values.pop("output_path", None)
        pil = values.get("output_type") == "pil"  # the pixels ("np"), as a PIL image here
        if pil:
            if self.spec.modality != "image":
                raise ValueError(f"output_type 'pil' is for image models; {self.spec.name} makes videos "
                                 "(use 'mp4', 'np' or 'latent')")
            values["output_type"] = "np"
        result = self.pipeline.run(build_request(**values), progress=progress, should_cancel=should_cancel)
        self.last_result = result
        output_type = result.request.output_type
        if output_type == "latent":
            return result.output.latents
        if output_type == "np":
            if result.request.modality != "image":
                return result.output.frames
            pixels = result.output.frames[0]                                   # (H, W, 3)
            return Image.fromarray((pixels * 255).round().astype(np.uint8)) if pil else pixels
        path = os.fspath(output_path) if output_path is not None else _temp_file("." + output_type)
        with open(path, "wb") as f:
            f.write(result.output.data)
        return path


def _temp_file(suffix: str) -> str:
    """A new empty file in the temp dir (the caller owns it)."""
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="lightx2v-")
    os.close(fd)
    return path


# ----------------------------------------------------------------------------- derived signatures

_GENERATE = request_signature(GENERATE_POSITIONAL, [
    inspect.Parameter("output_path", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])
"""What `generate` binds its arguments to: the request arguments and output_path."""


def _derive_signatures() -> None:
    """`generate`'s and `from_pretrained`'s signatures and docstrings from the declarations."""
    gen = LightX2V.generate
    hooks = [p for p in inspect.signature(gen).parameters.values() if p.kind is p.KEYWORD_ONLY]
    self_ = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    gen.__signature__ = _GENERATE.replace(parameters=[self_, *_GENERATE.parameters.values(), *hooks])
    gen.__doc__ = (gen.__doc__ or "").rstrip() + "\n" + describe(request_arguments(), " " * 12)

    pre = LightX2V.from_pretrained.__func__
    options = facade_option_arguments(EngineOptions)
    fixed = [p for p in inspect.signature(pre).parameters.values() if p.kind is not p.VAR_KEYWORD]
    options = tuple(dataclasses.replace(a, annotation=a.annotation | bool, doc=a.doc + " True: the model's "
                                        "recommended mode (recommended_offload); False: none.")
                    if a.name == "offload" else a for a in options)  # the facade also takes a bool
    keywords = [a for a in options if a.name not in ("device", "dtype")]  # positional, declared above
    pre.__signature__ = inspect.signature(pre).replace(parameters=fixed + parameters(keywords))
    pre.__doc__ = (pre.__doc__ or "").rstrip() + "\n" + describe(options, " " * 12)


_derive_signatures()
