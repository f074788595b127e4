"""How conditioning enters the Qwen-Image DiT (engine.families.DiTAdapter).

The denoise loop's latents stay (1, C, 1, H, W); the DiT packs them (and unpacks its prediction)
itself. Text: one prompt's `QwenPromptEmbeds` -> the DiT's context (1, S, D), unpadded, so no mask.

Edit models (diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`): each input image
is resized (Lanczos) to about one megapixel, sides multiples of 32, VAE-encoded (posterior mode,
normalised) and kept as reference latents (C, 1, h_i, w_i); every step the DiT gets them as
`image_context`, appends their tokens after the noise tokens (rotary frame index 1, 2, ...) and
predicts the noise tokens only. The images also condition the prompt, through the text encoder
(text_encoder.py), not here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.conditioning import ImageCond, image_to_tensor
from engine.models.qwen_image.pipelines import REFERENCE_AREA, area_dimensions


class QwenImageAdapter:
    """Text-to-image and edit (with `ImageCond.reference_latents`) on one DiT."""

    def __init__(self, reference_area: int = REFERENCE_AREA) -> None:
        self.reference_area = reference_area

    def image_condition(self, image, num_frames: int, height: int, width: int, vae, image_encoder,
                        device: torch.device, dtype: torch.dtype) -> ImageCond:
        """`image`: one PIL image or a list of them (several references, Edit-Plus)."""
        references = []
        for im in image if isinstance(image, list) else [image]:
            # 1. about one megapixel at the image's aspect ratio, in [-1, 1]
            w, h = area_dimensions(self.reference_area, im.width / im.height)
            pixels = image_to_tensor(im, h, w).to(device, dtype)[:, :, None]          # (1, 3, 1, h, w)
            # 2. VAE posterior mode, normalised
            references.append(vae.encode(pixels)[0].float().cpu())                     # (C, 1, h / 8, w / 8)
        return ImageCond(clip_tokens=None, latent_cond=None, reference_latents=tuple(references))

    def text_input(self, embeds, device: torch.device, dtype: torch.dtype) -> Tensor:
        return embeds.hidden.to(device, dtype)[None]                                   # (1, S, D)

    def model_input(self, latents: Tensor, t: Tensor, image: ImageCond | None, dit: nn.Module,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        references = None
        if image is not None and image.reference_latents:
            references = [r.to(latents.device, dtype)[None] for r in image.reference_latents]  # (1, C, 1, h, w)
        return latents.to(dtype), t.reshape(1), references

    def final_latents(self, latents: Tensor, image: ImageCond | None) -> Tensor:
        return latents

    def dummy_inputs(self, dit: nn.Module, text_len: int, device: torch.device, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor, None]:
        """One 2x2 token, `text_len` zero text states."""
        config = dit.config
        p = config.patch_size
        x = torch.zeros(1, config.out_channels, 1, p, p, device=device, dtype=dtype)
        t = torch.full((1,), 500.0, device=device)
        context = torch.zeros(1, text_len, config.joint_attention_dim, device=device, dtype=dtype)
        return x, t, context, None
