"""Image encode stage (I2V): CLIP tokens and VAE-encoded first-frame conditioning -> ImageCond.

Exactly as diffusers' `WanImageToVideoPipeline`: the image is resized to (height, width)
(Lanczos), scaled to [-1, 1], followed by num_frames - 1 zero frames and VAE-encoded; a
4-channel frame mask (1 on the first latent frame, 0 after) goes before the latents. The CLIP
image tokens are computed from the original image by the image encoder's own processor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

from stages.base import Stage, expect_finite, expect_shape
from stages.payloads import ImageCond
from stages.request import ResolvedRequest

if TYPE_CHECKING:
    from engine.families import ImageEncoder
    from engine.loading import Checkpoint
    from engine.options import EngineOptions


class VideoVAE(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, z, F_lat, H_lat, W_lat)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, 3, F, H, W) in [-1, 1]."""


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (1, 3, height, width) float32 in [-1, 1] (Lanczos resize, as diffusers)."""
    resized = image.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)
    a = np.asarray(resized).astype(np.float32) / 255.0           # (H, W, 3) in [0, 1]
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0  # (1, 3, H, W)


def first_frame_mask(mask_channels: int, f_lat: int, h_lat: int, w_lat: int) -> torch.Tensor:
    """(mask_channels, F_lat, H_lat, W_lat): 1 on latent frame 0 (the given image), 0 after.

    diffusers builds a per-pixel-frame mask (1 for frame 0, repeated temporal_stride times, then
    the other frames) and folds it to (stride, F_lat, ...); the result is this.
    """
    mask = torch.zeros(mask_channels, f_lat, h_lat, w_lat)
    mask[:, 0] = 1.0
    return mask


class ImageEncodeStage(Stage):
    """CLIP tokens (models that have an image encoder) and the VAE conditioning."""

    name = "image_encode"
    output_type = ImageCond

    def __init__(self, image_encoder: ImageEncoder | None, vae: VideoVAE, options: "EngineOptions",
                 temporal_stride: int = 4) -> None:
        self.image_encoder = image_encoder
        self.vae = vae
        self.options = options
        self.temporal_stride = temporal_stride

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions", vae: VideoVAE | None = None
                        ) -> "ImageEncodeStage":
        """`vae` may be shared with a DecodeStage in the same process."""
        from engine.families import get_family

        family = get_family(ckpt.spec.family)
        vae = vae if vae is not None else family.load_vae(ckpt, options)
        return cls(family.load_image_encoder(ckpt, options), vae, options, ckpt.spec.temporal_stride)

    def forward(self, request: ResolvedRequest) -> ImageCond:
        if request.image is None:
            raise ValueError("image_encode: the request has no image (text-to-video needs no image stage)")
        device, dtype = self.options.torch_device, self.options.torch_dtype
        num_frames, height, width = request.num_frames, request.height, request.width

        # 1. CLIP image tokens from the original image.
        clip_tokens = None
        if self.image_encoder is not None:
            clip_tokens = self.image_encoder.encode([request.image])[0].float().cpu()  # (257, 1280)

        # 2. The image, then num_frames - 1 zero frames, VAE-encoded.
        video = torch.zeros(1, 3, num_frames, height, width, device=device, dtype=dtype)  # (1, 3, F, H, W)
        video[:, :, 0] = image_to_tensor(request.image, height, width).to(device, dtype)  # frame 0: (1, 3, H, W)
        latents = self.vae.encode(video)[0].float().cpu()                        # (z, F_lat, H_lat, W_lat)

        # 3. Frame mask channels before the latents.
        _, f_lat, h_lat, w_lat = latents.shape
        mask = first_frame_mask(self.temporal_stride, f_lat, h_lat, w_lat)      # (4, F_lat, H_lat, W_lat)
        return ImageCond(clip_tokens=clip_tokens, latent_cond=torch.cat([mask, latents], dim=0))

    def check_output(self, request: ResolvedRequest, out: ImageCond) -> None:
        c, f_lat, h_lat, w_lat = request.latent_shape
        expect_shape(self.name, "latent_cond", out.latent_cond, (self.temporal_stride + c, f_lat, h_lat, w_lat))
        expect_finite(self.name, "latent_cond", out.latent_cond)
        if out.clip_tokens is not None:
            expect_shape(self.name, "clip_tokens", out.clip_tokens, (-1, -1))
