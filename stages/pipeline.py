"""LocalPipeline: every stage in this process, one request at a time.

The same stage objects run as separate Ray Serve deployments in serving/; here they are called
in the order of the request's stage plan (stages/plan.py): text encode -> image encode (when an
image is given) -> denoise -> decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch

from stages.base import Cancelled, Timings
from stages.decode import DecodeFramesStage, DecodeStage
from stages.denoise import CancelFn, DenoiseStage, ProgressFn
from stages.image_encode import ImageEncodeStage
from stages.payloads import EncodedImage, EncodedVideo, Latents, VideoFrames
from stages.plan import plan_for
from stages.request import GenerationRequest, ResolvedRequest
from stages.text_encode import TextEncodeStage

if TYPE_CHECKING:
    from engine.loading import Checkpoint
    from engine.options import EngineOptions
    from engine.registry import ModelSpec

Output = Union[EncodedVideo, EncodedImage, VideoFrames, Latents]


@dataclass
class GenerationResult:
    """One finished request."""

    request: ResolvedRequest
    """What ran, with every default filled in (the seed used included)."""
    output: Output
    """EncodedVideo (output_type "mp4"), EncodedImage ("png"), VideoFrames ("np": one frame for
    image models) or Latents ("latent")."""
    timings: Timings = field(default_factory=dict)
    """Seconds per stage, in run order."""


class LocalPipeline:
    """Text encode, image encode, denoise and decode in one process."""

    def __init__(self, spec: "ModelSpec", text: TextEncodeStage, denoise: DenoiseStage,
                 decode: DecodeStage, image: ImageEncodeStage | None = None) -> None:
        self.spec = spec
        self.text = text
        self.image = image
        self.denoise = denoise
        self.decode = decode
        self.decode_frames = DecodeFramesStage(decode.vae, decode.options, decode.interpolator)

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions",
                        denoise: DenoiseStage | None = None) -> "LocalPipeline":
        """Load every component of `ckpt` once (the VAE is shared by image encode and decode).
        `denoise`: a ready denoise stage to use instead of loading the DiT here (the library
        passes `cluster.group_denoise.GroupDenoiseStage` when the DiT runs on a worker group)."""
        from engine.families import get_family

        vae = get_family(ckpt.spec.family).load_vae(ckpt, options)
        image = None
        if ckpt.spec.tasks & {"i2v", "edit"}:
            image = ImageEncodeStage.from_checkpoint(ckpt, options, vae=vae)
        return cls(
            spec=ckpt.spec,
            text=TextEncodeStage.from_checkpoint(ckpt, options),
            denoise=denoise if denoise is not None else DenoiseStage.from_checkpoint(ckpt, options),
            decode=DecodeStage.from_checkpoint(ckpt, options, vae=vae),
            image=image,
        )

    def resolve(self, request: GenerationRequest | ResolvedRequest) -> ResolvedRequest:
        if isinstance(request, ResolvedRequest):
            if request.model != self.spec.name:
                raise ValueError(f"request was resolved for {request.model!r}, this pipeline runs "
                                 f"{self.spec.name!r}")
            return request
        return request.resolve(self.spec)

    def run(self, request: GenerationRequest | ResolvedRequest, progress: ProgressFn | None = None,
            should_cancel: CancelFn | None = None) -> GenerationResult:
        """Run one request. `progress(step, total)` after each denoising step; `should_cancel()`
        before each step and before the decode (True raises `stages.base.Cancelled`)."""
        req = self.resolve(request)
        plan = plan_for(req)
        self.decode.check_request(req)  # e.g. target_fps without an interpolator: refused before any work
        timings: Timings = {}
        with torch.no_grad():
            # 1. Text (and negative text when guidance is on).
            text = self.text(req, timings=timings)
            # 2. Image conditioning.
            image = None
            if plan.image_encode:
                if self.image is None:
                    raise ValueError(f"image: {self.spec.name} has no image encoder")
                image = self.image(req, timings=timings)
            # 3. Denoise.
            latents = self.denoise(req, text, image, timings=timings, progress=progress,
                                   should_cancel=should_cancel)
            # 4. Decode to the requested output (not for a request cancelled during the last step).
            if plan.decode != "none" and should_cancel is not None and should_cancel():
                raise Cancelled("request cancelled before decode")
            output: Output
            if plan.decode == "none":
                output = latents
            elif plan.decode == "frames":
                output = self.decode_frames(req, latents, timings=timings)
            else:
                output = self.decode(req, latents, timings=timings)
        return GenerationResult(request=req, output=output, timings=timings)
