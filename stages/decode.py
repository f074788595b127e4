"""Decode stages: latents -> frames (VideoFrames, output_type "np") -> the container of the output
type (`ENCODERS`): MP4 (EncodedVideo) for video models, PNG (EncodedImage) for image models, whose
latents are one frame.

A request's `target_fps` is applied here, after the VAE decode: a RIFE interpolator (the engine
option `interpolator`, loaded once per decode stage) raises the frame rate; the output's fps and
frame count follow (`ResolvedRequest.output_fps`, `.output_num_frames`)."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from stages.base import Stage, StageError
from stages.image_encode import VideoVAE
from stages.payloads import Encoded, EncodedImage, EncodedVideo, Latents, VideoFrames
from stages.request import RequestError, ResolvedRequest
from stages.video import encode_mp4

if TYPE_CHECKING:
    from engine.loading import Checkpoint
    from engine.models.rife import RifeInterpolator
    from engine.options import EngineOptions


class DecodeFramesStage(Stage):
    """VAE decode to float32 frames (F, H, W, 3) in [0, 1] (as diffusers' output_type="np")."""

    name = "decode"
    output_type = VideoFrames

    def __init__(self, vae: VideoVAE, options: "EngineOptions",
                 interpolator: "RifeInterpolator | None" = None) -> None:
        """`interpolator`: a loaded one to share (else loaded here from `options.interpolator`)."""
        self.vae = vae
        self.options = options
        if interpolator is None and options.interpolator is not None:
            from engine.models.rife import RifeInterpolator

            interpolator = RifeInterpolator.load(options.interpolator, options.torch_device, options.torch_dtype)
        self.interpolator = interpolator

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions", vae: VideoVAE | None = None):
        """`vae` may be shared with an ImageEncodeStage in the same process."""
        from engine.families import get_family

        return cls(vae if vae is not None else get_family(ckpt.spec.family).load_vae(ckpt, options), options)

    def forward(self, request: ResolvedRequest, latents: Latents) -> VideoFrames:
        frames = self.decode_to_unit_range(latents)[:request.kept_frames]  # (F_kept, H, W, 3): the frames asked
        frames = self.interpolate(request, frames)                         # (F', H, W, 3) on device
        return VideoFrames(frames=frames.float().cpu().numpy(), fps=request.output_fps)

    def check_request(self, request: ResolvedRequest) -> None:
        """Refuse what this stage cannot do (before any work is spent on the request)."""
        if request.target_fps is not None and self.interpolator is None:
            raise RequestError("target_fps", "needs a frame interpolator and none is configured: start the "
                                             "engine with interpolator=PATH to a RIFE flownet.pkl "
                                             "(--interpolator on the command line)")

    def interpolate(self, request: ResolvedRequest, frames: torch.Tensor) -> torch.Tensor:
        """(F, H, W, 3) decoded frames -> the request's output_num_frames at its target_fps."""
        if request.target_fps is None:
            return frames
        self.check_request(request)
        return self.interpolator.interpolate(frames, request.fps, request.target_fps)

    def decode_to_unit_range(self, latents: Latents) -> torch.Tensor:
        """VAE decode -> (F, H, W, 3) float32 in [0, 1], on the engine's device."""
        device, dtype = self.options.torch_device, self.options.torch_dtype
        # 1. VAE decode of the normalised latents (in tiles if the loader set the VAE up so).
        z = latents.latents.to(device, dtype)[None]                             # (1, z, F_lat, H_lat, W_lat)
        video = self.vae.decode(z)[0]                                           # (3, F, H, W) in [-1, 1]
        # 2. To [0, 1], frames last.
        return (video.float() * 0.5 + 0.5).clamp(0.0, 1.0).permute(1, 2, 3, 0).contiguous()  # (F, H, W, 3)

    def check_output(self, request: ResolvedRequest, out: VideoFrames) -> None:
        expected = (request.output_num_frames, request.height, request.width, 3)
        if out.frames.shape != expected:
            raise StageError(f"decode: frames have shape {out.frames.shape}, expected {expected}")
        if not np.isfinite(out.frames).all():
            raise StageError("decode: frames contain NaN or inf")


def _encode_video(request: ResolvedRequest, pixels: np.ndarray) -> EncodedVideo:
    """H.264 MP4 at the output fps."""
    data = encode_mp4(pixels, request.output_fps)
    return EncodedVideo(data=data, num_frames=pixels.shape[0], height=pixels.shape[1],
                        width=pixels.shape[2], fps=request.output_fps)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_image(request: ResolvedRequest, pixels: np.ndarray) -> EncodedImage:
    """The one frame of an image model, as PNG."""
    return EncodedImage(data=encode_png(pixels[0]), height=pixels.shape[1], width=pixels.shape[2])


ENCODERS: dict[str, Callable[[ResolvedRequest, np.ndarray], Encoded]] = {"mp4": _encode_video, "png": _encode_image}
"""output_type -> the encoder of the decoded uint8 frames (F, H, W, 3)."""


class DecodeStage(DecodeFramesStage):
    """VAE decode (and frame interpolation to target_fps), then the output type's container:
    H.264 MP4 at the output fps, or PNG (`ENCODERS`)."""

    output_type = Encoded

    def forward(self, request: ResolvedRequest, latents: Latents) -> Encoded:
        frames = self.decode_to_unit_range(latents)[:request.kept_frames]  # (F_kept, H, W, 3): the frames asked
        frames = self.interpolate(request, frames)                         # (F', H, W, 3) on device
        # uint8 on the device (4x less to copy), rounded as frames_to_uint8.
        pixels = (frames * 255.0).round().to(torch.uint8).cpu().numpy()
        if request.output_type not in ENCODERS:
            raise RequestError("output_type", f"{request.output_type!r} is not encoded by the decode stage; "
                                              f"encoded types: {', '.join(ENCODERS)}")
        return ENCODERS[request.output_type](request, pixels)

    def check_output(self, request: ResolvedRequest, out: Encoded) -> None:
        if isinstance(out, EncodedImage):
            if (out.height, out.width) != (request.height, request.width):
                raise StageError(f"decode: image is {out.width}x{out.height}, expected "
                                 f"{request.width}x{request.height}")
            return
        got = (out.num_frames, out.height, out.width)
        expected = (request.output_num_frames, request.height, request.width)
        if got != expected:
            raise StageError(f"decode: video is {got}, expected {expected}")
