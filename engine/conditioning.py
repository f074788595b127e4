"""Conditioning tensors shared by the families and the stages (CPU tensors between stages).

`ImageCond` is what an image-conditioned request carries from the image stage to the denoise
stage; what its tensors mean is the family adapter's business (engine/families.DiTAdapter).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class ImageCond:
    """Image conditioning for one request, as the model's adapter built it."""

    clip_tokens: torch.Tensor | None
    """(L_img, D_img) image-encoder tokens for the DiT's cross-attention (Wan2.1 I2V: CLIP
    ViT-H/14's 257 x 1280); None for models without an image encoder."""
    latent_cond: torch.Tensor | None
    """(C_cond, F_c, H_lat, W_lat) latent conditioning. Wan2.1 / A14B I2V: 4 frame-mask channels
    then the VAE latents of the image padded with zero frames (F_c = F_lat, concatenated to the
    noise on the channel axis); Wan2.2 TI2V: the image's latents alone (F_c = 1, replacing latent
    frame 0). None for models conditioned by `reference_latents` only."""
    reference_latents: tuple[torch.Tensor, ...] = ()
    """Qwen-Image-Edit: each input image's VAE latents (C, 1, h_i, w_i), at its own size (not the
    output's), appended to the DiT's token sequence by the model's adapter."""


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (1, 3, height, width) float32 in [-1, 1] (Lanczos resize, as diffusers)."""
    resized = image.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)
    a = np.asarray(resized).astype(np.float32) / 255.0           # (H, W, 3) in [0, 1]
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0  # (1, 3, H, W)
