"""`LightX2V`: load a model once, generate videos in this process. No logic of its own: it
builds engine options and a request and runs the stages' LocalPipeline."""
from __future__ import annotations

import os
from typing import Any

import torch

from stages.denoise import CancelFn, ProgressFn
from stages.pipeline import GenerationResult, LocalPipeline
from stages.request import GenerationRequest, load_image_file
from stages.video import temp_mp4


def build_engine_options(device: str, dtype: str, engine_options: dict[str, Any]):
    """EngineOptions from the facade's keywords; `parallel` may be a dict {"cfg": .., "ulysses": ..}."""
    from engine.options import EngineOptions, ParallelConfig

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


class LightX2V:
    """A loaded model. `generate` runs one request; `last_result` keeps its seed and timings."""

    def __init__(self, pipeline: LocalPipeline, options) -> None:
        self.pipeline = pipeline
        self.options = options
        self.last_result: GenerationResult | None = None

    @classmethod
    def from_pretrained(cls, model: str, device: str = "cuda", dtype: str = "bfloat16", *,
                        spec_name: str | None = None, wait_for_gpus: bool = False,
                        **engine_options: Any) -> "LightX2V":
        """`model`: a registry name ("tiny-wan") or a local checkpoint directory (either layout).
        `spec_name`: the registry entry whose defaults a directory should use when its config
        cannot tell (e.g. "wan2.1-i2v-14b-720p": 480p and 720p I2V share one architecture).
        Extra keywords are engine options: attention=, quantization=, offload=, vae_tiling=,
        compile=, cfg_batch=, parallel={"cfg": 2, "ulysses": 2}. `wait_for_gpus` (parallel > 1 on an
        autoscaling Ray cluster): wait up to 10 minutes for the DiT group's GPUs instead of
        refusing a group larger than the cluster's current GPUs."""
        from engine.loading import resolve_checkpoint

        options = build_engine_options(device, dtype, engine_options)
        ckpt = resolve_checkpoint(model, spec_name=spec_name)
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

    def generate(self, prompt, negative_prompt=None, image=None, video_length=None,
                 resolution=None, steps=None, guidance_scale=None, shift=None,
                 sampler=None, seed=None, fps=None, latents=None,
                 output_type="mp4", output_path=None, *, progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None):
        """Generate one video.

        video_length: frame count. resolution: (height, width). image: PIL image, file path or
        (H, W, 3) array (image-to-video). latents: initial noise of the latent shape.
        None means the model's default. Returns, by output_type: "mp4" -> the written file's
        path (output_path, or a new temp file); "np" -> float32 (frames, H, W, 3) in [0, 1];
        "latent" -> the final latents (C, F_lat, H_lat, W_lat).
        """
        request = build_request(
            prompt, negative_prompt=negative_prompt, image=image, video_length=video_length,
            resolution=resolution, steps=steps, guidance_scale=guidance_scale, shift=shift,
            sampler=sampler, seed=seed, fps=fps, latents=latents, output_type=output_type)
        result = self.pipeline.run(request, progress=progress, should_cancel=should_cancel)
        self.last_result = result
        if output_type == "latent":
            return result.output.latents
        if output_type == "np":
            return result.output.frames
        path = os.fspath(output_path) if output_path is not None else temp_mp4()
        with open(path, "wb") as f:
            f.write(result.output.data)
        return path


def build_request(prompt, negative_prompt=None, image=None, video_length=None, resolution=None,
                  steps=None, guidance_scale=None, shift=None, sampler=None, seed=None, fps=None,
                  latents=None, output_type="mp4") -> GenerationRequest:
    """The request for `generate`'s arguments (opens an image path; validates)."""
    height, width = (None, None) if resolution is None else _resolution(resolution)
    if isinstance(image, (str, os.PathLike)):
        image = load_image_file(os.fspath(image))
    return GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, image=image, num_frames=video_length,
        height=height, width=width, steps=steps, guidance_scale=guidance_scale, shift=shift,
        sampler=sampler, seed=seed, fps=fps, latents=latents, output_type=output_type,
    )


def _resolution(resolution: Any) -> tuple[int, int]:
    try:
        height, width = resolution
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be (height, width), got {resolution!r}") from None
    return height, width
