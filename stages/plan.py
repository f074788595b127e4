"""The stage plan: which stages a resolved request runs, in order. One orchestration for every
runner: the in-process `LocalPipeline` and the service's ingress both follow it.

    text_encode -> [image_encode] -> denoise -> [decode | decode_frames]

`image_encode` runs when the request has an input image; the last stage follows `output_type`:
"latent" stops after denoise, "np" decodes to frames, the rest ("mp4", "png") decode and encode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.request import ResolvedRequest

Decode = Literal["encode", "frames", "none"]


@dataclass(frozen=True)
class StagePlan:
    image_encode: bool
    """Whether the image stage runs (an input image was given)."""
    decode: Decode
    """"encode": VAE decode then the container (MP4 / PNG); "frames": VAE decode to pixels;
    "none": the latents are the result."""

    @property
    def stages(self) -> tuple[str, ...]:
        names = ["text_encode"] + (["image_encode"] if self.image_encode else []) + ["denoise"]
        return tuple(names + ({"encode": ["decode"], "frames": ["decode_frames"], "none": []}[self.decode]))


def plan_for(request: ResolvedRequest) -> StagePlan:
    decode: Decode = {"latent": "none", "np": "frames"}.get(request.output_type, "encode")
    return StagePlan(image_encode=request.image is not None, decode=decode)
