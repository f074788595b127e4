"""HunyuanVideo-1.5 image encoder: SigLIP (FLUX.1-Redux-dev's so400m, 384 px, 729 x 1152 tokens).

`encode` reproduces diffusers' `HunyuanVideo15ImageToVideoPipeline._get_image_embeds`: the
SigLIP image processor (resize, rescale, normalise), then the vision tower's `last_hidden_state`.
"""
from __future__ import annotations

import torch
from torch import nn


def siglip_processor_cls():
    """The PIL-backed SigLIP image processor when this transformers has one (no torchvision
    needed), else `SiglipImageProcessor`. A folder saved under either class name
    (`SiglipImageProcessor`, `SiglipImageProcessorFast`) is read from its config values."""
    try:
        from transformers import SiglipImageProcessorPil
        return SiglipImageProcessorPil
    except ImportError:  # older transformers
        from transformers import SiglipImageProcessor
        return SiglipImageProcessor


class SiglipImageEncoder:
    """PIL images -> (B, tokens, dim) SigLIP last hidden states."""

    def __init__(self, model: nn.Module, processor) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        pixel_values = self.processor(images=images, do_resize=True, do_convert_rgb=True,
                                      return_tensors="pt").pixel_values        # (B, 3, S, S)
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.last_hidden_state                                           # (B, tokens, dim)
