"""How conditioning enters the HunyuanVideo-1.5 DiT (engine.families.DiTAdapter), and the image
sizes of its image-to-video pipeline.

Every step the DiT sees 65 channels: the 32 noisy latents, 32 condition channels and 1 mask
channel. Text-to-video: zeros in both, and no image tokens. Image-to-video, as diffusers'
`HunyuanVideo15ImageToVideoPipeline`: the image is cover-resized and centre-cropped to the video
size (Lanczos), VAE-encoded as one frame (posterior mean, times the scaling factor) and placed in
latent frame 0 of the condition channels (the other frames 0), the mask is 1 on frame 0; its
SigLIP tokens (from the same crop) are the DiT's image tokens. Both guidance branches get both.
A MeanFlow model (the 480p I2V step-distilled release) also takes the next step's timestep.

Sizes: without a requested size, diffusers' image-to-video pipeline picks the size bucket whose
aspect ratio is closest to the image's (not above it for tall images, not below for wide ones)
among the buckets of the checkpoint's `target_size` (640 for 480p, 960 for 720p;
`bucket_size`); its text-to-video pipeline defaults to the 16:9 bucket (480x848, 720x1280).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from engine.conditioning import ImageCond
from engine.models.hunyuan_video15.text_encoder import PromptTokens
from engine.models.hunyuan_video15.transformer import DiTContext

BUCKET_STRIDE = 16
"""Pixel stride of the size buckets (the VAE's spatial compression)."""


# ---------------------------------------------------------------------------------------------
# Sizes


def crop_size_list(base_size: int, patch_size: int = BUCKET_STRIDE, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The size buckets of about base_size**2 pixels, as the release's `generate_crop_size_list`:
    pairs of multiples of `patch_size` with (base_size / patch_size)**2 patches at most and an
    aspect ratio within `max_ratio`."""
    num_patches = round((base_size / patch_size) ** 2)
    buckets = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            buckets.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return buckets


def bucket_size(height: int, width: int, target_size: int) -> tuple[int, int]:
    """(height, width) of the bucket diffusers picks for an image (or a 9:16 default) of this
    size: the closest aspect ratio that is not above the image's when it is tall (h >= w), not
    below it when it is wide (`get_closest_ratio` with ratios rounded to 5 digits)."""
    buckets = crop_size_list(target_size)
    ratios = np.array([round(h / w, 5) for h, w in buckets])
    aspect = float(height) / float(width)
    diffs = ratios - aspect
    allowed = [(i, d) for i, d in enumerate(diffs) if (d <= 0 if aspect >= 1 else d >= 0)]
    best = min(allowed, key=lambda pair: abs(pair[1]))[0]
    return buckets[best]


def resize_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Cover-resize (Lanczos) and centre-crop to width x height, as diffusers'
    `VaeImageProcessor.resize(..., resize_mode="crop")`."""
    image = image.convert("RGB")
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def pixels(image: Image.Image) -> Tensor:
    """An RGB image of the video size -> (1, 3, 1, H, W) float32 in [-1, 1] (no resize)."""
    a = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0           # (H, W, 3)
    return (torch.from_numpy(a).permute(2, 0, 1)[None, :, None] * 2.0 - 1.0).contiguous()


# ---------------------------------------------------------------------------------------------
# The adapter


class HunyuanVideo15Adapter:
    """engine.families.DiTAdapter of HunyuanVideo-1.5 (see the module docstring). Stateless."""

    uses_next_timestep = True
    """The denoise loop passes `model_input(..., t_next=)` (a MeanFlow DiT takes it as t_r)."""

    def image_condition(self, image: Image.Image, num_frames: int, height: int, width: int, vae,
                        image_encoder, device: torch.device, dtype: torch.dtype) -> ImageCond:
        # 1. the crop both encoders see
        crop = resize_and_crop(image, height, width)
        # 2. SigLIP tokens of the crop
        tokens = image_encoder.encode([crop])[0].float().cpu()                 # (729, 1152)
        # 3. the crop as one frame through the VAE (normalised latents)
        latents = vae.encode(pixels(crop).to(device, dtype))[0].float().cpu()  # (32, 1, H/16, W/16)
        return ImageCond(clip_tokens=tokens, latent_cond=latents)

    def text_input(self, embeds: PromptTokens, device: torch.device, dtype: torch.dtype) -> DiTContext:
        return DiTContext(text=embeds.text.to(device, dtype)[None], glyph=embeds.glyph.to(device, dtype)[None])

    def model_input(self, latents: Tensor, t: Tensor, image: ImageCond | None, dit: nn.Module,
                    dtype: torch.dtype, t_next: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x, timestep, image_tokens): x = [latents, condition latents, mask] (1, 65, F, H, W);
        timestep (1,), or (1, 2) = (t, t_next) for a MeanFlow DiT (t_next: the next step's
        timestep, 0 after the last step)."""
        # 1. condition channels and mask: the image on latent frame 0, or zeros
        b, _, f, h, w = latents.shape
        cond = latents.new_zeros(b, latents.shape[1], f, h, w)                 # (1, 32, F, H, W)
        mask = latents.new_zeros(b, 1, f, h, w)                                # (1, 1, F, H, W)
        tokens = None
        if image is not None:
            cond[:, :, :1] = image.latent_cond.to(latents.device, latents.dtype)[None]
            mask[:, :, 0] = 1.0
            tokens = image.clip_tokens.to(latents.device, dtype)[None]          # (1, 729, 1152)
        x = torch.cat([latents, cond, mask], dim=1).to(dtype)                  # (1, 65, F, H, W)
        # 2. timestep(s)
        timestep = t.reshape(1).float()
        if dit.config.use_meanflow:
            following = torch.zeros_like(timestep) if t_next is None else t_next.reshape(1).float()
            timestep = torch.stack([timestep, following], dim=-1)               # (1, 2)
        return x, timestep, tokens

    def final_latents(self, latents: Tensor, image: ImageCond | None) -> Tensor:
        return latents

    def dummy_inputs(self, dit: nn.Module, text_len: int, device: torch.device, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, DiTContext, Tensor | None]:
        """(x, timestep, context, image_tokens) at a tiny size: 2x2 latents, 8 text tokens, one
        glyph token, no image."""
        config = dit.config
        x = torch.zeros(1, config.in_channels, 1, 2, 2, device=device, dtype=dtype)
        t = torch.full((1, 2) if config.use_meanflow else (1,), 500.0, device=device)
        context = DiTContext(text=torch.zeros(1, min(text_len, 8), config.text_embed_dim, device=device, dtype=dtype),
                             glyph=torch.zeros(1, 1, config.text_embed_2_dim, device=device, dtype=dtype))
        return x, t, context, None
