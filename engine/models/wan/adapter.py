"""How conditioning enters the Wan DiTs (engine.families.DiTAdapter), in the two ways Wan has.

`ConcatAdapter` (Wan2.1 T2V/I2V, Wan2.2 A14B T2V/I2V), as diffusers' `WanImageToVideoPipeline`:
    an image is resized to (height, width), followed by num_frames - 1 zero frames, VAE-encoded
    (distribution mode, normalised) and preceded by a 4-channel frame mask (1 on latent frame 0);
    these 20 channels are concatenated to the noisy latents (36 input channels). A DiT with an image
    branch (Wan2.1 I2V: `image_dim` set) also gets the image encoder's tokens (CLIP penultimate
    layer); Wan2.2 A14B I2V has none. Text-to-video on a DiT built for images too (the tiny
    models) gets zero conditioning channels and one zero image token.

`FirstFrameAdapter` (Wan2.2 TI2V-5B, diffusers' `expand_timesteps=True`):
    text-to-video runs the plain latents at the step's timestep. Image-to-video VAE-encodes the
    image alone; latent frame 0 is replaced by it before every forward, its tokens get timestep 0
    (per-token timesteps: `(mask[0][0][:, ::ph, ::pw] * t).flatten()`), and it is put back once
    more after the last step, as diffusers' pipeline does.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.conditioning import ImageCond, image_to_tensor

MASK_CHANNELS = 4
"""Frame-mask channels of the concatenated conditioning (= the VAE's temporal stride)."""


def first_frame_mask(mask_channels: int, f_lat: int, h_lat: int, w_lat: int) -> Tensor:
    """(mask_channels, F_lat, H_lat, W_lat): 1 on latent frame 0 (the given image), 0 after.

    diffusers builds a per-pixel-frame mask (1 for frame 0, repeated temporal_stride times, then
    the other frames) and folds it to (stride, F_lat, ...); the result is this.
    """
    mask = torch.zeros(mask_channels, f_lat, h_lat, w_lat)
    mask[:, 0] = 1.0
    return mask


def _image_tokens(dit: nn.Module, image: ImageCond | None, device: torch.device, dtype: torch.dtype
                  ) -> Tensor | None:
    """(1, L_img, D_img) for a DiT with an image branch (one zero token without an image), else None."""
    image_dim = dit.config.image_dim
    if image_dim is None:
        return None
    if image is None or image.clip_tokens is None:
        return torch.zeros(1, 1, image_dim, device=device, dtype=dtype)
    return image.clip_tokens.to(device, dtype)[None]


class _WanText:
    """Wan's text conditioning: one (L, D) umT5 tensor per prompt."""

    def text_input(self, embeds: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        return embeds.to(device, dtype)[None]                                      # (1, L, D)


class ConcatAdapter(_WanText):
    """Image conditioning concatenated on the channel axis (see the module docstring)."""

    def image_condition(self, image, num_frames: int, height: int, width: int, vae, image_encoder,
                        device: torch.device, dtype: torch.dtype) -> ImageCond:
        # 1. Image-encoder tokens from the original image (models with an image branch).
        clip_tokens = None
        if image_encoder is not None:
            clip_tokens = image_encoder.encode([image])[0].float().cpu()         # (257, 1280)
        # 2. The image, then num_frames - 1 zero frames, VAE-encoded.
        video = torch.zeros(1, 3, num_frames, height, width, device=device, dtype=dtype)  # (1, 3, F, H, W)
        video[:, :, 0] = image_to_tensor(image, height, width).to(device, dtype)
        latents = vae.encode(video)[0].float().cpu()                               # (C, F_lat, H_lat, W_lat)
        # 3. Frame mask channels before the latents.
        mask = first_frame_mask(MASK_CHANNELS, *latents.shape[1:])                  # (4, F_lat, H_lat, W_lat)
        return ImageCond(clip_tokens=clip_tokens, latent_cond=torch.cat([mask, latents], dim=0))

    def model_input(self, latents: Tensor, t: Tensor, image: ImageCond | None, dit: nn.Module,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        x = latents.to(dtype)                                                       # (1, C, F, H, W)
        extra = dit.config.in_channels - latents.shape[1]
        if extra > 0:
            if image is None:
                cond = x.new_zeros(1, extra, *latents.shape[2:])
            else:
                cond = image.latent_cond.to(x.device, dtype)[None]                 # (1, 4 + C, F, H, W)
            x = torch.cat([x, cond], dim=1)                                        # (1, C_in, F, H, W)
        return x, t.reshape(1), _image_tokens(dit, image, x.device, dtype)

    def final_latents(self, latents: Tensor, image: ImageCond | None) -> Tensor:
        return latents

    def dummy_inputs(self, dit: nn.Module, text_len: int, device: torch.device, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return _dummy(dit, text_len, device, dtype) + (_image_tokens(dit, None, device, dtype),)


class FirstFrameAdapter(_WanText):
    """Image latents replace latent frame 0, whose tokens see timestep 0 (see the module docstring)."""

    def image_condition(self, image, num_frames: int, height: int, width: int, vae, image_encoder,
                        device: torch.device, dtype: torch.dtype) -> ImageCond:
        pixels = image_to_tensor(image, height, width).to(device, dtype)[:, :, None]  # (1, 3, 1, H, W)
        latents = vae.encode(pixels)[0].float().cpu()                               # (C, 1, H_lat, W_lat)
        return ImageCond(clip_tokens=None, latent_cond=latents)

    @staticmethod
    def _keep_mask(latents: Tensor) -> Tensor:
        """(1, 1, F_lat, H_lat, W_lat) float32: 0 on latent frame 0 (the image), 1 elsewhere."""
        mask = torch.ones(1, 1, *latents.shape[2:], device=latents.device, dtype=torch.float32)
        mask[:, :, 0] = 0.0
        return mask

    def model_input(self, latents: Tensor, t: Tensor, image: ImageCond | None, dit: nn.Module,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        # 1. Text-to-video: every token at the step's timestep (the per-token values would all be t).
        if image is None:
            return latents.to(dtype), t.reshape(1), None
        # 2. Image-to-video: frame 0 replaced by the image's latents, its tokens at timestep 0.
        mask = self._keep_mask(latents)
        cond = image.latent_cond.to(latents.device, torch.float32)[None]           # (1, C, 1, H, W)
        x = ((1 - mask) * cond + mask * latents).to(dtype)                         # (1, C, F, H, W)
        _, ph, pw = dit.config.patch_size
        timestep = (mask[0, 0][:, ::ph, ::pw] * t).flatten()[None]                  # (1, L)
        return x, timestep, None

    def final_latents(self, latents: Tensor, image: ImageCond | None) -> Tensor:
        if image is None:
            return latents
        mask = self._keep_mask(latents)
        cond = image.latent_cond.to(latents.device, torch.float32)[None]
        return (1 - mask) * cond + mask * latents

    def dummy_inputs(self, dit: nn.Module, text_len: int, device: torch.device, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return _dummy(dit, text_len, device, dtype) + (None,)


def _dummy(dit: nn.Module, text_len: int, device: torch.device, dtype: torch.dtype
           ) -> tuple[Tensor, Tensor, Tensor]:
    """(x, timestep, context) of the smallest input the DiT takes (one patch in time, 2x2 in space)."""
    config = dit.config
    pt, ph, pw = config.patch_size
    x = torch.zeros(1, config.in_channels, pt, 2 * ph, 2 * pw, device=device, dtype=dtype)
    t = torch.full((1,), 500.0, device=device)
    context = torch.zeros(1, text_len, config.text_dim, device=device, dtype=dtype)
    return x, t, context
