"""Decode stages: latents -> frames (VideoFrames, output_type "np") -> MP4 (EncodedVideo)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from stages.base import Stage, StageError
from stages.image_encode import VideoVAE
from stages.payloads import EncodedVideo, Latents, VideoFrames
from stages.request import ResolvedRequest
from stages.video import encode_mp4

if TYPE_CHECKING:
    from engine.loading import Checkpoint
    from engine.options import EngineOptions


class DecodeFramesStage(Stage):
    """VAE decode to float32 frames (F, H, W, 3) in [0, 1] (as diffusers' output_type="np")."""

    name = "decode"
    output_type = VideoFrames

    def __init__(self, vae: VideoVAE, options: "EngineOptions") -> None:
        self.vae = vae
        self.options = options

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions", vae: VideoVAE | None = None):
        """`vae` may be shared with an ImageEncodeStage in the same process."""
        from engine.families import get_family

        return cls(vae if vae is not None else get_family(ckpt.spec.family).load_vae(ckpt, options), options)

    def forward(self, request: ResolvedRequest, latents: Latents) -> VideoFrames:
        frames = self.decode_to_unit_range(latents)                               # (F, H, W, 3) on device
        return VideoFrames(frames=frames.float().cpu().numpy(), fps=request.fps)

    def decode_to_unit_range(self, latents: Latents) -> torch.Tensor:
        """VAE decode -> (F, H, W, 3) float32 in [0, 1], on the engine's device."""
        device, dtype = self.options.torch_device, self.options.torch_dtype
        # 1. VAE decode of the normalised latents (in tiles if the loader set the VAE up so).
        z = latents.latents.to(device, dtype)[None]                             # (1, z, F_lat, H_lat, W_lat)
        video = self.vae.decode(z)[0]                                           # (3, F, H, W) in [-1, 1]
        # 2. To [0, 1], frames last.
        return (video.float() * 0.5 + 0.5).clamp(0.0, 1.0).permute(1, 2, 3, 0).contiguous()  # (F, H, W, 3)

    def check_output(self, request: ResolvedRequest, out: VideoFrames) -> None:
        expected = (request.num_frames, request.height, request.width, 3)
        if out.frames.shape != expected:
            raise StageError(f"decode: frames have shape {out.frames.shape}, expected {expected}")
        if not np.isfinite(out.frames).all():
            raise StageError("decode: frames contain NaN or inf")


class DecodeStage(DecodeFramesStage):
    """VAE decode, then H.264 MP4 at the request's fps."""

    output_type = EncodedVideo

    def forward(self, request: ResolvedRequest, latents: Latents) -> EncodedVideo:
        frames = self.decode_to_unit_range(latents)                              # (F, H, W, 3) on device
        # uint8 on the device (4x less to copy), rounded as frames_to_uint8.
        pixels = (frames * 255.0).round().to(torch.uint8).cpu().numpy()
        data = encode_mp4(pixels, request.fps)
        return EncodedVideo(data=data, num_frames=pixels.shape[0], height=pixels.shape[1],
                            width=pixels.shape[2], fps=request.fps)

    def check_output(self, request: ResolvedRequest, out: EncodedVideo) -> None:
        got = (out.num_frames, out.height, out.width)
        if got != (request.num_frames, request.height, request.width):
            raise StageError(f"decode: video is {got}, expected "
                             f"{(request.num_frames, request.height, request.width)}")
