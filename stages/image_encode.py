"""Image encode stage (image-conditioned requests): the input image -> ImageCond.

What the conditioning holds is the model family's business: its adapter
(`engine.families.DiTAdapter.image_condition`) runs the image encoder (if the model has one) and
the VAE. Wan2.1 / A14B: mask + VAE latents of [image, zero frames] (+ CLIP tokens for Wan2.1);
Wan2.2 TI2V: the image's latents alone (engine/models/wan/adapter.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from engine.conditioning import image_to_tensor  # noqa: F401  (re-exported: the pixel preprocessing)
from stages.base import Stage, StageError, expect_finite
from stages.payloads import ImageCond
from stages.request import ResolvedRequest

if TYPE_CHECKING:
    from engine.families import DiTAdapter, ImageEncoder
    from engine.loading import Checkpoint
    from engine.options import EngineOptions


class VideoVAE(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, z, F_lat, H_lat, W_lat)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, 3, F, H, W) in [-1, 1]."""


class ImageEncodeStage(Stage):
    """The model's image conditioning (image encoder tokens and/or VAE latents)."""

    name = "image_encode"
    output_type = ImageCond

    def __init__(self, image_encoder: "ImageEncoder | None", vae: VideoVAE, adapter: "DiTAdapter",
                 options: "EngineOptions") -> None:
        self.image_encoder = image_encoder
        self.vae = vae
        self.adapter = adapter
        self.options = options

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions", vae: VideoVAE | None = None
                        ) -> "ImageEncodeStage":
        """`vae` may be shared with a DecodeStage in the same process."""
        from engine.families import get_family

        family = get_family(ckpt.spec.family)
        vae = vae if vae is not None else family.load_vae(ckpt, options)
        return cls(family.load_image_encoder(ckpt, options), vae, family.adapter(ckpt.spec), options)

    def forward(self, request: ResolvedRequest) -> ImageCond:
        if request.image is None:
            raise ValueError("image_encode: the request has no image (text-only requests need no image stage)")
        # several input images (models with max_images > 1) go to the adapter as a list
        image = list(request.images) if len(request.images) > 1 else request.image
        return self.adapter.image_condition(
            image, request.num_frames, request.height, request.width, self.vae, self.image_encoder,
            self.options.torch_device, self.options.torch_dtype)

    def check_output(self, request: ResolvedRequest, out: ImageCond) -> None:
        _, _, h_lat, w_lat = request.latent_shape
        if out.latent_cond is None and not out.reference_latents:
            raise StageError("image_encode: the conditioning has neither latent_cond nor reference_latents")
        if out.latent_cond is not None:
            if out.latent_cond.dim() != 4 or tuple(out.latent_cond.shape[2:]) != (h_lat, w_lat):
                raise StageError(f"image_encode: latent_cond has shape {tuple(out.latent_cond.shape)}, expected "
                                 f"(C, F, {h_lat}, {w_lat})")
            expect_finite(self.name, "latent_cond", out.latent_cond)
        for i, ref in enumerate(out.reference_latents):
            if ref.dim() != 4 or ref.device.type != "cpu":
                raise StageError(f"image_encode: reference_latents[{i}] is {tuple(ref.shape)} on {ref.device}, "
                                 "expected (C, 1, h, w) on the CPU")
            expect_finite(self.name, f"reference_latents[{i}]", ref)
        if out.clip_tokens is not None and out.clip_tokens.dim() != 2:
            raise StageError(f"image_encode: clip_tokens has shape {tuple(out.clip_tokens.shape)}, expected (L, D)")
